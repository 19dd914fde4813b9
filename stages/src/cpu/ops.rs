//! Element-wise and row-wise pieces of the Llama forward and backward pass, fused by hand:
//! each reads its inputs once and writes its outputs once (burn's CPU backend materialises
//! every intermediate of these, which is where most of its time went).

use rayon::prelude::*;

use crate::model::arch::{Act, Arch};

/// Rows per parallel task in row-wise kernels: large enough to amortize scheduling.
const ROW_CHUNK: usize = 16;

/// RMSNorm as Hugging Face's Llama: `y = w * x / sqrt(mean(x^2) + eps)`, in f32. Saves
/// `1/sqrt(...)` per row for the backward pass.
pub fn rmsnorm(x: &[f32], w: &[f32], y: &mut [f32], rstd: &mut [f32], d: usize, eps: f32) {
    y.par_chunks_mut(d * ROW_CHUNK)
        .zip(rstd.par_chunks_mut(ROW_CHUNK))
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(d).zip(r.iter_mut()).zip(x.chunks(d)) {
                let ss: f32 = x.iter().map(|v| v * v).sum();
                let s = 1.0 / (ss / d as f32 + eps).sqrt();
                *r = s;
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * (x * s);
                }
            }
        });
}

/// [`rmsnorm`] of every `d`-wide row of `x` in place (Qwen3's per-head query/key norms):
/// returns the input and the reciprocal RMS of each row, what [`rmsnorm_backward`] needs.
pub fn rmsnorm_in_place(x: &mut [f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let input = x.to_vec();
    let mut rstd = vec![0.0f32; x.len() / d];
    rmsnorm(&input, w, x, &mut rstd, d, eps);
    (input, rstd)
}

/// Backward of [`rmsnorm`]: `dx += ...`; `dw += sum over rows` when given (rows summed in
/// order, so the result does not depend on threads).
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    d: usize,
) {
    dx.par_chunks_mut(d * ROW_CHUNK)
        .zip(dy.par_chunks(d * ROW_CHUNK))
        .zip(x.par_chunks(d * ROW_CHUNK))
        .zip(rstd.par_chunks(ROW_CHUNK))
        .for_each(|(((dx, dy), x), r)| {
            for (((dx, dy), x), &s) in dx.chunks_mut(d).zip(dy.chunks(d)).zip(x.chunks(d)).zip(r) {
                let dot: f32 = dy.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = dot * s * s / d as f32;
                for (((dx, g), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                    *dx += s * (g * w - x * c);
                }
            }
        });
    if let Some(dw) = dw {
        // Columns in parallel, rows in order within each column block: deterministic.
        let cols = 64.min(d).max(1);
        dw.par_chunks_mut(cols).enumerate().for_each(|(ci, dw)| {
            let c0 = ci * cols;
            for ((dy, x), &s) in dy.chunks(d).zip(x.chunks(d)).zip(rstd) {
                for (j, dw) in dw.iter_mut().enumerate() {
                    *dw += dy[c0 + j] * x[c0 + j] * s;
                }
            }
        });
    }
}

/// `y[r] += b` for every row of `y` (`[rows, b.len()]`): a projection's bias.
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len() * ROW_CHUNK).for_each(|rows| {
        for row in rows.chunks_mut(b.len()) {
            for (y, b) in row.iter_mut().zip(b) {
                *y += b;
            }
        }
    });
}

/// Backward of [`add_bias`]: `db += sum over rows of dy`, rows in order within each column
/// block (deterministic whatever the threads).
pub fn bias_backward(dy: &[f32], db: &mut [f32]) {
    let d = db.len();
    let cols = 64.min(d).max(1);
    db.par_chunks_mut(cols).enumerate().for_each(|(ci, db)| {
        let c0 = ci * cols;
        for row in dy.chunks(d) {
            for (j, g) in db.iter_mut().enumerate() {
                *g += row[c0 + j];
            }
        }
    });
}

