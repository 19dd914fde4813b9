//! The Llama forward and backward pass on the CPU, hand-scheduled: every matrix product is
//! one `gemm` call over all tokens of the micro-batch, everything else is a fused row-wise
//! kernel, activations are kept once, and gradients go only to what trains (all weights for
//! full finetuning; only the LoRA factors for LoRA, with the base frozen: no weight-sized
//! gradient is ever formed for it).

use super::attention::{self, AttnDropout, Dims, Mask, Span};
use super::batch::Batch;
use super::lora::Adapters;
use super::matmul::Dense;
use super::ops::{self, DropMask, Rope};
use crate::model::arch::Extra;
use crate::model::weights::{Proj, Weights};

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
    /// With query/key norms: their inputs and reciprocal RMS per head.
    qk_normed: Option<QkNormed>,
    /// With norms of the block outputs (Gemma 2): the attention's and the MLP's output
    /// before its norm, and their reciprocal RMS.
    post_normed: Option<[(Vec<f32>, Vec<f32>); 2]>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    h2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    act: Vec<f32>,
    /// Per projection (`Proj as usize`), what its adapter's forward pass kept.
    lora: [Option<LoraKept>; 7],
}

/// What the query and key norms (Qwen3) keep for the backward pass.
struct QkNormed {
    q_in: Vec<f32>,
    k_in: Vec<f32>,
    q_rstd: Vec<f32>,
    k_rstd: Vec<f32>,
}

