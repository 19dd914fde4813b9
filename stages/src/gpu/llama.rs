//! The model's forward pass as burn tensor operations, mirroring `cpu::llama` (same layout
//! of parameters, same `Arch` variations, same RoPE convention, same targets); burn's
//! autodiff differentiates it.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Distribution, FloatDType, Int, Tensor, TensorData};

use crate::cpu::batch::Batch;
use crate::cpu::llama::Dropouts;
use crate::cpu::lora::Factors;
use crate::cpu::ops::{GELU_C, GELU_K, Rope};
use crate::model::arch::{Act, Arch, Extra};
use crate::model::config::ModelConfig;
use crate::model::weights::{Proj, Weights, extra_index};

/// Uploads a host tensor (any rank, viewed as 2D: vectors become one row).
pub fn upload(data: &[f32], shape: &[usize], device: &Device) -> Tensor<2> {
    let (rows, cols) = match shape {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        other => panic!("parameters are 1D or 2D, not {other:?}"),
    };
    Tensor::<2>::from_data(TensorData::new(data.to_vec(), [rows, cols]), device)
}

/// Downloads a 2D tensor.
pub fn download(t: &Tensor<2>) -> Vec<f32> {
    t.to_data()
        .try_to_vec::<f32>()
        .expect("f32 tensors read back as f32")
}

/// What one forward pass needs besides parameters, uploaded once per micro-batch.
pub struct Inputs {
    ids: Tensor<1, Int>,
    /// cos and sin per token, `[N, head_dim / 2]` ([`rope_tables`]).
    cos: Tensor<2>,
    sin: Tensor<2>,
    /// Which keys each query may see, `[B, 1, T, T]`, one per distinct layer window: made
    /// on the device from indices and document ids ([`attention_mask`]); none for the fused
    /// attention kernels, which decide it per query and key from the document ids.
    masks: WindowMasks,
    /// For the fused attention kernels (`super::flash`), instead of masks: the document ids
    /// `[B, T]` (packed rows with `attention = "document"`) as f32, ones for rows without
    /// documents.
    kernel_docs: Option<Tensor<2>>,
    /// `[N, 1]`: 0 at the padding token, 1 elsewhere, when the batch holds the padding
    /// token (whose embedding row gets no gradient from lookups, as in transformers).
    not_pad: Option<Tensor<2>>,
    /// Target ids `[N, 1]` (0 where none) and weights `[N, 1]` (1 where a target).
    targets: Tensor<2, Int>,
    weights: Tensor<2>,
    rows: usize,
    seq: usize,
}

impl Inputs {
    /// With the whole masks, for attention that materializes its scores.
    pub fn new(w: &Weights, b: &Batch, device: &Device) -> Inputs {
        Inputs::build(w, b, device, true)
    }

    /// For the fused attention kernels (`super::flash`, without masks) where they compute
    /// this model's attention ([`fused_attention_applies`]), else with the masks.
    pub fn for_fused(w: &Weights, b: &Batch, drop: Option<&Dropouts>, device: &Device) -> Inputs {
        Inputs::build(w, b, device, !fused_attention_applies(&w.arch, drop))
    }

    fn build(w: &Weights, b: &Batch, device: &Device, whole_masks: bool) -> Inputs {
        let c = &w.config;
        let n = b.rows * b.seq;
        // The CPU engine's RoPE tables and attention rule: both paths see the same numbers.
        let positions = b.pos.iter().max().map_or(1, |&p| p as usize + 1);
        let (cos, sin) = rope_tables(&Rope::new(&w.arch, positions), &b.pos, device);
        // Rows of one length only: the CPU engine alone takes batches without their tails.
        assert!(b.lens.is_none(), "the burn model takes rectangular batches");
        let docs = b
            .seq_ids
            .as_deref()
            .map(|d| doc_ids(b.rows, b.seq, d, device));
        let windows: &[Option<usize>] = if whole_masks { &w.arch.windows } else { &[] };
        let masks = WindowMasks::new(windows, |window| {
            mask_of(b.rows, b.seq, docs.as_ref(), window, device)
        });
        let kernel_docs = (!whole_masks).then(|| match docs {
            Some(d) => d.float(),
            None => Tensor::ones([b.rows, b.seq], device),
        });
        let ids: Vec<i64> = b.ids.iter().map(|&i| i as i64).collect();
        let not_pad = c.pad_token_id.filter(|p| b.ids.contains(p)).map(|p| {
            let m: Vec<f32> = b.ids.iter().map(|&i| f32::from(i != p)).collect();
            Tensor::<2>::from_data(TensorData::new(m, [n, 1]), device)
        });
        let tg: Vec<i64> = b.targets.iter().map(|&t| t.max(0) as i64).collect();
        let w: Vec<f32> = b
            .targets
            .iter()
            .map(|&t| if t >= 0 { 1.0 } else { 0.0 })
            .collect();
        Inputs {
            ids: Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), device),
            cos,
            sin,
            masks,
            kernel_docs,
            not_pad,
            targets: Tensor::<2, Int>::from_data(TensorData::new(tg, [n, 1]), device),
            weights: Tensor::<2>::from_data(TensorData::new(w, [n, 1]), device),
            rows: b.rows,
            seq: b.seq,
        }
    }
}