/// cos and sin of RoPE angles, `[positions, head_dim/2]`, computed as `transformers` does
/// (f32 inverse frequencies and products), so logits agree to float rounding.
pub struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    /// The tables of an architecture: its inverse frequencies (`Arch::inv_freq`, scaling
    /// applied), one per pair of a head's dimensions, and its factor of cos and sin.
    pub fn new(arch: &Arch, positions: usize) -> Rope {
        Rope::with_freqs(&arch.inv_freq, arch.rope_factor, positions)
    }

    /// The tables of these frequencies, cos and sin times `factor` (as transformers'
    /// `attention_scaling`, in f32).
    pub fn with_freqs(inv: &[f32], factor: f32, positions: usize) -> Rope {
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in inv {
                let a = p as f32 * f;
                if factor == 1.0 {
                    cos.push(a.cos());
                    sin.push(a.sin());
                } else {
                    cos.push(a.cos() * factor);
                    sin.push(a.sin() * factor);
                }
            }
        }
        Rope { half, cos, sin }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of `x` (`[rows, heads * head_dim]`) in place by its row's position
    /// (`rotate_half` convention). `inverse` applies the transpose (the backward pass).
    pub fn apply(&self, x: &mut [f32], pos: &[u32], heads: usize, inverse: bool) {
        let h = self.half;
        let width = heads * 2 * h;
        x.par_chunks_mut(width * ROW_CHUNK)
            .zip(pos.par_chunks(ROW_CHUNK))
            .for_each(|(x, pos)| {
                for (row, &p) in x.chunks_mut(width).zip(pos) {
                    let c = &self.cos[p as usize * h..(p as usize + 1) * h];
                    let s = &self.sin[p as usize * h..(p as usize + 1) * h];
                    for head in row.chunks_mut(2 * h) {
                        let (a, b) = head.split_at_mut(h);
                        for i in 0..h {
                            let (x1, x2) = (a[i], b[i]);
                            if inverse {
                                a[i] = x1 * c[i] + x2 * s[i];
                                b[i] = x2 * c[i] - x1 * s[i];
                            } else {
                                a[i] = x1 * c[i] - x2 * s[i];
                                b[i] = x2 * c[i] + x1 * s[i];
                            }
                        }
                    }
                }
            });
    }
}

/// e^x by Cephes' `expf` (reduction by ln 2 in two parts, a degree-5 polynomial; within
/// 2 ulp of the exact value, tested), written without calls or branches so that loops over
/// slices vectorize: libm's scalar `expf` was 8% of a training step (attention softmax,
/// SwiGLU, cross-entropy). Below x = -69 it returns 0: what softmax and sigmoid take from
/// e^-69 (1e-30) is far below f32's resolution of their results, and the tiny values it
/// would give instead become subnormal once a softmax divides them by its sum, which makes
/// every product they enter a hundred times slower (a first version clamped at -87.3 and
/// returned 1e-38 there: LoRA r=64 slowed from 3300 to 500 tokens/s as its logits spread).
/// Above 88.3 it returns e^88.3; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Round to nearest by adding 1.5 * 2^23: exact for |k| < 2^22, and it vectorizes where
    // `round` does not (SSE2).
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ZERO_BELOW: f32 = -69.0;
    let xc = x.clamp(ZERO_BELOW, 88.376_26);
    let k = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = (p * r * r + r + 1.0) * f32::from_bits((((k as i32) + 127) as u32) << 23);
    if x < ZERO_BELOW { 0.0 } else { y }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The constants of GELU's tanh approximation, `0.5 x (1 + tanh(K (x + C x^3)))`; the burn
/// graph uses them too.
pub const GELU_K: f32 = 0.797_884_6; // sqrt(2 / pi)
pub const GELU_C: f32 = 0.044715;

/// GELU's tanh approximation, as PyTorch's `gelu(approximate="tanh")`, and its derivative.
fn gelu_tanh(x: f32) -> (f32, f32) {
    const K: f32 = GELU_K;
    const C: f32 = GELU_C;
    let t = (K * (x + C * x * x * x)).tanh();
    let y = 0.5 * x * (1.0 + t);
    let dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K * (1.0 + 3.0 * C * x * x);
    (y, dy)
}

/// A gated MLP's activation: `a = act(g) * u` (SwiGLU with silu, GeGLU with GELU-tanh).
pub fn glu(act: Act, g: &[f32], u: &[f32], a: &mut [f32]) {
    const CHUNK: usize = 4096;
    a.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(u.par_chunks(CHUNK))
        .for_each(|((a, g), u)| match act {
            // Its own loop: the silu one vectorizes.
            Act::Silu => {
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *a = g * sigmoid(g) * u;
                }
            }
            Act::GeluTanh => {
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *a = gelu_tanh(g).0 * u;
                }
            }
        });
}

