//! The model as evaluation sees it: a tokenizer and a KV-cached decoder (the CPU engine's,
//! or a burn device's), offering the two requests of lm-evaluation-harness: `loglikelihood`
//! of a continuation given a context, and `generate_until` (greedy or sampled, cut at stop
//! sequences). Both engines are fed the same tokens in the same batches, so they differ
//! only by floating-point rounding.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::cpu::decode::{Decoder, Token, log_prob};
use crate::data::rng::Rng;
use crate::gpu::device::Choice;
use crate::gpu::precision::Precision;
use crate::kind::StageError;
use crate::model::weights::Weights;

/// Where a model runs.
pub enum Engine {
    /// flow's CPU engine (the reference).
    Cpu,
    /// A burn device, the weights uploaded once.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    Device(crate::gpu::decode::DeviceWeights),
}

/// What scoring and generation need of a KV-cached model: the CPU engine's decoder and the
/// device decoder take the same ragged batches of tokens.
pub trait Decode {
    /// Sequences held at once (a device decoder may hold fewer than asked for).
    fn slots(&self) -> usize;
    /// Tokens a slot holds.
    fn len(&self, slot: usize) -> usize;
    /// Empties a slot.
    fn reset(&mut self, slot: usize);
    /// Appends tokens; returns the logits `[wanted, vocab]` of those that ask for them.
    fn feed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, String>;
    /// Makes slot `to` hold the first `n` tokens of slot `from`: the samples of one prompt
    /// share its prefill instead of each computing it again.
    fn copy_prefix(&mut self, from: usize, to: usize, n: usize);
}

impl Decode for Decoder<'_> {
    fn slots(&self) -> usize {
        Decoder::slots(self)
    }
    fn len(&self, slot: usize) -> usize {
        Decoder::len(self, slot)
    }
    fn reset(&mut self, slot: usize) {
        Decoder::reset(self, slot)
    }
    fn feed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, String> {
        Decoder::feed(self, tokens)
    }
    fn copy_prefix(&mut self, from: usize, to: usize, n: usize) {
        Decoder::copy_prefix(self, from, to, n)
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl Decode for crate::gpu::decode::DeviceDecoder<'_> {
    fn slots(&self) -> usize {
        crate::gpu::decode::DeviceDecoder::slots(self)
    }
    fn len(&self, slot: usize) -> usize {
        crate::gpu::decode::DeviceDecoder::len(self, slot)
    }
    fn reset(&mut self, slot: usize) {
        crate::gpu::decode::DeviceDecoder::reset(self, slot)
    }
    fn feed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, String> {
        crate::gpu::decode::DeviceDecoder::feed(self, tokens)
    }
    fn copy_prefix(&mut self, from: usize, to: usize, n: usize) {
        crate::gpu::decode::DeviceDecoder::copy_prefix(self, from, to, n)
    }
}

/// A loaded model and its tokenizer.
pub struct Lm {
    pub weights: Weights,
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    /// Every id that ends a generation: `eos_token_id` of `config.json` and of
    /// `generation_config.json` (a list in Llama 3 and Qwen 2.5: end of text, end of turn).
    pub eos: Vec<u32>,
    /// Sequences decoded at once.
    pub batch: usize,
    pub threads: usize,
}

/// Token ids of an `eos_token_id` field: one id or a list of them.
fn token_ids(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_u64())
            .map(|i| i as u32)
            .collect(),
        Some(one) => one.as_u64().map(|i| i as u32).into_iter().collect(),
        None => Vec::new(),
    }
}

/// The score of one (context, continuation) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Summed log-probability of the continuation's tokens.
    pub ll: f64,
    /// Whether every continuation token is the argmax (lm-eval's `is_greedy`).
    pub greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Cut (and stop) at the first of these in the decoded completion.
    pub stop: Vec<String>,
}

/// A generation request: the prompt and the seed of its own sampling stream, so that what
/// an item gets never depends on batching or on the other items.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: String,
    pub seed: u64,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The completion, cut before the first stop sequence.
    pub text: String,
    pub tokens: usize,
}

