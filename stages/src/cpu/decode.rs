//! Inference with a KV cache: the forward pass over "ragged" batches of new tokens, each
//! appended to its own sequence (a cache slot), attending to everything its slot holds.
//!
//! One call serves prefill (many tokens of one or several slots) and decoding (one token per
//! active slot) alike: the projections are one `gemm` over all new tokens, attention is per
//! (token, head) over the slot's cached keys, and the LM head runs only for the tokens whose
//! logits the caller asks for (the vocabulary product dominates decoding of small models).
//! Nothing is recomputed for the prefix, which is what makes generation linear in its length.

use rayon::prelude::*;

use super::matmul::Dense;
use super::ops::{self, Rope};
use crate::model::arch::Extra;
use crate::model::weights::{Proj, Weights};

/// A token to append: to which slot, and whether its next-token logits are wanted.
#[derive(Debug, Clone, Copy)]
pub struct Token {
    pub slot: usize,
    pub id: u32,
    pub logits: bool,
}

/// A model with a KV cache of `slots` sequences of at most `max_len` tokens.
pub struct Decoder<'a> {
    w: &'a Weights,
    rope: Rope,
    threads: usize,
    max_len: usize,
    /// Per layer: `[slots, max_len, kv_heads * head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: Vec<usize>,
}

impl<'a> Decoder<'a> {
    /// `max_len` is capped at the positions the model runs at (`Arch::positions`).
    pub fn new(w: &'a Weights, slots: usize, max_len: usize, threads: usize) -> Decoder<'a> {
        let c = &w.config;
        let max_len = max_len.min(w.arch.positions);
        let kvw = c.kv_heads() * c.head_dim();
        let size = slots * max_len * kvw;
        Decoder {
            w,
            rope: Rope::new(&w.arch, max_len),
            threads,
            max_len,
            k: (0..c.num_hidden_layers).map(|_| vec![0.0; size]).collect(),
            v: (0..c.num_hidden_layers).map(|_| vec![0.0; size]).collect(),
            len: vec![0; slots],
        }
    }

    /// The longest sequence a slot can hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Sequences the cache holds.
    pub fn slots(&self) -> usize {
        self.len.len()
    }

    /// Tokens held by a slot.
    pub fn len(&self, slot: usize) -> usize {
        self.len[slot]
    }

    /// Empties a slot (its old keys are simply overwritten later).
    pub fn reset(&mut self, slot: usize) {
        self.len[slot] = 0;
    }

    /// Makes slot `to` hold the first `n` tokens of slot `from` (a prompt's keys and values,
    /// shared by the samples of that prompt).
    pub fn copy_prefix(&mut self, from: usize, to: usize, n: usize) {
        assert!(
            n <= self.len[from],
            "slot {from} holds fewer than {n} tokens"
        );
        let kvw = self.w.config.kv_heads() * self.w.config.head_dim();
        let (src, dst) = (from * self.max_len * kvw, to * self.max_len * kvw);
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            cache.copy_within(src..src + n * kvw, dst);
        }
        self.len[to] = n;
    }

