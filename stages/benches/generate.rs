//! Generation throughput of the eval stage's decoder (`cargo bench -p flow-stages --bench
//! generate`): generated tokens/s with the KV cache against recomputing the whole prefix for
//! every new token (what a forward-only model without a cache must do), same model, batch
//! and lengths, greedy.
use std::time::Instant;

use flow_stages::cpu::decode::{Decoder, Token};
use flow_stages::eval::lm::argmax;
use flow_stages::model::config::ModelConfig;
use flow_stages::model::weights::Weights;

/// Greedy generation of `new` tokens after `prompt` tokens for `batch` sequences; with
/// `cache` false every step re-feeds each whole sequence into an emptied slot.
fn generate(
    w: &Weights,
    batch: usize,
    prompt: usize,
    new: usize,
    cache: bool,
    threads: usize,
) -> (f64, Vec<Vec<u32>>) {
    let vocab = w.config.vocab_size;
    let mut dec = Decoder::new(w, batch, prompt + new, threads);
    let mut seqs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt)
                .map(|i| ((b * 131 + i * 17) % vocab) as u32)
                .collect()
        })
        .collect();
    let start = Instant::now();
    for step in 0..new {
        let mut tokens = Vec::new();
        for (slot, s) in seqs.iter().enumerate() {
            let from = if cache && step > 0 {
                s.len() - 1
            } else {
                dec.reset(slot);
                0
            };
            for (i, &id) in s[from..].iter().enumerate() {
                tokens.push(Token {
                    slot,
                    id,
                    logits: from + i + 1 == s.len(),
                });
            }
        }
        let logits = dec.feed(&tokens).unwrap();
        for (s, row) in seqs.iter_mut().zip(logits.chunks(vocab)) {
            s.push(argmax(row) as u32);
        }
    }
    ((batch * new) as f64 / start.elapsed().as_secs_f64(), seqs)
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    // The default study's model size (pipelines/*.toml) and a wider one.
    for (name, d, layers, heads, ff, vocab) in [
        ("study", 256, 4, 8, 704, 4096),
        ("wide", 512, 8, 8, 1408, 8192),
    ] {
        let cfg = ModelConfig::new(vocab, d, ff, layers, heads, heads, 512, false);
        let w = Weights::init(&cfg, 1);
        let (batch, prompt, new) = (8, 128, 128);
        let (cached, a) = generate(&w, batch, prompt, new, true, threads);
        let (uncached, b) = generate(&w, batch, prompt, new, false, threads);
        let same = a == b;
        println!(
            "{name}: d={d} layers={layers} vocab={vocab} batch={batch} prompt={prompt} new={new} threads={threads}: \
             KV cache {cached:.0} tokens/s, no cache {uncached:.0} tokens/s ({:.1}x), same tokens: {same}",
            cached / uncached
        );
    }
}