impl Lm {
    /// Loads a model artifact onto a chosen device, computing in `precision` (which the
    /// device must have: `Precision::check`). On a burn device it first checks that the
    /// weights and the KV cache of one sequence of the model's full context fit (what the
    /// smallest batch needs; larger batches take the slots that fit), before anything
    /// is read.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
    pub fn load_on(
        dir: &Path,
        batch: usize,
        threads: usize,
        choice: Choice,
        precision: Precision,
    ) -> Result<Lm, StageError> {
        match choice {
            Choice::Cpu => Lm::load(dir, batch, threads),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            Choice::Burn(device, name) => {
                use crate::gpu::decode::{DeviceDecoder, DeviceWeights};
                let c = crate::model::config::ModelConfig::read(&dir.join("config.json"))?;
                let positions = crate::model::arch::Arch::of(&c)
                    .map_err(|e| StageError::Failed(format!("{}: {e}", dir.display())))?
                    .positions;
                let cache = DeviceDecoder::cache_bytes(&c, 1, positions, precision);
                let need = precision.bytes() * c.param_count() as u64 + cache;
                let what = format!(
                    "evaluating {} ({} weights and the KV cache of one {positions}-token sequence)",
                    dir.display(),
                    precision.name()
                );
                crate::gpu::device::check_fits(&device, &name, need, &what)?;
                let mut lm = Lm::load(dir, batch, threads)?;
                lm.engine = Engine::Device(DeviceWeights::upload(&lm.weights, &device, precision));
                Ok(lm)
            }
        }
    }