    /// Appends `tokens` (in order; several may go to one slot) and returns the logits
    /// `[wanted, vocab]` of the tokens with `logits` set, in their order. Returns an error
    /// message when a slot would overflow `max_len`.
    pub fn feed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, String> {
        let c = &self.w.config;
        let (n, dm, f) = (tokens.len(), c.hidden_size, c.intermediate_size);
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let kvw = kv_heads * hd;
        let eps = c.rms_norm_eps as f32;
        // Positions: each token goes after what its slot holds and the earlier new tokens.
        let mut pos = Vec::with_capacity(n);
        let mut len = self.len.clone();
        for t in tokens {
            if len[t.slot] >= self.max_len {
                return Err(format!(
                    "a sequence would exceed {} tokens (the model's context or the cache)",
                    self.max_len
                ));
            }
            pos.push(len[t.slot] as u32);
            len[t.slot] += 1;
        }
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let mut x = super::llama::embed(self.w, &ids);
        let mut h = vec![0.0f32; n * dm];
        let mut rstd = vec![0.0f32; n];
        let arch = &self.w.arch;
        for l in 0..c.num_hidden_layers {
            let w1 = &self.w.tensors[Weights::layer_index(l, 0)].data;
            ops::rmsnorm(&x, &arch.norm_weight(w1), &mut h, &mut rstd, dm, eps);
            let mut q = self.proj(l, Proj::Q, &h, n);
            let mut k = self.proj(l, Proj::K, &h, n);
            let v = self.proj(l, Proj::V, &h, n);
            if self.w.arch.qk_norm {
                self.qk_norm(l, &mut q, Extra::QNorm);
                self.qk_norm(l, &mut k, Extra::KNorm);
            }
            self.rope.apply(&mut q, &pos, heads, false);
            self.rope.apply(&mut k, &pos, kv_heads, false);
            let (kc, vc) = (&mut self.k[l], &mut self.v[l]);
            for (i, t) in tokens.iter().enumerate() {
                let at = (t.slot * self.max_len + pos[i] as usize) * kvw;
                kc[at..at + kvw].copy_from_slice(&k[i * kvw..(i + 1) * kvw]);
                vc[at..at + kvw].copy_from_slice(&v[i * kvw..(i + 1) * kvw]);
            }
            let attn = self.attend(l, tokens, &pos, &q);
            let ao = self.post_norm(l, Extra::PostAttnNorm, self.proj(l, Proj::O, &attn, n));
            ops::add_into(&mut x, &ao);
            let w2 = &self.w.tensors[Weights::layer_index(l, 5)].data;
            ops::rmsnorm(&x, &arch.norm_weight(w2), &mut h, &mut rstd, dm, eps);
            let g = self.proj(l, Proj::Gate, &h, n);
            let u = self.proj(l, Proj::Up, &h, n);
            let mut act = vec![0.0f32; n * f];
            ops::glu(arch.act, &g, &u, &mut act);
            let m = self.post_norm(l, Extra::PostMlpNorm, self.proj(l, Proj::Down, &act, n));
            ops::add_into(&mut x, &m);
        }
        self.len = len;
        // Final norm and LM head only for the wanted tokens.
        let wanted: Vec<usize> = (0..n).filter(|&i| tokens[i].logits).collect();
        let mut xw = Vec::with_capacity(wanted.len() * dm);
        for &i in &wanted {
            xw.extend_from_slice(&x[i * dm..(i + 1) * dm]);
        }
        let mut hw = vec![0.0f32; xw.len()];
        let mut rw = vec![0.0f32; wanted.len()];
        let wf = &self.w.tensors[self.w.final_norm_index()].data;
        ops::rmsnorm(&xw, &arch.norm_weight(wf), &mut hw, &mut rw, dm, eps);
        let vocab = c.vocab_size;
        let mut logits = vec![0.0f32; wanted.len() * vocab];
        Dense {
            rows: wanted.len(),
            inp: dm,
            out: vocab,
            threads: self.threads,
        }
        .forward(
            &hw,
            &self.w.tensors[self.w.lm_head_index()].data,
            &mut logits,
            false,
        );
        if let Some(cap) = arch.final_softcap {
            ops::softcap(&mut logits, cap);
        }
        Ok(logits)
    }

    /// Gemma 2's norm of a block's output (`which`), when the architecture has it.
    fn post_norm(&self, layer: usize, which: Extra, y: Vec<f32>) -> Vec<f32> {
        match self.w.extra_index(layer, which) {
            Some(wi) => super::llama::norm(self.w, wi, &y).0,
            None => y,
        }
    }

    fn proj(&self, layer: usize, p: Proj, x: &[f32], n: usize) -> Vec<f32> {
        let (out, inp) = p.shape(&self.w.config);
        let mut y = vec![0.0f32; n * out];
        Dense {
            rows: n,
            inp,
            out,
            threads: self.threads,
        }
        .forward(
            x,
            &self.w.tensors[Weights::proj_index(layer, p)].data,
            &mut y,
            false,
        );
        if let Some(bias) = self.w.bias(layer, p) {
            ops::add_bias(&mut y, bias);
        }
        y
    }

    /// Qwen3's RMSNorm of each head of `x` (queries or keys), in place.
    fn qk_norm(&self, layer: usize, x: &mut [f32], which: Extra) {
        let c = &self.w.config;
        let wi = self
            .w
            .extra_index(layer, which)
            .expect("the arch has qk norms");
        let eps = c.rms_norm_eps as f32;
        let w = self.w.arch.norm_weight(&self.w.tensors[wi].data);
        ops::rmsnorm_in_place(x, &w, c.head_dim(), eps);
    }

