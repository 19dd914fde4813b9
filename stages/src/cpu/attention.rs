//! Causal self-attention with grouped-query heads, an optional block-diagonal (per document)
//! mask, an optional sliding window and attention dropout, forward and backward. Rows may differ in length (a batch
//! without its untrained tails, see `Batch::without_untrained_tails`): each row is a span of
//! the token axis and its attention a `len x len` problem. One task per (row, key/value
//! head): the query heads sharing a key/value head run in order inside it, so their key and
//! value gradients are summed without atomics and in a fixed order.

use rayon::prelude::*;

use super::matmul::{Layout, gemm_into};
use super::ops::{DropMask, capped, capped_grad, exp};

/// Which keys a query may attend to, besides the causal rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mask<'a> {
    /// Document ids (`seq_ids`, one per token of the batch; 0 is padding, which attends
    /// only to itself): only earlier positions of the same document. None: the whole row.
    pub docs: Option<&'a [u16]>,
    /// A layer's sliding window (`Arch::windows`): at most this many latest keys, the
    /// query's own included.
    pub window: Option<usize>,
}

/// One row of a batch: where its tokens start on the token axis and how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Dims<'a> {
    pub rows: &'a [Span],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Of the scores `q . k` (`Arch::attn_scale`).
    pub scale: f32,
    /// `cap * tanh(s / cap)` of the scaled scores before the mask (`Arch::attn_softcap`).
    pub softcap: Option<f32>,
}

impl Dims<'_> {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn tokens(&self) -> usize {
        self.rows.last().map_or(0, |r| r.start + r.len)
    }

    /// Query head `h` of row `b` as a `len x head_dim` matrix inside q (or dO, dQ).
    fn q_rows(&self, b: usize, h: usize) -> Layout {
        Layout {
            off: self.rows[b].start * self.q_width() + h * self.head_dim,
            rs: self.q_width() as isize,
            cs: 1,
        }
    }

    /// Key/value head `g` of row `b` as a `len x head_dim` matrix inside k or v.
    fn kv_rows(&self, b: usize, g: usize) -> Layout {
        Layout {
            off: self.rows[b].start * self.kv_width() + g * self.head_dim,
            rs: self.kv_width() as isize,
            cs: 1,
        }
    }

    /// The same head transposed: `head_dim x len` (for Q K^T and dO V^T).
    fn kv_cols(&self, b: usize, g: usize) -> Layout {
        Layout {
            rs: 1,
            cs: self.kv_width() as isize,
            ..self.kv_rows(b, g)
        }
    }

    /// Where row `b`'s probability matrices (`heads` of `len x len`) start in the buffer
    /// of all of them; entry `rows.len()` is the buffer's length.
    fn prob_offsets(&self) -> Vec<usize> {
        let mut offs = Vec::with_capacity(self.rows.len() + 1);
        let mut at = 0;
        for r in self.rows {
            offs.push(at);
            at += self.heads * r.len * r.len;
        }
        offs.push(at);
        offs
    }
}

/// Whether query `i` of the row starting at token `start` may attend to key `j` of it.
pub fn allowed(mask: Mask, start: usize, i: usize, j: usize) -> bool {
    if j > i || mask.window.is_some_and(|w| i - j >= w) {
        return false;
    }
    match mask.docs {
        None => true,
        Some(seq) => {
            let (si, sj) = (seq[start + i], seq[start + j]);
            i == j || (si != 0 && si == sj)
        }
    }
}

/// Softmax of row `i` of a `t x t` score matrix over the keys query `i` may see; the
/// others (every later key, keys outside the window, other documents' keys) become 0.
fn masked_softmax_row(row: &mut [f32], mask: Mask, start: usize, i: usize) {
    let (seen, later) = row.split_at_mut(i + 1);
    later.fill(0.0);
    let lo = mask.window.map_or(0, |w| (i + 1).saturating_sub(w));
    let (outside, seen) = seen.split_at_mut(lo);
    outside.fill(0.0);
    match mask.docs {
        // Every key of the window: straight loops, so that the exponentials vectorize.
        None => {
            let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            seen.iter_mut().for_each(|s| *s = exp(*s - max));
        }
        Some(_) => {
            let mut max = f32::NEG_INFINITY;
            for (j, s) in seen.iter().enumerate() {
                if allowed(mask, start, i, lo + j) {
                    max = max.max(*s);
                }
            }
            for (j, s) in seen.iter_mut().enumerate() {
                *s = if allowed(mask, start, i, lo + j) {
                    exp(*s - max)
                } else {
                    0.0
                };
            }
        }
    }
    let sum: f32 = seen.iter().sum();
    let inv = 1.0 / sum;
    for s in seen.iter_mut() {
        *s *= inv;
    }
}

