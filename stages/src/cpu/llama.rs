//! The Llama forward and backward pass on the CPU, hand-scheduled: every matrix product is
//! one `gemm` call over all tokens of the micro-batch, everything else is a fused row-wise
//! kernel, activations are kept once, and gradients go only to what trains (all weights for
//! full finetuning; only the LoRA factors for LoRA, with the base frozen: no weight-sized
//! gradient is ever formed for it).

use super::attention::{self, AttnDropout, Dims, Mask};
use super::lora::Adapters;
use super::matmul::Dense;
use super::ops::{self, DropMask, Rope};
use crate::model::weights::{Proj, Weights};

/// One micro-batch of rows.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub seq: usize,
    /// `[rows * seq]` token ids.
    pub ids: Vec<u32>,
    /// `[rows * seq]`: the token position `t` must predict, or -1.
    pub targets: Vec<i32>,
    /// `[rows * seq]` RoPE positions.
    pub pos: Vec<u32>,
    /// Document ids for a block-diagonal mask, or None for plain causal attention.
    pub seq_ids: Option<Vec<u16>>,
}

impl Batch {
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|t| **t >= 0).count()
    }
}

/// Dropout rates of a training step; `seed` varies per step and micro-batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dropouts {
    pub attention: f32,
    pub hidden: f32,
    pub lora: f32,
    pub seed: u64,
}

/// What trains, and so where gradients go.
pub enum Trainable<'a> {
    /// Every weight (gradients shaped like `Weights::tensors`).
    Full,
    /// Only these adapters (gradients shaped like `Adapters::tensors`); the base is frozen.
    Lora(&'a Adapters),
}

/// The model as the forward pass sees it: base weights, optional adapters.
pub struct Llama<'a> {
    pub w: &'a Weights,
    pub lora: Option<&'a Adapters>,
    pub rope: &'a Rope,
    pub threads: usize,
}

struct LayerCache {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
}

/// A forward pass kept for the backward pass.
pub struct Forward {
    /// Summed token loss over the batch's targets.
    pub loss_sum: f64,
    pub targets: usize,
    /// `[rows * seq, vocab]`; when kept for the backward pass, rows with a target hold
    /// their softmax instead (then their gradient, in `backward`).
    pub logits: Vec<f32>,
    layers: Vec<LayerCache>,
    xf: Vec<f32>,
    rstdf: Vec<f32>,
    hf: Vec<f32>,
    drop: Option<Dropouts>,
}

/// Sites of hidden dropout: distinct per layer and place.
fn hidden_site(layer: usize, which: u64) -> u64 {
    (1 << 40) + layer as u64 * 4 + which
}

/// Hidden dropout at a layer's attention (0) or MLP (1) output, in place; the backward pass
/// applies the same mask to the gradient.
fn hidden_dropout(drop: Option<&Dropouts>, x: &mut [f32], layer: usize, which: u64) {
    if let Some(d) = drop.filter(|d| d.hidden > 0.0) {
        DropMask {
            seed: d.seed,
            p: d.hidden,
        }
        .apply(x, hidden_site(layer, which));
    }
}

/// A layer's attention-probability dropout, if any.
fn attention_dropout(drop: Option<&Dropouts>, layer: usize) -> Option<AttnDropout> {
    drop.filter(|d| d.attention > 0.0).map(|d| AttnDropout {
        mask: DropMask {
            seed: d.seed,
            p: d.attention,
        },
        layer: layer as u64,
    })
}

fn lora_site(layer: usize, proj: Proj) -> u64 {
    (2 << 40) + layer as u64 * 16 + proj as u64
}