    /// Softmax attention of every new token's heads over its slot's cache up to itself (or
    /// over the layer's sliding window of it).
    fn attend(&self, layer: usize, tokens: &[Token], pos: &[u32], q: &[f32]) -> Vec<f32> {
        let window = self.w.arch.windows[layer];
        let c = &self.w.config;
        let (heads, hd) = (c.num_attention_heads, c.head_dim());
        let kvw = c.kv_heads() * hd;
        let rep = heads / c.kv_heads();
        let (scale, softcap) = (self.w.arch.attn_scale, self.w.arch.attn_softcap);
        let (kc, vc) = (&self.k[layer], &self.v[layer]);
        let mut out = vec![0.0f32; tokens.len() * heads * hd];
        out.par_chunks_mut(heads * hd)
            .enumerate()
            .for_each(|(i, o)| {
                let base = tokens[i].slot * self.max_len * kvw;
                let span = pos[i] as usize + 1;
                let lo = window.map_or(0, |w| span.saturating_sub(w));
                let mut scores = vec![0.0f32; span - lo];
                for h in 0..heads {
                    let g = h / rep;
                    let qh = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in (lo..).zip(scores.iter_mut()) {
                        let kj = &kc[base + j * kvw + g * hd..base + j * kvw + (g + 1) * hd];
                        *s = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                        if let Some(cap) = softcap {
                            *s = ops::capped(*s, cap);
                        }
                        max = max.max(*s);
                    }
                    let mut sum = 0.0f32;
                    for s in scores.iter_mut() {
                        *s = super::ops::exp(*s - max);
                        sum += *s;
                    }
                    let oh = &mut o[h * hd..(h + 1) * hd];
                    for (j, s) in (lo..).zip(&scores) {
                        let p = s / sum;
                        let vj = &vc[base + j * kvw + g * hd..base + j * kvw + (g + 1) * hd];
                        for (o, v) in oh.iter_mut().zip(vj) {
                            *o += p * v;
                        }
                    }
                }
            });
        out
    }
}

/// `log_softmax(logits)[target]` for one row of logits, in f64 for the sums.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::batch::Batch;
    use crate::cpu::llama::Llama;
    use crate::model::config::ModelConfig;

    fn tiny() -> Weights {
        let config = ModelConfig::new(64, 32, 48, 2, 4, 2, 64, false);
        Weights::init(&config, 5)
    }

    #[test]
    fn cached_decoding_gives_the_full_forward_logits() {
        let w = tiny();
        let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 64).collect();
        let rope = Rope::new(&w.arch, 64);
        let llama = Llama {
            w: &w,
            lora: None,
            rope: &rope,
            threads: 1,
        };
        let batch = Batch {
            rows: 1,
            seq: ids.len(),
            ids: ids.clone(),
            targets: vec![-1; ids.len()],
            pos: (0..ids.len() as u32).collect(),
            seq_ids: None,
            lens: None,
        };
        let full = llama.forward(&batch, None, false).logits;
        let vocab = w.config.vocab_size;
        // Prefill 5 tokens in slot 1 (slot 0 holds an unrelated sequence), then one by one.
        let mut dec = Decoder::new(&w, 2, 64, 1);
        dec.feed(&[Token {
            slot: 0,
            id: 9,
            logits: false,
        }])
        .unwrap();
        let mut got = dec
            .feed(
                &ids[..5]
                    .iter()
                    .map(|&id| Token {
                        slot: 1,
                        id,
                        logits: true,
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        for &id in &ids[5..] {
            let step = dec
                .feed(&[
                    Token {
                        slot: 1,
                        id,
                        logits: true,
                    },
                    Token {
                        slot: 0,
                        id: 1,
                        logits: false,
                    },
                ])
                .unwrap();
            got.extend(step);
        }
        assert_eq!(got.len(), full.len());
        let worst = got
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "max abs logit difference {worst}");
        assert_eq!(dec.len(1), 12);
        assert_eq!(vocab * 12, got.len());
    }

    #[test]
    fn overflowing_a_slot_is_an_error_not_a_panic() {
        let w = tiny();
        let mut dec = Decoder::new(&w, 1, 3, 1);
        let t = Token {
            slot: 0,
            id: 1,
            logits: false,
        };
        assert!(dec.feed(&[t, t, t]).is_ok());
        assert!(dec.feed(&[t]).unwrap_err().contains("exceed 3 tokens"));
    }

    #[test]
    fn log_prob_is_a_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        assert!((log_prob(&l, 2) - (3.0 - z.ln())).abs() < 1e-12);
    }
}