/// Whether the fused attention kernels compute this model's attention: nothing may sit
/// between the scores and the softmax but the mask, so not with a soft cap (Gemma 2) or
/// attention dropout.
pub fn fused_attention_applies(arch: &Arch, drop: Option<&Dropouts>) -> bool {
    arch.attn_softcap.is_none() && drop.is_none_or(|d| d.attention == 0.0)
}

/// The sum of every element, `[1]`, in an order that is the same on every run. burn's own
/// `sum` (cubecl's one-shot sum) adds the partial sums of several cubes atomically, in
/// whatever order they finish: the same run twice could differ in the last bits, and so
/// could a run and its resumed copy. A reduction along one axis has a fixed order.
pub fn total<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    let n = x.shape().num_elements();
    x.reshape([1, n]).sum_dim(1).reshape([1])
}

/// The CPU engine's cos and sin tables at these positions, `[tokens, head_dim / 2]` each:
/// one angle per pair of a head's columns (`d`, `d + half`), as `super::rope` takes them.
pub fn rope_tables(rope: &Rope, pos: &[u32], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let half = rope.half;
    let gather = |table: &[f32]| -> Tensor<2> {
        let rows: Vec<f32> = pos
            .iter()
            .flat_map(|&p| &table[p as usize * half..(p as usize + 1) * half])
            .copied()
            .collect();
        Tensor::<2>::from_data(TensorData::new(rows, [pos.len(), half]), device)
    };
    (gather(&rope.cos), gather(&rope.sin))
}

/// The CPU engine's attention rule (`cpu::attention::allowed`) as a device tensor
/// `[rows, 1, t, t]`, true where query `i` may see key `j`: `j <= i`, within the window, and
/// in the same document (`docs`, 0 = padding, which sees only itself). Made on the device from
/// the indices and the `rows x t` document ids: nothing quadratic is built on the host or
/// uploaded (a host-made f32 mask was 268 MB per micro-batch at seq 4096, batch 4).
pub fn attention_mask(
    rows: usize,
    t: usize,
    docs: Option<&[u16]>,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4, Bool> {
    let docs = docs.map(|d| doc_ids(rows, t, d, device));
    mask_of(rows, t, docs.as_ref(), window, device)
}

/// The `rows x t` document ids on the device.
pub fn doc_ids(rows: usize, t: usize, docs: &[u16], device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = docs.iter().map(|&d| i64::from(d)).collect();
    Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, t]), device)
}