impl Llama<'_> {
    fn dims(&self, b: &Batch) -> Dims {
        let c = &self.w.config;
        Dims {
            batch: b.rows,
            seq: b.seq,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        }
    }

    /// `y = x W^T (+ scale * (drop(x) A^T) B^T)`.
    fn proj(
        &self,
        layer: usize,
        p: Proj,
        x: &[f32],
        n: usize,
        drop: Option<&Dropouts>,
    ) -> Vec<f32> {
        let c = &self.w.config;
        let (out, inp) = p.shape(c);
        let w = &self.w.tensors[Weights::proj_index(layer, p)].data;
        let mut y = vec![0.0f32; n * out];
        Dense {
            rows: n,
            inp,
            out,
            threads: self.threads,
        }
        .forward(x, w, &mut y, false);
        if let Some(lora) = self.lora
            && let Some((a, b)) = lora.get(layer, p)
        {
            let r = lora.spec.rank;
            let dropped;
            let xin = match drop {
                Some(d) if d.lora > 0.0 => {
                    let mut t = x.to_vec();
                    DropMask {
                        seed: d.seed,
                        p: d.lora,
                    }
                    .apply(&mut t, lora_site(layer, p));
                    dropped = t;
                    &dropped[..]
                }
                _ => x,
            };
            let mut xa = vec![0.0f32; n * r];
            Dense {
                rows: n,
                inp,
                out: r,
                threads: self.threads,
            }
            .forward(xin, a, &mut xa, false);
            let s = lora.spec.scale();
            xa.iter_mut().for_each(|v| *v *= s);
            Dense {
                rows: n,
                inp: r,
                out,
                threads: self.threads,
            }
            .forward(&xa, b, &mut y, true);
        }
        y
    }

    /// Backward of [`Self::proj`]: adds the input gradient into `dx` and the weight (or
    /// adapter) gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn proj_backward(
        &self,
        layer: usize,
        p: Proj,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        n: usize,
        drop: Option<&Dropouts>,
        train: &Trainable,
        grads: &mut [Vec<f32>],
    ) {
        let c = &self.w.config;
        let (out, inp) = p.shape(c);
        let wi = Weights::proj_index(layer, p);
        Dense {
            rows: n,
            inp,
            out,
            threads: self.threads,
        }
        .dx(dy, &self.w.tensors[wi].data, dx, true);
        if matches!(train, Trainable::Full) {
            Dense {
                rows: n,
                inp,
                out,
                threads: self.threads,
            }
            .dw(dy, x, &mut grads[wi], 1.0, true);
        }
        let Some(lora) = self.lora else { return };
        let Some((ai, bi)) = lora.indices(layer, p) else {
            return;
        };
        let (a, b) = (&lora.tensors[ai].data, &lora.tensors[bi].data);
        let (r, s) = (lora.spec.rank, lora.spec.scale());
        let mask = drop.filter(|d| d.lora > 0.0).map(|d| DropMask {
            seed: d.seed,
            p: d.lora,
        });
        let dropped;
        let xin: &[f32] = match mask {
            Some(m) => {
                let mut t = x.to_vec();
                m.apply(&mut t, lora_site(layer, p));
                dropped = t;
                &dropped
            }
            None => x,
        };
        // xa = drop(x) A^T (recomputed: r columns, cheap)
        let mut xa = vec![0.0f32; n * r];
        Dense {
            rows: n,
            inp,
            out: r,
            threads: self.threads,
        }
        .forward(xin, a, &mut xa, false);
        // dxa = s * dy B
        let mut dxa = vec![0.0f32; n * r];
        Dense {
            rows: n,
            inp: r,
            out,
            threads: self.threads,
        }
        .dx(dy, b, &mut dxa, false);
        dxa.iter_mut().for_each(|v| *v *= s);
        if let Trainable::Lora(_) = train {
            // dB += s * dy^T xa ; dA += dxa^T drop(x)
            Dense {
                rows: n,
                inp: r,
                out,
                threads: self.threads,
            }
            .dw(dy, &xa, &mut grads[bi], s, true);
            Dense {
                rows: n,
                inp,
                out: r,
                threads: self.threads,
            }
            .dw(&dxa, xin, &mut grads[ai], 1.0, true);
        }
        // dx += mask * (dxa A): straight into dx unless a dropout mask must apply first.
        let back = Dense {
            rows: n,
            inp,
            out: r,
            threads: self.threads,
        };
        match mask {
            None => back.dx(&dxa, a, dx, true),
            Some(m) => {
                let mut dxl = vec![0.0f32; n * inp];
                back.dx(&dxa, a, &mut dxl, false);
                m.apply(&mut dxl, lora_site(layer, p));
                ops::add_into(dx, &dxl);
            }
        }
    }

    /// The forward pass over a batch; with `keep`, everything the backward pass needs is kept.
    pub fn forward(&self, batch: &Batch, drop: Option<Dropouts>, keep: bool) -> Forward {
        let c = &self.w.config;
        let (n, dm, f) = (batch.rows * batch.seq, c.hidden_size, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let dims = self.dims(batch);
        let mask = match &batch.seq_ids {
            Some(s) => Mask::Document(s),
            None => Mask::Causal,
        };
        let embed = &self.w.tensors[0].data;
        let mut x = vec![0.0f32; n * dm];
        for (row, &id) in x.chunks_mut(dm).zip(&batch.ids) {
            row.copy_from_slice(&embed[id as usize * dm..(id as usize + 1) * dm]);
        }
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let mut h1 = vec![0.0f32; n * dm];
            let mut rstd1 = vec![0.0f32; n];
            let w1 = &self.w.tensors[Weights::layer_index(l, 0)].data;
            ops::rmsnorm(&x, w1, &mut h1, &mut rstd1, dm, eps);
            let mut q = self.proj(l, Proj::Q, &h1, n, drop.as_ref());
            let mut k = self.proj(l, Proj::K, &h1, n, drop.as_ref());
            let v = self.proj(l, Proj::V, &h1, n, drop.as_ref());
            self.rope.apply(&mut q, &batch.pos, dims.heads, false);
            self.rope.apply(&mut k, &batch.pos, dims.kv_heads, false);
            let adrop = attention_dropout(drop.as_ref(), l);
            let (attn, probs) = attention::forward(dims, &q, &k, &v, mask, adrop);
            let mut ao = self.proj(l, Proj::O, &attn, n, drop.as_ref());
            hidden_dropout(drop.as_ref(), &mut ao, l, 0);
            let mut x2 = x.clone();
            ops::add_into(&mut x2, &ao);
            drop_buf(ao);
            let mut h2 = vec![0.0f32; n * dm];
            let mut rstd2 = vec![0.0f32; n];
            let w2 = &self.w.tensors[Weights::layer_index(l, 5)].data;
            ops::rmsnorm(&x2, w2, &mut h2, &mut rstd2, dm, eps);
            let g = self.proj(l, Proj::Gate, &h2, n, drop.as_ref());
            let u = self.proj(l, Proj::Up, &h2, n, drop.as_ref());
            let mut act = vec![0.0f32; n * f];
            ops::swiglu(&g, &u, &mut act);
            let mut m = self.proj(l, Proj::Down, &act, n, drop.as_ref());
            hidden_dropout(drop.as_ref(), &mut m, l, 1);
            let mut x3 = x2.clone();
            ops::add_into(&mut x3, &m);
            let x_in = std::mem::replace(&mut x, x3);
            if keep {
                layers.push(LayerCache {
                    x: x_in,
                    rstd1,
                    h1,
                    q,
                    k,
                    v,
                    probs,
                    attn,
                    x2,
                    rstd2,
                    h2,
                    g,
                    u,
                    act,
                });
            }
        }
        let mut hf = vec![0.0f32; n * dm];
        let mut rstdf = vec![0.0f32; n];
        let wf = &self.w.tensors[self.w.final_norm_index()].data;
        ops::rmsnorm(&x, wf, &mut hf, &mut rstdf, dm, eps);
        let vocab = c.vocab_size;
        let mut logits = vec![0.0f32; n * vocab];
        let head = &self.w.tensors[self.w.lm_head_index()].data;
        Dense {
            rows: n,
            inp: dm,
            out: vocab,
            threads: self.threads,
        }
        .forward(&hf, head, &mut logits, false);
        let loss_sum = ops::cross_entropy(&mut logits, &batch.targets, vocab, keep);
        Forward {
            loss_sum,
            targets: batch.target_count(),
            logits,
            layers,
            xf: x,
            rstdf,
            hf,
            drop,
        }
    }

    /// Backpropagates `grad_scale * loss_sum` (grad_scale = 1 / targets of the whole
    /// optimizer step) and adds the gradients of what trains into `grads`.
    pub fn backward(
        &self,
        fwd: Forward,
        batch: &Batch,
        grad_scale: f32,
        train: &Trainable,
        grads: &mut [Vec<f32>],
    ) {
        let c = &self.w.config;
        let (n, dm) = (batch.rows * batch.seq, c.hidden_size);
        let dims = self.dims(batch);
        let vocab = c.vocab_size;
        let full = matches!(train, Trainable::Full);
        let drop = fwd.drop;
        let Forward {
            mut logits,
            layers,
            xf,
            rstdf,
            hf,
            ..
        } = fwd;
        ops::cross_entropy_backward(&mut logits, &batch.targets, vocab, grad_scale);
        let head_i = self.w.lm_head_index();
        let mut dh = vec![0.0f32; n * dm];
        Dense {
            rows: n,
            inp: dm,
            out: vocab,
            threads: self.threads,
        }
        .dx(&logits, &self.w.tensors[head_i].data, &mut dh, false);
        if full {
            Dense {
                rows: n,
                inp: dm,
                out: vocab,
                threads: self.threads,
            }
            .dw(&logits, &hf, &mut grads[head_i], 1.0, true);
        }
        drop_buf(logits);
        let mut dx = vec![0.0f32; n * dm];
        let fi = self.w.final_norm_index();
        ops::rmsnorm_backward(
            &dh,
            &xf,
            &self.w.tensors[fi].data,
            &rstdf,
            &mut dx,
            if full { Some(&mut grads[fi]) } else { None },
            dm,
        );
        for (l, mut lc) in layers.into_iter().enumerate().rev() {
            // MLP block: x3 = x2 + drop(down(act)).
            let mut dmo = dx.clone();
            hidden_dropout(drop.as_ref(), &mut dmo, l, 1);
            let mut dact = vec![0.0f32; lc.act.len()];
            self.proj_backward(
                l,
                Proj::Down,
                &lc.act,
                &dmo,
                &mut dact,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            drop_buf(dmo);
            ops::swiglu_backward(&dact, &mut lc.g, &mut lc.u);
            drop_buf(dact);
            let mut dh2 = vec![0.0f32; n * dm];
            self.proj_backward(
                l,
                Proj::Gate,
                &lc.h2,
                &lc.g,
                &mut dh2,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            self.proj_backward(
                l,
                Proj::Up,
                &lc.h2,
                &lc.u,
                &mut dh2,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            let i2 = Weights::layer_index(l, 5);
            ops::rmsnorm_backward(
                &dh2,
                &lc.x2,
                &self.w.tensors[i2].data,
                &lc.rstd2,
                &mut dx,
                if full { Some(&mut grads[i2]) } else { None },
                dm,
            );
            // Attention block: x2 = x + drop(o(attn)).
            let mut dao = dx.clone();
            hidden_dropout(drop.as_ref(), &mut dao, l, 0);
            let mut dattn = vec![0.0f32; lc.attn.len()];
            self.proj_backward(
                l,
                Proj::O,
                &lc.attn,
                &dao,
                &mut dattn,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            drop_buf(dao);
            let adrop = attention_dropout(drop.as_ref(), l);
            let (mut dq, mut dk, dv) =
                attention::backward(dims, &lc.q, &lc.k, &lc.v, &lc.probs, &dattn, adrop);
            drop_buf(dattn);
            self.rope.apply(&mut dq, &batch.pos, dims.heads, true);
            self.rope.apply(&mut dk, &batch.pos, dims.kv_heads, true);
            let mut dh1 = vec![0.0f32; n * dm];
            self.proj_backward(
                l,
                Proj::Q,
                &lc.h1,
                &dq,
                &mut dh1,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            self.proj_backward(
                l,
                Proj::K,
                &lc.h1,
                &dk,
                &mut dh1,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            self.proj_backward(
                l,
                Proj::V,
                &lc.h1,
                &dv,
                &mut dh1,
                n,
                drop.as_ref(),
                train,
                grads,
            );
            let i1 = Weights::layer_index(l, 0);
            ops::rmsnorm_backward(
                &dh1,
                &lc.x,
                &self.w.tensors[i1].data,
                &lc.rstd1,
                &mut dx,
                if full { Some(&mut grads[i1]) } else { None },
                dm,
            );
        }
        if full {
            // Rows in order: a fixed summation order for repeated tokens.
            let de = &mut grads[0];
            for (row, &id) in dx.chunks(dm).zip(&batch.ids) {
                for (g, v) in de[id as usize * dm..(id as usize + 1) * dm]
                    .iter_mut()
                    .zip(row)
                {
                    *g += v;
                }
            }
        }
    }
}

/// Frees a buffer at this point (documents intent where a large one dies early).
fn drop_buf(v: Vec<f32>) {
    drop(v);
}