/// What an adapted projection's forward pass keeps for the backward pass: the adapter's
/// input after dropout (when there is dropout) and `xa = drop(x) A^T`. Without them the
/// backward pass drew each dropout mask twice more, copied the input again and recomputed
/// `xa`: LoRA with PEFT's dropout trained no faster than full finetuning (BENCHMARKS.md).
struct LoraKept {
    dropped: Option<Vec<f32>>,
    xa: Vec<f32>,
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
    fn dims<'s>(&self, spans: &'s [Span]) -> Dims<'s> {
        let c = &self.w.config;
        Dims {
            rows: spans,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
            scale: self.w.arch.attn_scale,
            softcap: self.w.arch.attn_softcap,
        }
    }

    /// Backward of [`Self::norm`]: adds into `dx`, and (full finetuning) into the weight's
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        wi: usize,
        dy: &[f32],
        x: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        full: bool,
        grads: &mut [Vec<f32>],
    ) {
        let w = self.w.arch.norm_weight(&self.w.tensors[wi].data);
        let dw = if full { Some(&mut grads[wi][..]) } else { None };
        ops::rmsnorm_backward(dy, x, &w, rstd, dx, dw, self.w.config.hidden_size);
    }

    /// Gemma 2's norm of a block's output (`which`: `Extra::PostAttnNorm` or
    /// `Extra::PostMlpNorm`), in place; returns what its backward pass needs. Nothing
    /// without such norms.
    fn post_norm(
        &self,
        layer: usize,
        which: Extra,
        y: &mut Vec<f32>,
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        let wi = self.w.extra_index(layer, which)?;
        let (normed, rstd) = norm(self.w, wi, y);
        Some((std::mem::replace(y, normed), rstd))
    }

    /// Backward of [`Self::post_norm`]: the gradient of the block's output before the norm.
    fn post_norm_backward(
        &self,
        layer: usize,
        which: Extra,
        kept: Option<&(Vec<f32>, Vec<f32>)>,
        dy: Vec<f32>,
        full: bool,
        grads: &mut [Vec<f32>],
    ) -> Vec<f32> {
        let Some((x, rstd)) = kept else { return dy };
        let wi = self
            .w
            .extra_index(layer, which)
            .expect("kept only with post norms");
        let mut dx = vec![0.0f32; dy.len()];
        self.norm_backward(wi, &dy, x, rstd, &mut dx, full, grads);
        dx
    }

    /// `y = x W^T (+ scale * (drop(x) A^T) B^T)`; with `keep`, also what the adapter's
    /// backward pass needs.
    fn proj(
        &self,
        layer: usize,
        p: Proj,
        x: &[f32],
        n: usize,
        drop: Option<&Dropouts>,
        keep: bool,
    ) -> (Vec<f32>, Option<LoraKept>) {
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
        if let Some(bias) = self.w.bias(layer, p) {
            ops::add_bias(&mut y, bias);
        }
        if let Some(lora) = self.lora
            && let Some(f) = lora.indices(layer, p)
        {
            let r = lora.spec.rank;
            let (a, b) = (
                &lora.tensors[f.a].data,
                &lora.tensors[f.b].data[f.b_range(r)],
            );
            let site = f.site;
            let dropped = match drop {
                Some(d) if d.lora > 0.0 => {
                    let mut t = x.to_vec();
                    DropMask {
                        seed: d.seed,
                        p: d.lora,
                    }
                    .apply(&mut t, lora_site(layer, site));
                    Some(t)
                }
                _ => None,
            };
            let mut xa = vec![0.0f32; n * r];
            Dense {
                rows: n,
                inp,
                out: r,
                threads: self.threads,
            }
            .forward(dropped.as_deref().unwrap_or(x), a, &mut xa, false);
            let s = lora.spec.scale();
            let xas: Vec<f32> = xa.iter().map(|v| v * s).collect();
            Dense {
                rows: n,
                inp: r,
                out,
                threads: self.threads,
            }
            .forward(&xas, b, &mut y, true);
            return (y, keep.then_some(LoraKept { dropped, xa }));
        }
        (y, None)
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
        kept: Option<&LoraKept>,
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
            if let Some(bi) = self.w.extra_index(layer, Extra::Bias(p)) {
                ops::bias_backward(dy, &mut grads[bi]);
            }
        }
        let Some(lora) = self.lora else { return };
        let Some(f) = lora.indices(layer, p) else {
            return;
        };
        let (r, s) = (lora.spec.rank, lora.spec.scale());
        let (ai, bi, b_rows) = (f.a, f.b, f.b_range(r));
        let (a, b) = (
            &lora.tensors[ai].data,
            &lora.tensors[bi].data[b_rows.clone()],
        );
        let kept = kept.expect("the forward pass kept every adapted projection");
        let mask = drop.filter(|d| d.lora > 0.0).map(|d| DropMask {
            seed: d.seed,
            p: d.lora,
        });
        let xin: &[f32] = kept.dropped.as_deref().unwrap_or(x);
        let xa = &kept.xa;
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
            .dw(dy, xa, &mut grads[bi][b_rows], s, true);
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
                m.reapply(&mut dxl, x, xin, lora_site(layer, f.site));
                ops::add_into(dx, &dxl);
            }
        }
    }

    /// Qwen3's RMSNorm of each query and key head (before RoPE), in place; with `keep`,
    /// its inputs and reciprocal RMS for the backward pass. Nothing without query/key norms.
    fn qk_norm(&self, layer: usize, q: &mut [f32], k: &mut [f32], keep: bool) -> Option<QkNormed> {
        let qi = self.w.extra_index(layer, Extra::QNorm)?;
        let ki = self.w.extra_index(layer, Extra::KNorm)?;
        let hd = self.w.config.head_dim();
        let eps = self.w.config.rms_norm_eps as f32;
        let arch = &self.w.arch;
        let (q_in, q_rstd) =
            ops::rmsnorm_in_place(q, &arch.norm_weight(&self.w.tensors[qi].data), hd, eps);
        let (k_in, k_rstd) =
            ops::rmsnorm_in_place(k, &arch.norm_weight(&self.w.tensors[ki].data), hd, eps);
        keep.then_some(QkNormed {
            q_in,
            k_in,
            q_rstd,
            k_rstd,
        })
    }

    /// Backward of [`Self::qk_norm`]: the gradients of the norms' inputs from those of
    /// their outputs, and (full finetuning) of their weights.
    fn qk_norm_backward(
        &self,
        layer: usize,
        kept: &QkNormed,
        dq: &[f32],
        dk: &[f32],
        full: bool,
        grads: &mut [Vec<f32>],
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.w.config.head_dim();
        let mut back = |dy: &[f32], x: &[f32], rstd: &[f32], extra: Extra| {
            let wi = self
                .w
                .extra_index(layer, extra)
                .expect("kept only with norms");
            let mut dx = vec![0.0f32; dy.len()];
            let dw = if full { Some(&mut grads[wi][..]) } else { None };
            let w = self.w.arch.norm_weight(&self.w.tensors[wi].data);
            ops::rmsnorm_backward(dy, x, &w, rstd, &mut dx, dw, hd);
            dx
        };
        let dq = back(dq, &kept.q_in, &kept.q_rstd, Extra::QNorm);
        let dk = back(dk, &kept.k_in, &kept.k_rstd, Extra::KNorm);
        (dq, dk)
    }

    /// The forward pass over a batch; with `keep`, everything the backward pass needs is kept.
    pub fn forward(&self, batch: &Batch, drop: Option<Dropouts>, keep: bool) -> Forward {
        let c = &self.w.config;
        let arch = &self.w.arch;
        let (n, dm, f) = (batch.tokens(), c.hidden_size, c.intermediate_size);
        let spans = batch.spans();
        let dims = self.dims(&spans);
        let docs = batch.seq_ids.as_deref();
        let mut x = embed(self.w, &batch.ids);
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let (h1, rstd1) = norm(self.w, Weights::layer_index(l, 0), &x);
            let (mut q, kq) = self.proj(l, Proj::Q, &h1, n, drop.as_ref(), keep);
            let (mut k, kk) = self.proj(l, Proj::K, &h1, n, drop.as_ref(), keep);
            let (v, kv) = self.proj(l, Proj::V, &h1, n, drop.as_ref(), keep);
            let qk_normed = self.qk_norm(l, &mut q, &mut k, keep);
            self.rope.apply(&mut q, &batch.pos, dims.heads, false);
            self.rope.apply(&mut k, &batch.pos, dims.kv_heads, false);
            let adrop = attention_dropout(drop.as_ref(), l);
            let mask = Mask {
                docs,
                window: self.w.arch.windows[l],
            };
            let (attn, probs) = attention::forward(dims, &q, &k, &v, mask, adrop);
            let (mut ao, ko) = self.proj(l, Proj::O, &attn, n, drop.as_ref(), keep);
            let post_attn = self.post_norm(l, Extra::PostAttnNorm, &mut ao);
            hidden_dropout(drop.as_ref(), &mut ao, l, 0);
            let mut x2 = x.clone();
            ops::add_into(&mut x2, &ao);
            drop_buf(ao);
            let (h2, rstd2) = norm(self.w, Weights::layer_index(l, 5), &x2);
            let (g, kg) = self.proj(l, Proj::Gate, &h2, n, drop.as_ref(), keep);
            let (u, ku) = self.proj(l, Proj::Up, &h2, n, drop.as_ref(), keep);
            let mut act = vec![0.0f32; n * f];
            ops::glu(arch.act, &g, &u, &mut act);
            let (mut m, kd) = self.proj(l, Proj::Down, &act, n, drop.as_ref(), keep);
            let post_mlp = self.post_norm(l, Extra::PostMlpNorm, &mut m);
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
                    qk_normed,
                    post_normed: post_attn.zip(post_mlp).map(|(a, m)| [a, m]),
                    probs,
                    attn,
                    x2,
                    rstd2,
                    h2,
                    g,
                    u,
                    act,
                    lora: [kq, kk, kv, ko, kg, ku, kd],
                });
            }
        }
        let (hf, rstdf) = norm(self.w, self.w.final_norm_index(), &x);
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
        if let Some(cap) = arch.final_softcap {
            ops::softcap(&mut logits, cap);
        }
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
        let (n, dm) = (batch.tokens(), c.hidden_size);
        let spans = batch.spans();
        let dims = self.dims(&spans);
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
        if let Some(cap) = self.w.arch.final_softcap {
            // The logits before the cap, recomputed (one product) rather than kept.
            let mut raw = vec![0.0f32; logits.len()];
            Dense {
                rows: n,
                inp: dm,
                out: vocab,
                threads: self.threads,
            }
            .forward(&hf, &self.w.tensors[head_i].data, &mut raw, false);
            ops::softcap_backward(&mut logits, &raw, cap);
        }
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
        self.norm_backward(fi, &dh, &xf, &rstdf, &mut dx, full, grads);
        for (l, mut lc) in layers.into_iter().enumerate().rev() {
            let [post_attn, post_mlp] = match &lc.post_normed {
                Some([a, m]) => [Some(a), Some(m)],
                None => [None, None],
            };
            // MLP block: x3 = x2 + drop(post_norm(down(act))).
            let mut dmo = dx.clone();
            hidden_dropout(drop.as_ref(), &mut dmo, l, 1);
            let dmo = self.post_norm_backward(l, Extra::PostMlpNorm, post_mlp, dmo, full, grads);
            let mut dact = vec![0.0f32; lc.act.len()];
            self.proj_backward(
                l,
                Proj::Down,
                &lc.act,
                &dmo,
                &mut dact,
                n,
                drop.as_ref(),
                lc.lora[Proj::Down as usize].as_ref(),
                train,
                grads,
            );
            drop_buf(dmo);
            ops::glu_backward(self.w.arch.act, &dact, &mut lc.g, &mut lc.u);
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
                lc.lora[Proj::Gate as usize].as_ref(),
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
                lc.lora[Proj::Up as usize].as_ref(),
                train,
                grads,
            );
            let i2 = Weights::layer_index(l, 5);
            self.norm_backward(i2, &dh2, &lc.x2, &lc.rstd2, &mut dx, full, grads);
            // Attention block: x2 = x + drop(post_norm(o(attn))).
            let mut dao = dx.clone();
            hidden_dropout(drop.as_ref(), &mut dao, l, 0);
            let dao = self.post_norm_backward(l, Extra::PostAttnNorm, post_attn, dao, full, grads);
            let mut dattn = vec![0.0f32; lc.attn.len()];
            self.proj_backward(
                l,
                Proj::O,
                &lc.attn,
                &dao,
                &mut dattn,
                n,
                drop.as_ref(),
                lc.lora[Proj::O as usize].as_ref(),
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
            if let Some(kept) = &lc.qk_normed {
                (dq, dk) = self.qk_norm_backward(l, kept, &dq, &dk, full, grads);
            }
            let mut dh1 = vec![0.0f32; n * dm];
            self.proj_backward(
                l,
                Proj::Q,
                &lc.h1,
                &dq,
                &mut dh1,
                n,
                drop.as_ref(),
                lc.lora[Proj::Q as usize].as_ref(),
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
                lc.lora[Proj::K as usize].as_ref(),
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
                lc.lora[Proj::V as usize].as_ref(),
                train,
                grads,
            );
            let i1 = Weights::layer_index(l, 0);
            self.norm_backward(i1, &dh1, &lc.x, &lc.rstd1, &mut dx, full, grads);
        }
        if let Some(s) = self.w.arch.embed_scale {
            dx.iter_mut().for_each(|v| *v *= s);
        }
        if full {
            // Rows in order: a fixed summation order for repeated tokens. The padding token's
            // row gets nothing from its lookups, as `nn.Embedding(padding_idx=pad_token_id)`
            // in every transformers family (a tied head's gradient still reaches it).
            let pad = c.pad_token_id;
            let de = &mut grads[0];
            for (row, &id) in dx.chunks(dm).zip(&batch.ids) {
                if Some(id) == pad {
                    continue;
                }
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

/// RMSNorm of `[n, hidden]` rows by the model's tensor `wi` (its `norm_offset` applied):
/// the output and each row's reciprocal RMS.
pub fn norm(w: &Weights, wi: usize, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let dm = w.config.hidden_size;
    let mut y = vec![0.0f32; x.len()];
    let mut rstd = vec![0.0f32; x.len() / dm];
    let weight = w.arch.norm_weight(&w.tensors[wi].data);
    ops::rmsnorm(
        x,
        &weight,
        &mut y,
        &mut rstd,
        dm,
        w.config.rms_norm_eps as f32,
    );
    (y, rstd)
}

/// The embeddings of `ids`, `[ids, hidden]`, times the architecture's embedding scale.
pub fn embed(w: &Weights, ids: &[u32]) -> Vec<f32> {
    let dm = w.config.hidden_size;
    let table = &w.tensors[0].data;
    let mut x = vec![0.0f32; ids.len() * dm];
    for (row, &id) in x.chunks_mut(dm).zip(ids) {
        row.copy_from_slice(&table[id as usize * dm..(id as usize + 1) * dm]);
        if let Some(s) = w.arch.embed_scale {
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
    x
}

/// Frees a buffer at this point (documents intent where a large one dies early).
fn drop_buf(v: Vec<f32>) {
    drop(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::lora::{LoraInit, LoraSpec};
    use crate::model::config::ModelConfig;

    /// A test model with weights of N(0, 0.2) rather than 0.02, so that gradients stand well
    /// above the rounding of the f32 loss, and rank-2 adapters (alpha 4) on every projection
    /// with B drawn non-zero, so that every factor has a gradient.
    fn model_and_adapters(
        c: &ModelConfig,
        weight_seed: u64,
        lora_seed: u64,
        dropout: f32,
    ) -> (Weights, Adapters) {
        let mut w = Weights::init(c, weight_seed);
        for t in w.tensors.iter_mut().filter(|t| t.shape.len() == 2) {
            t.data.iter_mut().for_each(|v| *v *= 10.0);
        }
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            rslora: false,
            dropout,
            targets: Proj::ALL.to_vec(),
        };
        let mut lora = Adapters::init(c, &spec, LoraInit::Gaussian, lora_seed);
        for (i, t) in lora.tensors.iter_mut().enumerate() {
            if t.name.contains("lora_B") {
                t.data = crate::model::weights::normal_vec(
                    &mut crate::data::rng::Rng::new(i as u64),
                    t.data.len(),
                    0.5,
                );
            }
        }
        (w, lora)
    }

    /// LoRA's adapter gradients under dropout are the derivatives of the loss the forward
    /// pass computes with the same masks (central differences in f64 of the f32 loss): the
    /// backward pass reads the masks back from what the forward pass kept, and a mask that
    /// differed between the passes, on an adapter's input or on its input gradient (which
    /// reaches the lower layer's adapters), would fail here.
    #[test]
    fn lora_gradients_under_dropout_match_finite_differences() {
        let c = ModelConfig::new(32, 16, 32, 2, 4, 2, 16, false);
        let (w, lora) = model_and_adapters(&c, 3, 4, 0.3);
        let spec = lora.spec.clone();
        let (rows, seq) = (2, 8);
        let batch = Batch {
            rows,
            seq,
            ids: (0..rows * seq).map(|i| (i * 7 % 32) as u32).collect(),
            targets: (0..rows * seq).map(|i| (i * 5 % 32) as i32).collect(),
            pos: (0..rows * seq).map(|i| (i % seq) as u32).collect(),
            seq_ids: None,
            lens: None,
        };
        let rope = Rope::new(&w.arch, 16);
        let drop = Dropouts {
            lora: 0.3,
            seed: 11,
            ..Dropouts::default()
        };
        let loss = |lora: &Adapters| {
            let m = Llama {
                w: &w,
                lora: Some(lora),
                rope: &rope,
                threads: 1,
            };
            let f = m.forward(&batch, Some(drop), false);
            f.loss_sum / f.targets as f64
        };
        let m = Llama {
            w: &w,
            lora: Some(&lora),
            rope: &rope,
            threads: 1,
        };
        let fwd = m.forward(&batch, Some(drop), true);
        let targets = fwd.targets;
        let mut grads: Vec<Vec<f32>> = lora
            .tensors
            .iter()
            .map(|t| vec![0.0; t.data.len()])
            .collect();
        m.backward(
            fwd,
            &batch,
            1.0 / targets as f32,
            &Trainable::Lora(&lora),
            &mut grads,
        );
        let mut checked = 0;
        for (ti, g) in grads.iter().enumerate() {
            // Layer 0's factors get their gradient through layer 1's masked input gradients.
            let j = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .map(|(j, _)| j)
                .unwrap();
            if g[j].abs() < 1e-3 {
                continue;
            }
            let eps = 1e-3f32;
            let mut plus = Adapters::from_tensors(&c, spec.clone(), lora.tensors.clone());
            plus.tensors[ti].data[j] += eps;
            let mut minus = Adapters::from_tensors(&c, spec.clone(), lora.tensors.clone());
            minus.tensors[ti].data[j] -= eps;
            let fd = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
            let rel = (fd - g[j] as f64).abs() / fd.abs().max(1e-3);
            assert!(
                rel < 0.02,
                "{}[{j}]: backward {} vs finite differences {fd}",
                lora.tensors[ti].name,
                g[j]
            );
            checked += 1;
        }
        assert!(
            checked >= 20,
            "only {checked} of 28 factors had a gradient to check"
        );
    }

    /// A batch without its untrained tails (ragged rows through the attention) gives the
    /// padded batch's loss and gradients, for full finetuning and LoRA, with causal and
    /// per-document masks; what the tails hold (here: arbitrary token ids) does not matter.
    #[test]
    fn cutting_untrained_tails_changes_no_loss_or_gradient() {
        let c = ModelConfig::new(40, 16, 32, 2, 4, 2, 16, false);
        let (w, lora) = model_and_adapters(&c, 5, 6, 0.0);
        let rope = Rope::new(&w.arch, 16);
        // Row 0 trains everywhere but its last position, row 1 up to position 6 (a prompt
        // masked at 0..2), row 2 nowhere.
        let (rows, seq) = (3, 12);
        let trained = |r: usize, t: usize| match r {
            0 => t + 1 < seq,
            1 => (2..7).contains(&t),
            _ => false,
        };
        let mut padded = Batch {
            rows,
            seq,
            lens: None,
            ids: (0..rows * seq).map(|i| (i * 7 % 40) as u32).collect(),
            targets: (0..rows * seq)
                .map(|i| {
                    if trained(i / seq, i % seq) {
                        (i * 5 % 40) as i32
                    } else {
                        -1
                    }
                })
                .collect(),
            pos: (0..rows * seq).map(|i| (i % seq) as u32).collect(),
            seq_ids: None,
        };
        let cut = padded.without_untrained_tails();
        assert_eq!((cut.rows, cut.lens.clone()), (2, Some(vec![11, 7])));
        assert_eq!(cut.target_count(), padded.target_count());
        let documents: Vec<u16> = (0..rows * seq)
            .map(|i| match (i / seq, i % seq) {
                (0, t) => 1 + (t >= 5) as u16,
                (1, t) if t < 7 => 1,
                _ => 0,
            })
            .collect();
        for seq_ids in [None, Some(documents)] {
            padded.seq_ids = seq_ids;
            let cut = padded.without_untrained_tails();
            for adapters in [None, Some(&lora)] {
                let m = Llama {
                    w: &w,
                    lora: adapters,
                    rope: &rope,
                    threads: 2,
                };
                let train = match adapters {
                    Some(l) => Trainable::Lora(l),
                    None => Trainable::Full,
                };
                let grads_of = |b: &Batch| {
                    let fwd = m.forward(b, None, true);
                    let loss = fwd.loss_sum;
                    let sizes: Vec<usize> = match adapters {
                        Some(l) => l.tensors.iter().map(|t| t.data.len()).collect(),
                        None => w.tensors.iter().map(|t| t.data.len()).collect(),
                    };
                    let mut g: Vec<Vec<f32>> = sizes.iter().map(|n| vec![0.0; *n]).collect();
                    m.backward(fwd, b, 1.0, &train, &mut g);
                    (loss, g)
                };
                let (loss_p, grads_p) = grads_of(&padded);
                let (loss_c, grads_c) = grads_of(&cut);
                assert!(
                    (loss_p - loss_c).abs() <= 1e-5 * loss_p.abs(),
                    "loss {loss_p} padded vs {loss_c} cut"
                );
                let mut nonzero = 0;
                for (gp, gc) in grads_p.iter().zip(&grads_c) {
                    let scale = gp.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    nonzero += (scale > 0.0) as usize;
                    for (a, b) in gp.iter().zip(gc) {
                        assert!(
                            (a - b).abs() <= 1e-4 * scale,
                            "gradient {a} padded vs {b} cut"
                        );
                    }
                }
                assert!(nonzero >= grads_p.len() / 2, "too few gradients to compare");
            }
        }
    }
}