/// [`attention_mask`] from document ids already on the device.
fn mask_of(
    rows: usize,
    t: usize,
    docs: Option<&Tensor<2, Int>>,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4, Bool> {
    let c = t;
    let qi: Tensor<2, Int> = Tensor::<1, Int>::arange(0..t as i64, device)
        .reshape([c, 1])
        .expand([c, t]);
    let kj: Tensor<2, Int> = Tensor::<1, Int>::arange(0..t as i64, device)
        .reshape([1, t])
        .expand([c, t]);
    let back = qi - kj; // i - j
    let seen: Tensor<4, Bool> = visible(back.clone(), window)
        .reshape([1, 1, c, t])
        .expand([rows, 1, c, t]);
    let Some(doc) = docs else {
        return seen;
    };
    let di: Tensor<4, Int> = doc.clone().reshape([rows, 1, c, 1]).expand([rows, 1, c, t]);
    let dj: Tensor<4, Int> = doc.clone().reshape([rows, 1, 1, t]).expand([rows, 1, c, t]);
    let same = di.clone().equal(dj).bool_and(di.not_equal_elem(0));
    let own: Tensor<4, Bool> = back
        .equal_elem(0)
        .reshape([1, 1, c, t])
        .expand([rows, 1, c, t]);
    seen.bool_and(same.bool_or(own))
}

/// Causal visibility within a window, from `back` = query position - key position: the
/// key is at or before the query and, with a window, fewer than `window` positions back
/// (the CPU engine's `cpu::attention::allowed` without documents).
pub fn visible<const D: usize>(back: Tensor<D, Int>, window: Option<usize>) -> Tensor<D, Bool> {
    let seen = back.clone().greater_equal_elem(0);
    match window {
        Some(w) => seen.bool_and(back.lower_elem(w as i64)),
        None => seen,
    }
}

/// One attention mask per distinct layer window (Gemma 2 alternates a sliding and a global
/// one), made once per forward pass and looked up by each layer.
pub struct WindowMasks(Vec<(Option<usize>, Tensor<4, Bool>)>);

impl WindowMasks {
    pub fn new(
        windows: &[Option<usize>],
        make: impl Fn(Option<usize>) -> Tensor<4, Bool>,
    ) -> WindowMasks {
        let mut masks: Vec<(Option<usize>, Tensor<4, Bool>)> = Vec::new();
        for &window in windows {
            if !masks.iter().any(|(w, _)| *w == window) {
                masks.push((window, make(window)));
            }
        }
        WindowMasks(masks)
    }

    /// The mask of a layer with this window.
    pub fn of(&self, window: Option<usize>) -> Tensor<4, Bool> {
        self.0
            .iter()
            .find(|(w, _)| *w == window)
            .map(|(_, m)| m.clone())
            .expect("a mask for every layer's window")
    }
}

/// LoRA factors on the device, by (layer, projection): where A `[r, in]` and B
/// `[module out, r]` are among the uploaded tensors, and the projection's rows of B.
pub struct DeviceLora {
    pub scale: f32,
    pub factors: std::collections::BTreeMap<(usize, Proj), Factors>,
}

/// The model's parameters on a device, in `Weights` order, plus LoRA tensors if any.
///
/// `dtype` is what matmuls and activations compute in (see `super::precision`): the
/// residual stream, norms, softmax and logits stay f32 whatever it is, and parameters are
/// cast to it where a matmul takes them (a no-op for those already in it; the cast's
/// gradient is f32 for f32 master weights). With f32 every cast is a no-op.
pub struct DeviceModel<'a> {
    pub config: &'a ModelConfig,
    pub arch: &'a Arch,
    pub w: &'a [Tensor<2>],
    pub lora: Option<(&'a DeviceLora, &'a [Tensor<2>])>,
    pub device: &'a Device,
    /// What matmuls and activations compute in.
    pub dtype: FloatDType,
}

fn dropout<const D: usize>(x: Tensor<D>, p: f32, device: &Device) -> Tensor<D> {
    if p <= 0.0 {
        return x;
    }
    let keep = Tensor::<D>::random(x.shape(), Distribution::Bernoulli(1.0 - p as f64), device);
    let dtype: FloatDType = x.dtype().into();
    x * keep.div_scalar(1.0 - p).cast(dtype)
}

/// The dropout seed of layer `l` in a micro-batch whose seed is `seed`.
fn layer_seed(seed: u64, l: usize) -> u64 {
    crate::data::rng::Rng::new(seed)
        .fork(&format!("layer-{l}"))
        .next_u64()
}

/// In f32 (the residual stream's, the norms' and the loss's type).
fn f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.cast(FloatDType::F32)
}