/// Backward of [`glu`], in place: `g` becomes dG and `u` becomes dU (both are dead after
/// this in the backward pass, which saves two activation-sized buffers).
pub fn glu_backward(act: Act, da: &[f32], g: &mut [f32], u: &mut [f32]) {
    const CHUNK: usize = 4096;
    g.par_chunks_mut(CHUNK)
        .zip(u.par_chunks_mut(CHUNK))
        .zip(da.par_chunks(CHUNK))
        .for_each(|((g, u), da)| {
            for ((g, u), &d) in g.iter_mut().zip(u.iter_mut()).zip(da) {
                let (y, dy) = match act {
                    Act::Silu => {
                        let s = sigmoid(*g);
                        (*g * s, s * (1.0 + *g * (1.0 - s)))
                    }
                    Act::GeluTanh => gelu_tanh(*g),
                };
                let dg = d * *u * dy;
                *u = d * y;
                *g = dg;
            }
        });
}

/// Soft capping of one value, `cap * tanh(x / cap)` (Gemma 2's scores and logits).
#[inline]
pub fn capped(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// The derivative of [`capped`] at `x`: `1 - tanh(x / cap)^2`.
#[inline]
pub fn capped_grad(x: f32, cap: f32) -> f32 {
    let t = (x / cap).tanh();
    1.0 - t * t
}

/// [`capped`] over `x`, in place.
pub fn softcap(x: &mut [f32], cap: f32) {
    x.par_chunks_mut(8192)
        .for_each(|x| x.iter_mut().for_each(|v| *v = capped(*v, cap)));
}

/// Backward of [`softcap`] from its input `x`: `dy *= capped_grad(x)`, in place.
pub fn softcap_backward(dy: &mut [f32], x: &[f32], cap: f32) {
    dy.par_chunks_mut(8192)
        .zip(x.par_chunks(8192))
        .for_each(|(dy, x)| {
            for (d, &x) in dy.iter_mut().zip(x) {
                *d *= capped_grad(x, cap);
            }
        });
}

/// Cross-entropy of `logits` (`[rows, vocab]`) against `targets` (-1 = none); returns the
/// summed loss in f64. With `to_probs`, each row with a target is left holding its softmax
/// (what the backward pass needs): one `exp` per element in all, and no copy of the logits.
pub fn cross_entropy(logits: &mut [f32], targets: &[i32], vocab: usize, to_probs: bool) -> f64 {
    let mut losses = vec![0.0f64; targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(losses.par_iter_mut())
        .for_each(|((row, &t), loss)| {
            if t < 0 {
                return;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let target = row[t as usize];
            let sum: f32 = if to_probs {
                // The exponentials first (a loop that vectorizes), then their sum in order.
                row.iter_mut().for_each(|v| *v = exp(*v - max));
                let sum: f32 = row.iter().sum();
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
                sum
            } else {
                row.iter().map(|v| exp(v - max)).sum()
            };
            *loss = (max + sum.ln() - target) as f64;
        });
    losses.iter().sum()
}

/// The gradient of `scale * cross_entropy` from the probabilities [`cross_entropy`] left:
/// `scale * (p - onehot(target))`, zero for rows without a target. In place.
pub fn cross_entropy_backward(probs: &mut [f32], targets: &[i32], vocab: usize, scale: f32) {
    probs
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .for_each(|(row, &t)| {
            if t < 0 {
                row.fill(0.0);
                return;
            }
            row.iter_mut().for_each(|v| *v *= scale);
            row[t as usize] -= scale;
        });
}

/// Adds `b` into `a`.
pub fn add_into(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(8192)
        .zip(b.par_chunks(8192))
        .for_each(|(a, b)| {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

/// A counter-based random stream for dropout masks: the keep decision of element `i` of
/// site `site` is a pure function of (seed, site, i), so the backward pass regenerates the
/// forward pass's mask instead of storing it, and threads cannot change it.
#[derive(Debug, Clone, Copy)]
pub struct DropMask {
    pub seed: u64,
    pub p: f32,
}

impl DropMask {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The stream of one site, hashed once per buffer instead of once per element.
    fn site_key(&self, site: u64) -> u64 {
        Self::mix(self.seed ^ Self::mix(site.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// An element is kept when its 16-bit draw is at least this (p is rounded to 1/65536).
    fn threshold(&self) -> u64 {
        (self.p as f64 * 65536.0).round() as u64
    }

    /// Whether element `i` of `site` is kept: the 16-bit lane `i % 4` of the hash of `i / 4`.
    /// One 64-bit hash serves four elements: masks drawn for every LoRA input and attention
    /// matrix (three times a step) cost a quarter of hashing each element, which made LoRA
    /// training slower than full finetuning.
    #[inline]
    pub fn keep(&self, site: u64, i: u64) -> bool {
        let z = Self::mix(self.site_key(site) ^ (i / 4));
        ((z >> (16 * (i % 4))) & 0xFFFF) >= self.threshold()
    }

    /// `x *= mask / (1 - p)` for elements `start..start + x.len()` of a site's stream
    /// (`start` a multiple of 4), on the calling thread. Sixteen elements at a time from four
    /// independent hashes, through a factor array, so the multiplies vectorize and the hashes
    /// overlap (2x faster than one decision at a time, measured).
    pub fn apply_serial(&self, x: &mut [f32], site: u64, start: usize) {
        debug_assert!(start.is_multiple_of(4));
        if self.p <= 0.0 {
            return;
        }
        let (key, t) = (self.site_key(site), self.threshold());
        let scale = 1.0 / (1.0 - self.p);
        let factor = |z: u64, lane: usize| {
            if ((z >> (16 * lane)) & 0xFFFF) >= t {
                scale
            } else {
                0.0
            }
        };
        let first = (start / 4) as u64;
        let done = (x.len() / 16 * 4) as u64;
        let mut blocks = x.chunks_exact_mut(16);
        for (b, block) in (&mut blocks).enumerate() {
            let g = first + 4 * b as u64;
            let z = [0, 1, 2, 3].map(|q| Self::mix(key ^ (g + q)));
            let mut f = [0.0f32; 16];
            for (i, f) in f.iter_mut().enumerate() {
                *f = factor(z[i / 4], i % 4);
            }
            for (v, f) in block.iter_mut().zip(f) {
                *v *= f;
            }
        }
        for (q, quad) in blocks.into_remainder().chunks_mut(4).enumerate() {
            let z = Self::mix(key ^ (first + done + q as u64));
            for (lane, v) in quad.iter_mut().enumerate() {
                *v *= factor(z, lane);
            }
        }
    }

    /// `x *= mask / (1 - p)` for a whole buffer of `site`, in parallel.
    pub fn apply(&self, x: &mut [f32], site: u64) {
        const CHUNK: usize = 4096;
        x.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, x)| self.apply_serial(x, site, c * CHUNK));
    }

    /// [`Self::apply`] to `g` with the mask read back from a buffer it was applied to:
    /// `dropped = x * mask / (1 - p)` is non-zero exactly where the mask kept a non-zero
    /// `x`, so only elements where `x` is 0 need their draw again. The backward pass of a
    /// dropout thus costs no hashing; the factors, and so the bits, are the same.
    pub fn reapply(&self, g: &mut [f32], x: &[f32], dropped: &[f32], site: u64) {
        const CHUNK: usize = 4096;
        assert!(g.len() == x.len() && x.len() == dropped.len());
        if self.p <= 0.0 {
            return;
        }
        let scale = 1.0 / (1.0 - self.p);
        g.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dropped.par_chunks(CHUNK)))
            .enumerate()
            .for_each(|(c, (g, (x, d)))| {
                for (i, ((g, &x), &d)) in g.iter_mut().zip(x).zip(d).enumerate() {
                    let kept = if d != 0.0 {
                        true
                    } else if x != 0.0 {
                        false
                    } else {
                        self.keep(site, (c * CHUNK + i) as u64)
                    };
                    *g *= if kept { scale } else { 0.0 };
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable exp is within 2 ulp of the exact value (f64) from -69 to 88.3,
    /// sampled densely, exact at 0, and exactly 0 below -69 (never subnormal).
    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        for x in [-69.01f32, -80.0, -87.5, -100.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        let mut worst = 0.0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -69.0f32 + (88.3 + 69.0) * i as f32 / n as f32;
            let exact = (x as f64).exp();
            let ulp = (exact as f32).to_bits();
            let ulp = (f32::from_bits(ulp + 1) - f32::from_bits(ulp)) as f64;
            worst = worst.max((exp(x) as f64 - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let d = 6;
        let x: Vec<f32> = vec![
            0.3, -1.2, 0.7, 2.0, -0.4, 0.9, 1.1, 0.2, -0.8, 0.5, 0.1, -1.5,
        ];
        let w: Vec<f32> = vec![1.1, 0.9, 1.3, 0.7, 1.0, 1.2];
        let dy: Vec<f32> = vec![
            0.5, -0.2, 0.1, 0.9, -0.7, 0.3, 0.2, 0.4, -0.6, 0.8, -0.1, 0.05,
        ];
        let f = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; x.len()];
            let mut r = vec![0.0; x.len() / d];
            rmsnorm(x, w, &mut y, &mut r, d, 1e-5);
            y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut y = vec![0.0; 12];
        let mut r = vec![0.0; 2];
        rmsnorm(&x, &w, &mut y, &mut r, d, 1e-5);
        let mut dx = vec![0.0; 12];
        let mut dw = vec![0.0; 6];
        rmsnorm_backward(&dy, &x, &w, &r, &mut dx, Some(&mut dw), d);
        let h = 1e-3;
        for i in 0..12 {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += h;
            b[i] -= h;
            let num = (f(&a, &w) - f(&b, &w)) / (2.0 * h as f64);
            assert!(
                (num - dx[i] as f64).abs() < 1e-3,
                "dx[{i}] {num} vs {}",
                dx[i]
            );
        }
        for i in 0..6 {
            let (mut a, mut b) = (w.clone(), w.clone());
            a[i] += h;
            b[i] -= h;
            let num = (f(&x, &a) - f(&x, &b)) / (2.0 * h as f64);
            assert!(
                (num - dw[i] as f64).abs() < 1e-3,
                "dw[{i}] {num} vs {}",
                dw[i]
            );
        }
    }

    #[test]
    fn rope_inverse_undoes_rope() {
        let inv: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0))
            .collect();
        let rope = Rope::with_freqs(&inv, 1.0, 16);
        let mut x: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
        let orig = x.clone();
        let pos = [0u32, 5, 15];
        rope.apply(&mut x, &pos, 2, false);
        assert!(
            x[16..]
                .iter()
                .zip(&orig[16..])
                .any(|(a, b)| (a - b).abs() > 1e-3)
        );
        rope.apply(&mut x, &pos, 2, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn dropout_masks_keep_about_1_minus_p_and_repeat() {
        let m = DropMask { seed: 7, p: 0.25 };
        let kept = (0..100_000).filter(|&i| m.keep(3, i)).count();
        assert!((kept as f64 / 1e5 - 0.75).abs() < 0.01, "{kept}");
        assert_eq!(m.keep(3, 17), m.keep(3, 17));
        let differs = (0..1000).filter(|&i| m.keep(3, i) != m.keep(4, i)).count();
        assert!(differs > 200, "sites are independent: {differs}");
        // The buffer form applies exactly the per-element decisions, from any aligned start.
        let mut x = vec![1.0f32; 10_000];
        m.apply(&mut x, 3);
        for (i, v) in x.iter().enumerate() {
            assert_eq!(
                *v,
                if m.keep(3, i as u64) { 1.0 / 0.75 } else { 0.0 },
                "{i}"
            );
        }
        for (at, len) in [(8192, 100), (4, 37), (9996, 4)] {
            let mut part = vec![1.0f32; len];
            m.apply_serial(&mut part, 3, at);
            assert_eq!(part[..], x[at..at + len], "{at}+{len}");
        }
        // Read back from a dropped buffer (zeros in the input included), the mask is the same.
        let input: Vec<f32> = (0..10_000)
            .map(|i| if i % 7 == 0 { 0.0 } else { i as f32 - 5e3 })
            .collect();
        let mut dropped = input.clone();
        m.apply(&mut dropped, 3);
        let mut g = vec![1.0f32; 10_000];
        m.reapply(&mut g, &input, &dropped, 3);
        assert_eq!(g, x);
    }
}