    /// Loads a model artifact (safetensors, config.json, tokenizer.json) for the CPU engine.
    pub fn load(dir: &Path, batch: usize, threads: usize) -> Result<Lm, StageError> {
        let weights = Weights::load(dir)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            StageError::Failed(format!(
                "{}: cannot load the model's tokenizer: {e}",
                path.display()
            ))
        })?;
        let c = &weights.config;
        let bos = c.bos_token_id.or_else(|| tokenizer.token_to_id("<s>"));
        let mut eos = token_ids(c.eos_token_id.as_ref());
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let text = std::fs::read_to_string(&generation)
                .map_err(|e| StageError::io(format!("reading {}", generation.display()), e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| StageError::Failed(format!("{}: {e}", generation.display())))?;
            for id in token_ids(v.get("eos_token_id")) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        if eos.is_empty() {
            eos.extend(tokenizer.token_to_id("</s>"));
        }
        Ok(Lm {
            weights,
            engine: Engine::Cpu,
            tokenizer,
            bos,
            eos,
            batch: batch.max(1),
            threads,
        })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, StageError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| StageError::Failed(format!("encoding: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, StageError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| StageError::Failed(format!("decoding: {e}")))
    }

    /// lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation,
    /// the whole string is encoded once and the continuation is what follows the context's
    /// tokens (so tokens merging across the boundary count for the continuation). BOS first.
    pub fn encode_pair(
        &self,
        context: &str,
        continuation: &str,
    ) -> Result<(Vec<u32>, Vec<u32>), StageError> {
        let trimmed = context.trim_end_matches(' ');
        let moved = &context[trimmed.len()..];
        let continuation = format!("{moved}{continuation}");
        let whole = self.encode(&format!("{trimmed}{continuation}"))?;
        let ctx = self.encode(trimmed)?;
        let split = ctx.len().min(whole.len());
        let mut context_ids: Vec<u32> = self.bos.into_iter().collect();
        context_ids.extend_from_slice(&whole[..split]);
        Ok((context_ids, whole[split..].to_vec()))
    }

    /// The longest sequence the model runs at (lm-eval's `max_length`): longer inputs are
    /// cut from the left, generation stops there.
    pub fn max_len(&self) -> usize {
        self.weights.arch.positions
    }

    /// A decoder of `batch` slots (fewer where a device cannot hold them) of `capacity`
    /// tokens on this model's engine.
    pub fn decoder(&self, capacity: usize) -> Result<Box<dyn Decode + '_>, StageError> {
        Ok(match &self.engine {
            Engine::Cpu => Box::new(Decoder::new(
                &self.weights,
                self.batch,
                capacity,
                self.threads,
            )),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            Engine::Device(on) => {
                use crate::gpu::decode::DeviceDecoder;
                let capacity = capacity.min(self.max_len());
                let slot =
                    DeviceDecoder::cache_bytes(&self.weights.config, 1, capacity, on.precision);
                let slots = on
                    .slots_that_fit(self.batch, slot)
                    .map_err(StageError::Failed)?;
                Box::new(DeviceDecoder::new(&self.weights, on, slots, capacity))
            }
        })
    }

    /// Scores every pair, longest first (lm-eval's order: a batch holds sequences of
    /// similar length, so a device pads little), one forward pass per batch of slots.
    pub fn loglikelihood(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Scored>, StageError> {
        let max_len = self.max_len();
        let vocab = self.weights.config.vocab_size;
        let mut seqs = Vec::with_capacity(pairs.len());
        for (ctx, cont) in pairs {
            if cont.is_empty() {
                return Err(StageError::Failed(
                    "a continuation encodes to no tokens".into(),
                ));
            }
            // lm-eval: (context + continuation)[-(max_len + 1):][:-1], left-truncated.
            let mut seq: Vec<u32> = ctx.iter().chain(cont).copied().collect();
            let drop = seq.len().saturating_sub(max_len + 1);
            seq.drain(..drop);
            seqs.push(seq);
        }
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let capacity = seqs.iter().map(|s| s.len() - 1).max().unwrap_or(1);
        let mut dec = self.decoder(capacity)?;
        let mut out = vec![None; pairs.len()];
        for chunk in order.chunks(dec.slots()) {
            let mut tokens = Vec::new();
            for (slot, &p) in chunk.iter().enumerate() {
                dec.reset(slot);
                let (seq, cont) = (&seqs[p], &pairs[p].1);
                let first_target = seq.len() - cont.len();
                for (i, &id) in seq[..seq.len() - 1].iter().enumerate() {
                    tokens.push(Token {
                        slot,
                        id,
                        logits: i + 1 >= first_target,
                    });
                }
            }
            let logits = dec.feed(&tokens).map_err(StageError::Failed)?;
            let mut rows = logits.chunks(vocab);
            for &p in chunk {
                let cont = &pairs[p].1;
                let mut s = Scored {
                    ll: 0.0,
                    greedy: true,
                    tokens: cont.len(),
                };
                for &t in cont {
                    let row = rows.next().expect("one logits row per target");
                    s.ll += log_prob(row, t as usize);
                    s.greedy &= argmax(row) == t as usize;
                }
                out[p] = Some(s);
            }
        }
        Ok(out
            .into_iter()
            .map(|s| s.expect("every pair scored"))
            .collect())
    }

    /// Generates for every request with continuous batching: a slot that finishes takes the
    /// next prompt in the same forward pass as the other slots' next tokens. Requests with the
    /// same prompt (HumanEval's n samples of a problem) share one prefill: a request whose
    /// prompt another slot has already fed copies that slot's prompt keys and values and
    /// draws its first token from that prefill's logits, with its own seeded stream. The
    /// prefill is the same whichever slot and batch compute it, so sharing changes no result.
    pub fn generate(
        &self,
        requests: &[GenRequest],
        opts: &GenOptions,
        mut done: impl FnMut(usize),
    ) -> Result<Vec<Generated>, StageError> {
        Ok(self.generate_counted(requests, opts, &mut done)?.0)
    }

    /// `generate`, also returning how many prompt tokens were fed (the rest were shared).
    pub fn generate_counted(
        &self,
        requests: &[GenRequest],
        opts: &GenOptions,
        done: &mut dyn FnMut(usize),
    ) -> Result<(Vec<Generated>, usize), StageError> {
        let max_len = self.max_len();
        let vocab = self.weights.config.vocab_size;
        // Every prompt as it will be fed: BOS, then lm-eval's cut to the last
        // max_len - max_new_tokens tokens. The cache holds the longest prompt and its budget.
        let keep = max_len.saturating_sub(opts.max_new_tokens).max(1);
        let mut prompts = Vec::with_capacity(requests.len());
        for r in requests {
            let mut ids: Vec<u32> = self.bos.into_iter().collect();
            ids.extend(self.encode(&r.prompt)?);
            let cut = ids.len().saturating_sub(keep);
            ids.drain(..cut);
            prompts.push(ids);
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let mut dec = self.decoder(longest + opts.max_new_tokens)?;
        let mut results: Vec<Option<Generated>> = vec![None; requests.len()];
        let mut slots: Vec<Option<Active>> = (0..dec.slots()).map(|_| None).collect();
        let mut queue = 0usize;
        let mut prefilled = 0usize;
        loop {
            // Fill free slots. A prompt that an active slot has fed is copied from it; one
            // that another slot is about to feed waits a round to share that prefill.
            let mut pending: Vec<usize> = Vec::new(); // slots to prefill this round
            for slot in 0..slots.len() {
                if slots[slot].is_some() || queue >= requests.len() {
                    continue;
                }
                let prompt = &prompts[queue];
                let sibling =
                    |s: &Option<Active>| s.as_ref().is_some_and(|a| prompts[a.request] == *prompt);
                if pending.iter().any(|&p| sibling(&slots[p])) {
                    break;
                }
                let fed = (0..slots.len()).find(|&o| {
                    o != slot && sibling(&slots[o]) && slots[o].as_ref().unwrap().first.is_some()
                });
                dec.reset(slot);
                let mut a = Active {
                    request: queue,
                    rng: Rng::new(requests[queue].seed),
                    ids: Vec::new(),
                    next: 0,
                    first: None,
                };
                queue += 1;
                match fed {
                    Some(from) => {
                        dec.copy_prefix(from, slot, prompt.len());
                        let row = slots[from].as_ref().and_then(|s| s.first.clone());
                        let row = row.expect("a fed sibling has its prompt's logits");
                        a.first = Some(row.clone());
                        slots[slot] = Some(a);
                        self.step(&mut slots, slot, &row, opts, &*dec, &mut results, done)?;
                    }
                    None => {
                        slots[slot] = Some(a);
                        pending.push(slot);
                    }
                }
            }
            let mut tokens = Vec::new();
            let mut order = Vec::new(); // slot of each logits row
            for &slot in &pending {
                let ids = &prompts[slots[slot].as_ref().unwrap().request];
                prefilled += ids.len();
                for (i, &id) in ids.iter().enumerate() {
                    tokens.push(Token {
                        slot,
                        id,
                        logits: i + 1 == ids.len(),
                    });
                }
                order.push(slot);
            }
            for (slot, s) in slots.iter().enumerate() {
                if let Some(a) = s
                    && !a.ids.is_empty()
                {
                    tokens.push(Token {
                        slot,
                        id: a.next,
                        logits: true,
                    });
                    order.push(slot);
                }
            }
            if tokens.is_empty() {
                if queue < requests.len() {
                    continue; // every slot was freed by shared first tokens
                }
                break;
            }
            let logits = dec.feed(&tokens).map_err(StageError::Failed)?;
            for (row, &slot) in logits.chunks(vocab).zip(&order) {
                let a = slots[slot].as_mut().expect("active slot");
                if a.first.is_none() {
                    a.first = Some(std::rc::Rc::new(row.to_vec()));
                }
                self.step(&mut slots, slot, row, opts, &*dec, &mut results, done)?;
            }
        }
        let out = results
            .into_iter()
            .map(|r| r.expect("every request finishes"))
            .collect();
        Ok((out, prefilled))
    }

    /// Draws a slot's next token from its logits row and ends its request at EOS, a stop
    /// sequence or the budget (the slot is then free).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        slots: &mut [Option<Active>],
        slot: usize,
        row: &[f32],
        opts: &GenOptions,
        dec: &dyn Decode,
        results: &mut [Option<Generated>],
        done: &mut dyn FnMut(usize),
    ) -> Result<(), StageError> {
        let a = slots[slot].as_mut().expect("active slot");
        let next = sample(row, opts, &mut a.rng);
        let eos = self.eos.contains(&next);
        if !eos {
            a.ids.push(next);
            a.next = next;
        }
        let text = self.decode(&a.ids)?;
        let stop_at = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        let full = a.ids.len() >= opts.max_new_tokens || dec.len(slot) + 1 >= self.max_len();
        if eos || stop_at.is_some() || full {
            let text = match stop_at {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            results[a.request] = Some(Generated {
                text,
                tokens: a.ids.len(),
            });
            done(a.request);
            slots[slot] = None;
        }
        Ok(())
    }
}

/// A request being generated in a slot.
struct Active {
    request: usize,
    rng: Rng,
    /// Tokens generated so far.
    ids: Vec<u32>,
    /// The last of them, fed in the next round.
    next: u32,
    /// The logits after its prompt, for requests of the same prompt to start from.
    first: Option<std::rc::Rc<Vec<f32>>>,
}

/// Index of the first maximum (greedy decoding's choice).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Greedy (first maximum) at temperature 0, else nucleus sampling as `transformers` does:
/// softmax of logits / T, keep the most likely tokens until their mass reaches top_p (at
/// least one), renormalize, draw.
pub fn sample(logits: &[f32], opts: &GenOptions, rng: &mut Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let t = opts.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(f64, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (((v as f64 - max) / t).exp(), i as u32))
        .collect();
    let total: f64 = probs.iter().map(|p| p.0).sum();
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.0 / total;
        if mass >= opts.top_p {
            break;
        }
    }
    let kept = &probs[..kept];
    let norm: f64 = kept.iter().map(|p| p.0).sum();
    let mut u = rng.next_f64() * norm;
    for p in kept {
        u -= p.0;
        if u < 0.0 {
            return p.1;
        }
    }
    kept[kept.len() - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: f64, p: f64) -> GenOptions {
        GenOptions {
            max_new_tokens: 1,
            temperature: t,
            top_p: p,
            stop: vec![],
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_cuts_the_tail() {
        let mut rng = Rng::new(1);
        assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], &opts(0.0, 1.0), &mut rng), 1);
        // p = softmax([5, 4, 0, 0]) ~ [.72, .27, .005, .005]: top_p 0.9 keeps tokens 0 and 1.
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample(&[5.0, 4.0, 0.0, 0.0], &opts(1.0, 0.9), &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0);
        let share = seen[0] as f64 / 2000.0;
        assert!((share - 0.731).abs() < 0.04, "token 0 drawn {share}");
        // top_p small keeps only the best token.
        for _ in 0..100 {
            assert_eq!(sample(&[1.0, 2.0, 0.5], &opts(0.8, 0.1), &mut rng), 1);
        }
    }
}
