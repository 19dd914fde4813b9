//! Throughput of the eval stage's decoder (`cargo bench -p flow-stages --bench generate`).
//!
//! Without arguments, on the CPU engine: generated tokens/s with the KV cache against
//! recomputing the whole prefix for every new token (what a forward-only model without a
//! cache must do), same model, batch and lengths, greedy.
//!
//! `--device wgpu [--shape D,LAYERS,HEADS,KV_HEADS,FF,VOCAB] [--batch B] [--prompt P]
//! [--new N] [--precision f16]`: the device decoder on that shape (random weights), printing one JSON line with
//! generated tokens/s (greedy, continuous batching's decode step), scored tokens/s (one
//! prefill of B x P tokens with every position's logits, as log-likelihood scoring does) and
//! time to the first token; `benches/eval_torch.py` measures transformers the same way.
use std::time::Instant;

use flow_stages::cpu::decode::{Decoder, Token};
use flow_stages::eval::lm::{Decode, argmax};
use flow_stages::model::config::ModelConfig;
use flow_stages::model::weights::Weights;

/// Greedy generation of `new` tokens after `prompt` tokens for every slot; with `cache`
/// false every step re-feeds each whole sequence into an emptied slot. Returns tokens/s,
/// seconds to the first generated token and the sequences.
fn generate(
    dec: &mut dyn Decode,
    vocab: usize,
    prompt: usize,
    new: usize,
    cache: bool,
) -> (f64, f64, Vec<Vec<u32>>) {
    let batch = dec.slots();
    let mut seqs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt)
                .map(|i| ((b * 131 + i * 17) % vocab) as u32)
                .collect()
        })
        .collect();
    let start = Instant::now();
    let mut first = 0.0;
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
        if step == 0 {
            first = start.elapsed().as_secs_f64();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    ((batch * new) as f64 / secs, first, seqs)
}

/// Tokens/s of one scoring pass: every slot fed `len` tokens, every position's logits.
fn score(dec: &mut dyn Decode, vocab: usize, len: usize) -> f64 {
    let mut tokens = Vec::new();
    for slot in 0..dec.slots() {
        dec.reset(slot);
        tokens.extend((0..len).map(|i| Token {
            slot,
            id: ((slot * 7 + i * 13) % vocab) as u32,
            logits: true,
        }));
    }
    let start = Instant::now();
    let logits = dec.feed(&tokens).unwrap();
    assert_eq!(logits.len(), tokens.len() * vocab);
    tokens.len() as f64 / start.elapsed().as_secs_f64()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    if let Some(device) = arg(&args, "--device") {
        return on_device(&args, &device);
    }
    // The default study's model size (pipelines/*.toml) and a wider one.
    for (name, d, layers, heads, ff, vocab) in [
        ("study", 256, 4, 8, 704, 4096),
        ("wide", 512, 8, 8, 1408, 8192),
    ] {
        let cfg = ModelConfig::new(vocab, d, ff, layers, heads, heads, 512, false);
        let w = Weights::init(&cfg, 1);
        let (batch, prompt, new) = (8, 128, 128);
        let mut dec = Decoder::new(&w, batch, prompt + new, threads);
        let (cached, _, a) = generate(&mut dec, vocab, prompt, new, true);
        let (uncached, _, b) = generate(&mut dec, vocab, prompt, new, false);
        let same = a == b;
        println!(
            "{name}: d={d} layers={layers} vocab={vocab} batch={batch} prompt={prompt} new={new} threads={threads}: \
             KV cache {cached:.0} tokens/s, no cache {uncached:.0} tokens/s ({:.1}x), same tokens: {same}",
            cached / uncached
        );
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn on_device(args: &[String], device: &str) {
    use flow_stages::gpu::decode::{DeviceDecoder, DeviceWeights};
    use flow_stages::gpu::device::{Choice, select};
    let num = |name: &str, default: usize| {
        arg(args, name).map_or(default, |v| v.parse().expect("a number"))
    };
    let shape: Vec<usize> = arg(args, "--shape")
        .unwrap_or_else(|| "256,4,8,8,704,4096".into())
        .split(',')
        .map(|v| v.parse().expect("--shape D,LAYERS,HEADS,KV_HEADS,FF,VOCAB"))
        .collect();
    let [d, layers, heads, kv, ff, vocab] = shape[..] else {
        panic!("--shape D,LAYERS,HEADS,KV_HEADS,FF,VOCAB");
    };
    let (batch, prompt, new) = (num("--batch", 8), num("--prompt", 128), num("--new", 128));
    let precision = flow_stages::gpu::precision::Precision::parse(
        &arg(args, "--precision").unwrap_or_else(|| "f32".into()),
    )
    .expect("--precision f32, f16 or bf16");
    let choice = select(device).expect("device");
    precision
        .check(&choice)
        .expect("a device with that precision");
    let Choice::Burn(dev, what) = choice else {
        panic!("device `{device}` is not a burn device here");
    };
    let cfg = ModelConfig::new(vocab, d, ff, layers, heads, kv, 4096, false);
    let w = Weights::init(&cfg, 1);
    let start = Instant::now();
    let on = DeviceWeights::upload(&w, &dev, precision);
    let upload = start.elapsed().as_secs_f64();
    let mut dec = DeviceDecoder::new(&w, &on, batch, prompt + new);
    // One warm-up pass compiles the kernels; the figures are of the second.
    generate(&mut dec, vocab, prompt, 2, true);
    let (generated, first, _) = generate(&mut dec, vocab, prompt, new, true);
    score(&mut dec, vocab, prompt);
    let scored = score(&mut dec, vocab, prompt);
    println!(
        "{}",
        serde_json::json!({
            "impl": "flow", "device": what, "d": d, "layers": layers, "heads": heads,
            "kv_heads": kv, "ff": ff, "vocab": vocab, "batch": batch, "prompt": prompt,
            "new": new, "precision": precision.name(), "generated_tokens_per_s": generated, "scored_tokens_per_s": scored,
            "first_token_s": first, "upload_s": upload,
        })
    );
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn on_device(_: &[String], device: &str) {
    panic!("device `{device}`: this build has no burn devices");
}