impl DeviceModel<'_> {
    /// In the compute type.
    fn low<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.cast(self.dtype)
    }

    /// RMSNorm, in f32 whatever the input's type (as transformers' `LlamaRMSNorm`).
    fn rms(&self, x: Tensor<2>, w: &Tensor<2>) -> Tensor<2> {
        let eps = self.config.rms_norm_eps as f32;
        let x = f32(x);
        let ms = x.clone().powi_scalar(2).mean_dim(1);
        let w = f32(w.clone());
        let w = if self.arch.norm_offset == 0.0 {
            w
        } else {
            w.add_scalar(self.arch.norm_offset)
        };
        x * ms.add_scalar(eps).sqrt().recip() * w
    }

    /// Gemma 2's norm of a block's output, when the architecture has it.
    fn post_norm(&self, layer: usize, e: Extra, y: Tensor<2>) -> Tensor<2> {
        match self.extra(layer, e) {
            Some(w) => self.rms(y, w),
            None => y,
        }
    }

    /// The MLP's gate activation.
    fn act(&self, g: Tensor<2>) -> Tensor<2> {
        match self.arch.act {
            Act::Silu => silu(g),
            // PyTorch's `gelu(approximate="tanh")`; burn's `gelu` is the erf form.
            Act::GeluTanh => {
                let inner = (g.clone() + g.clone().powi_scalar(3).mul_scalar(GELU_C))
                    .mul_scalar(GELU_K)
                    .tanh();
                g.mul_scalar(0.5) * inner.add_scalar(1.0)
            }
        }
    }

    /// A layer's optional tensor, if the architecture has it.
    fn extra(&self, layer: usize, e: Extra) -> Option<&Tensor<2>> {
        extra_index(self.config, self.arch, layer, e).map(|i| &self.w[i])
    }

    /// Per-head RMSNorm (Qwen3's q_norm/k_norm) when the architecture has it.
    fn head_norm(&self, layer: usize, x: Tensor<2>, heads: usize, e: Extra) -> Tensor<2> {
        let Some(w) = self.extra(layer, e) else {
            return x;
        };
        let n = x.dims()[0];
        let hd = self.config.head_dim();
        self.low(self.rms(x.reshape([n * heads, hd]), w))
            .reshape([n, heads * hd])
    }

    fn proj(&self, layer: usize, p: Proj, x: Tensor<2>, drop: Option<&Dropouts>) -> Tensor<2> {
        self.projs(layer, &[p], x, drop).remove(0)
    }

    /// Projections of one input (q, k and v; gate and up) as one matmul against their
    /// weights stacked (cast to the compute type in the same pass), split by columns after,
    /// each piece with its bias and LoRA update: one large matmul where there were two or
    /// three, and one read of the input; the backward joins the pieces' gradients in one
    /// pass (`super::split`).
    fn projs(
        &self,
        layer: usize,
        ps: &[Proj],
        x: Tensor<2>,
        drop: Option<&Dropouts>,
    ) -> Vec<Tensor<2>> {
        let weights: Vec<Tensor<2>> = ps
            .iter()
            .map(|&p| self.w[Weights::proj_index(layer, p)].clone())
            .collect();
        let widths: Vec<usize> = weights.iter().map(|w| w.dims()[0]).collect();
        let w = match weights.len() {
            1 => weights.into_iter().next().expect("one weight"),
            _ => Tensor::cat(weights, 0),
        };
        let x = self.low(x);
        let y = x.clone().matmul(self.low(w).transpose());
        let pieces = match ps.len() {
            1 => vec![y],
            _ => super::split::split_columns(y, &widths),
        };
        ps.iter()
            .zip(pieces)
            .map(|(&p, mut y)| {
                if let Some(b) = self.extra(layer, Extra::Bias(p)) {
                    y = y + self.low(b.clone());
                }
                self.lora_update(layer, p, x.clone(), y, drop)
            })
            .collect()
    }

    /// `y` plus the projection's LoRA update of its input `x`, where it has an adapter.
    fn lora_update(
        &self,
        layer: usize,
        p: Proj,
        x: Tensor<2>,
        y: Tensor<2>,
        drop: Option<&Dropouts>,
    ) -> Tensor<2> {
        let Some((l, t)) = self.lora else {
            return y;
        };
        let Some(f) = l.factors.get(&(layer, p)) else {
            return y;
        };
        let xin = match drop {
            Some(d) if d.lora > 0.0 => dropout(x, d.lora, self.device),
            _ => x,
        };
        let xa = xin.matmul(self.low(t[f.a].clone()).transpose());
        let [rows, r] = t[f.b].dims();
        let b = self.low(t[f.b].clone());
        let b = if f.rows == (0..rows) {
            b
        } else {
            b.slice([f.rows.clone(), 0..r])
        };
        y + xa.matmul(b.transpose()).mul_scalar(l.scale)
    }

    /// Token embeddings `[tokens, hidden]` in f32, the residual stream's type (scaled where
    /// the architecture says so).
    pub fn embed(&self, ids: Tensor<1, Int>, not_pad: Option<&Tensor<2>>) -> Tensor<2> {
        let mut x = f32(self.w[0].clone().select(0, ids));
        if let Some(m) = not_pad {
            // The same values; the gradient of the padding token's lookups is cut.
            x = x.clone() * m.clone() + x.detach() * m.clone().neg().add_scalar(1.0);
        }
        match self.arch.embed_scale {
            Some(s) => x.mul_scalar(s),
            None => x,
        }
    }

    /// One decoder layer over `[tokens, hidden]`. `attend` takes the layer index and the
    /// rotated q `[tokens, heads * head_dim]`, k and v `[tokens, kv_heads * head_dim]` and
    /// returns the attention output `[tokens, heads * head_dim]`: training attends within
    /// the batch, the decoder over its KV cache.
    pub fn layer(
        &self,
        l: usize,
        x: Tensor<2>,
        rope: (&Tensor<2>, &Tensor<2>),
        drop: Option<&Dropouts>,
        attend: &mut dyn FnMut(usize, Tensor<2>, Tensor<2>, Tensor<2>) -> Tensor<2>,
    ) -> Tensor<2> {
        let c = self.config;
        let (h, hk) = (c.num_attention_heads, c.kv_heads());
        if let Some(d) = drop {
            // Each layer's masks from its own seed: a block recomputed on its own (activation
            // checkpointing) draws the masks it drew in the forward pass.
            self.device.seed(layer_seed(d.seed, l));
        }
        let h1 = self.rms(x.clone(), &self.w[Weights::layer_index(l, 0)]);
        let [q, k, v]: [Tensor<2>; 3] = self
            .projs(l, &[Proj::Q, Proj::K, Proj::V], h1, drop)
            .try_into()
            .expect("three projections");
        let q = self.head_norm(l, q, h, Extra::QNorm);
        let k = self.head_norm(l, k, hk, Extra::KNorm);
        // RoPE in the rotate-half layout, one kernel each way, in q's and k's type.
        let rotate = |x: Tensor<2>| super::rope::rope(x, rope.0, rope.1);
        let (q, k) = (rotate(q), rotate(k));
        let attn = attend(l, q, k, v);
        let ao = f32(self.proj(l, Proj::O, attn, drop));
        let mut ao = self.post_norm(l, Extra::PostAttnNorm, ao);
        if let Some(d) = drop.filter(|d| d.hidden > 0.0) {
            ao = dropout(ao, d.hidden, self.device);
        }
        let x2 = x + ao;
        let h2 = self.rms(x2.clone(), &self.w[Weights::layer_index(l, 5)]);
        let [g, u]: [Tensor<2>; 2] = self
            .projs(l, &[Proj::Gate, Proj::Up], h2, drop)
            .try_into()
            .expect("two projections");
        let mut m = f32(self.proj(l, Proj::Down, self.act(g) * u, drop));
        m = self.post_norm(l, Extra::PostMlpNorm, m);
        if let Some(d) = drop.filter(|d| d.hidden > 0.0) {
            m = dropout(m, d.hidden, self.device);
        }
        x2 + m
    }

    /// Scaled dot-product attention: q `[b, heads, t, hd]` over k and v
    /// `[b, kv_heads, keys, hd]` (grouped-query heads shared), where `allowed`
    /// `[b, 1, t, keys]` is true; returns `[b * t, heads * hd]`. The products run in the
    /// compute type, the scaling, soft cap, mask and softmax in f32.
    pub fn attention(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        allowed: Tensor<4, Bool>,
        drop: Option<&Dropouts>,
    ) -> Tensor<2> {
        let c = self.config;
        let (h, hk, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let [b, _, t, _] = q.dims();
        let keys = k.dims()[2];
        let expand = |z: Tensor<4>| -> Tensor<4> {
            if h == hk {
                return z;
            }
            let z5: Tensor<5> = z.reshape([b, hk, 1, keys, hd]);
            z5.repeat_dim(2, h / hk).reshape([b, h, keys, hd])
        };
        let mut scores = f32(self.low(q).matmul(expand(self.low(k)).swap_dims(2, 3)))
            .mul_scalar(self.arch.attn_scale);
        if let Some(cap) = self.arch.attn_softcap {
            scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
        }
        // Masked scores become -1e9: exp gives 0 there, as the CPU engine's softmax.
        let scores = scores.mask_fill(allowed.bool_not(), -1e9);
        let mut p = softmax(scores, 3);
        if let Some(d) = drop.filter(|d| d.attention > 0.0) {
            p = dropout(p, d.attention, self.device);
        }
        self.low(p)
            .matmul(expand(self.low(v)))
            .swap_dims(1, 2)
            .reshape([b * t, h * hd])
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, hidden]`: final norm, LM head,
    /// soft cap.
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let c = self.config;
        let fi = 1 + c.num_hidden_layers * crate::model::weights::PER_LAYER;
        let hf = self.low(self.rms(x, &self.w[fi]));
        let head = if c.tie_word_embeddings {
            &self.w[0]
        } else {
            &self.w[fi + 1]
        };
        let logits = f32(hf.matmul(self.low(head.clone()).transpose()));
        match self.arch.final_softcap {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// Summed loss over the targets (a `[1]` tensor; differentiable when the parameters are).
    pub fn loss_sum(&self, inp: &Inputs, drop: Option<&Dropouts>) -> Tensor<1> {
        let mut x = self.embed_inputs(inp);
        for l in 0..self.config.num_hidden_layers {
            x = self.block(l, x, inp, drop);
        }
        self.head_loss(x, inp)
    }

    /// The batch's token embeddings, the first block's input.
    pub fn embed_inputs(&self, inp: &Inputs) -> Tensor<2> {
        self.embed(inp.ids.clone(), inp.not_pad.as_ref())
    }

    /// Decoder layer `l` over the batch: attention within its rows, by the fused kernels
    /// where the inputs were made for them ([`Inputs::for_fused`]), else under its masks.
    pub fn block(
        &self,
        l: usize,
        x: Tensor<2>,
        inp: &Inputs,
        drop: Option<&Dropouts>,
    ) -> Tensor<2> {
        let c = self.config;
        let (b, t) = (inp.rows, inp.seq);
        let (h, hk, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let mut attend = |l: usize, q: Tensor<2>, k: Tensor<2>, v: Tensor<2>| {
            let heads =
                |z: Tensor<2>, n: usize| -> Tensor<4> { z.reshape([b, t, n, hd]).swap_dims(1, 2) };
            let window = self.arch.windows[l];
            let Some(docs) = &inp.kernel_docs else {
                let mask = inp.masks.of(window);
                return self.attention(heads(q, h), heads(k, hk), heads(v, hk), mask, drop);
            };
            assert!(
                fused_attention_applies(self.arch, drop),
                "inputs for the fused attention kernels, which have no soft cap or dropout"
            );
            let qkv = [heads(f32(q), h), heads(f32(k), hk), heads(f32(v), hk)];
            super::flash::attention(qkv, docs.clone(), self.arch.attn_scale, window)
                .swap_dims(1, 2)
                .reshape([b * t, h * hd])
        };
        self.layer(l, x, (&inp.cos, &inp.sin), drop, &mut attend)
    }

    /// Summed loss of the last block's output over the batch's targets: final norm, LM
    /// head, then cross-entropy in f32 as `logsumexp(z) - z[target]` per row, which keeps
    /// one `[tokens, vocab]` tensor for the backward pass (the exponentials) where a
    /// log-softmax made and kept its own beside them. The row maximum is a constant to
    /// autodiff: the result does not depend on it.
    pub fn head_loss(&self, x: Tensor<2>, inp: &Inputs) -> Tensor<1> {
        let z = self.logits(x);
        let m = z.clone().max_dim(1).detach();
        let lse = (z.clone() - m.clone()).exp().sum_dim(1).log() + m;
        let nll = lse - z.gather(1, inp.targets.clone());
        total(nll * inp.weights.clone())
    }
}