/// Dropout applied to attention probabilities, with the site numbering of one layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnDropout {
    pub mask: DropMask,
    /// Distinguishes layers (and steps, through the mask's seed).
    pub layer: u64,
}

impl AttnDropout {
    fn site(&self, d: &Dims, b: usize, h: usize) -> u64 {
        (self.layer * d.rows.len() as u64 + b as u64) * d.heads as u64 + h as u64
    }

    /// `p *= keep / (1 - p)` over the `len x len` probability matrix of head (b, h).
    fn apply(&self, d: &Dims, b: usize, h: usize, p: &mut [f32]) {
        self.mask.apply_serial(p, self.site(d, b, h), 0);
    }
}

/// The probabilities the values see: `p` itself, or `p` with head (b, h)'s dropout applied
/// in `used` (the backward pass regenerates the same mask).
fn dropped<'a>(
    dropout: Option<&AttnDropout>,
    d: &Dims,
    b: usize,
    h: usize,
    p: &'a [f32],
    used: &'a mut [f32],
) -> &'a [f32] {
    match dropout {
        Some(drop) => {
            used.copy_from_slice(p);
            drop.apply(d, b, h, used);
            used
        }
        None => p,
    }
}

/// Forward: returns the attention output `[tokens, heads*head_dim]` and the probabilities
/// before dropout, per row `[heads, len, len]` one row after another (what the backward
/// pass needs).
pub fn forward(
    d: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Mask,
    dropout: Option<AttnDropout>,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, rep, scale) = (d.head_dim, d.rep(), d.scale);
    let offs = d.prob_offsets();
    let mut probs = vec![0.0f32; offs[d.rows.len()]];
    // Task (b, g) owns the probability matrices of heads g*rep .. (g+1)*rep of row b.
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(d.rows.len() * d.kv_heads);
    let mut rest = probs.as_mut_slice();
    for (b, row) in d.rows.iter().enumerate() {
        for g in 0..d.kv_heads {
            let (mine, after) = std::mem::take(&mut rest).split_at_mut(rep * row.len * row.len);
            tasks.push((b, g, mine));
            rest = after;
        }
    }
    let outs: Vec<Vec<f32>> = tasks
        .into_par_iter()
        .map(|(b, g, probs)| {
            let Span { start, len: t } = d.rows[b];
            let mut out = vec![0.0f32; rep * t * hd];
            let mut used = if dropout.is_some() {
                vec![0.0f32; t * t]
            } else {
                Vec::new()
            };
            for r in 0..rep {
                let h = g * rep + r;
                let p = &mut probs[r * t * t..(r + 1) * t * t];
                gemm_into(
                    t,
                    t,
                    hd,
                    p,
                    Layout::rows(t, false),
                    q,
                    d.q_rows(b, h),
                    k,
                    d.kv_cols(b, g),
                    scale,
                    false,
                    1,
                );
                if let Some(cap) = d.softcap {
                    p.iter_mut().for_each(|s| *s = capped(*s, cap));
                }
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    masked_softmax_row(row, mask, start, i);
                }
                let pv = dropped(dropout.as_ref(), &d, b, h, p, &mut used);
                gemm_into(
                    t,
                    hd,
                    t,
                    &mut out[r * t * hd..(r + 1) * t * hd],
                    Layout::rows(hd, false),
                    pv,
                    Layout::rows(t, false),
                    v,
                    d.kv_rows(b, g),
                    1.0,
                    false,
                    1,
                );
            }
            out
        })
        .collect();
    let mut o = vec![0.0f32; d.tokens() * d.q_width()];
    for (task, out) in outs.iter().enumerate() {
        let (b, g) = (task / d.kv_heads, task % d.kv_heads);
        let Span { start, len: t } = d.rows[b];
        for r in 0..rep {
            let h = g * rep + r;
            for i in 0..t {
                let dst = (start + i) * d.q_width() + h * hd;
                o[dst..dst + hd].copy_from_slice(&out[(r * t + i) * hd..(r * t + i + 1) * hd]);
            }
        }
    }
    (o, probs)
}

/// Backward: from dO, returns (dQ, dK, dV) in the layouts of q, k, v.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    d: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_out: &[f32],
    dropout: Option<AttnDropout>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hd, rep, scale) = (d.head_dim, d.rep(), d.scale);
    let offs = d.prob_offsets();
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..d.rows.len() * d.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, g) = (task / d.kv_heads, task % d.kv_heads);
            let t = d.rows[b].len;
            let kv_at = d.kv_rows(b, g);
            let mut dq = vec![0.0f32; rep * t * hd];
            let mut dk = vec![0.0f32; t * hd];
            let mut dv = vec![0.0f32; t * hd];
            let mut dp = vec![0.0f32; t * t];
            let mut used = if dropout.is_some() {
                vec![0.0f32; t * t]
            } else {
                Vec::new()
            };
            let mut scores = if d.softcap.is_some() {
                vec![0.0f32; t * t]
            } else {
                Vec::new()
            };
            for r in 0..rep {
                let h = g * rep + r;
                let p = &probs[offs[b] + h * t * t..offs[b] + (h + 1) * t * t];
                let q_at = d.q_rows(b, h);
                let pu = dropped(dropout.as_ref(), &d, b, h, p, &mut used);
                // dV += Pu^T dO
                gemm_into(
                    t,
                    hd,
                    t,
                    &mut dv,
                    Layout::rows(hd, false),
                    pu,
                    Layout::rows(t, true),
                    d_out,
                    q_at,
                    1.0,
                    true,
                    1,
                );
                // dPu = dO V^T
                gemm_into(
                    t,
                    t,
                    hd,
                    &mut dp,
                    Layout::rows(t, false),
                    d_out,
                    q_at,
                    v,
                    d.kv_cols(b, g),
                    1.0,
                    false,
                    1,
                );
                if let Some(drop) = &dropout {
                    drop.apply(&d, b, h, &mut dp);
                }
                // dS = P * (dP - rowsum(P * dP)), zero where masked (P is zero there).
                for i in 0..t {
                    let pr = &p[i * t..(i + 1) * t];
                    let dr = &mut dp[i * t..(i + 1) * t];
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot);
                    }
                }
                if let Some(cap) = d.softcap {
                    // Through the cap: dS *= 1 - tanh(s / cap)^2, the scores recomputed
                    // (one product) rather than kept (`heads x len x len` more memory).
                    gemm_into(
                        t,
                        t,
                        hd,
                        &mut scores,
                        Layout::rows(t, false),
                        q,
                        q_at,
                        k,
                        d.kv_cols(b, g),
                        scale,
                        false,
                        1,
                    );
                    for (x, &s) in dp.iter_mut().zip(&scores) {
                        *x *= capped_grad(s, cap);
                    }
                }
                // dQ = scale * dS K ; dK += scale * dS^T Q
                gemm_into(
                    t,
                    hd,
                    t,
                    &mut dq[r * t * hd..(r + 1) * t * hd],
                    Layout::rows(hd, false),
                    &dp,
                    Layout::rows(t, false),
                    k,
                    kv_at,
                    scale,
                    false,
                    1,
                );
                gemm_into(
                    t,
                    hd,
                    t,
                    &mut dk,
                    Layout::rows(hd, false),
                    &dp,
                    Layout::rows(t, true),
                    q,
                    q_at,
                    scale,
                    true,
                    1,
                );
            }
            (dq, dk, dv)
        })
        .collect();
    let n = d.tokens();
    let mut dq = vec![0.0f32; n * d.q_width()];
    let mut dk = vec![0.0f32; n * d.kv_width()];
    let mut dv = vec![0.0f32; n * d.kv_width()];
    for (task, (pq, pk, pv)) in parts.iter().enumerate() {
        let (b, g) = (task / d.kv_heads, task % d.kv_heads);
        let Span { start, len: t } = d.rows[b];
        for i in 0..t {
            let kv = (start + i) * d.kv_width() + g * hd;
            dk[kv..kv + hd].copy_from_slice(&pk[i * hd..(i + 1) * hd]);
            dv[kv..kv + hd].copy_from_slice(&pv[i * hd..(i + 1) * hd]);
            for r in 0..rep {
                let h = g * rep + r;
                let qi = (start + i) * d.q_width() + h * hd;
                dq[qi..qi + hd].copy_from_slice(&pq[(r * t + i) * hd..(r * t + i + 1) * hd]);
            }
        }
    }
    (dq, dk, dv)
}
