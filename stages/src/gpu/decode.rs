//! Inference with a KV cache on a burn device: the same ragged feeding as the CPU engine's
//! `cpu::decode::Decoder` (prefill and decoding in one call, each token appended to its
//! slot), so that scoring and continuous-batching generation run unchanged on either.
//!
//! The cache is one `[slots * capacity, kv_heads * head_dim]` tensor per layer and for keys
//! and values, allocated once per decoder. A call writes its new keys and values with one
//! indexed assignment, reads each row's slot back with one gather and builds its attention
//! mask on the device from the slots' lengths; only token ids, positions and the wanted
//! logits cross to and from the host. Nothing of a prompt is recomputed.

use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::llama::{DeviceModel, Inputs, WindowMasks, download, rope_tables, upload, visible};
use super::precision::Precision;
use crate::cpu::batch::Batch;
use crate::cpu::decode::Token;
use crate::cpu::ops::Rope;
use crate::model::config::ModelConfig;
use crate::model::weights::Weights;

/// A model's weights uploaded once to a device (no autodiff), shared by every decoder made
/// for it, stored in the type they compute in (nothing trains: no f32 master copy).
pub struct DeviceWeights {
    /// The device, without autodiff.
    pub device: Device,
    /// The weights in `Weights` order, in the compute type.
    pub tensors: Vec<Tensor<2>>,
    /// What the model computes in (and the KV cache is stored in).
    pub precision: Precision,
}

impl DeviceWeights {
    /// Uploads `w` to `device`, cast to `precision`'s type.
    pub fn upload(w: &Weights, device: &Device, precision: Precision) -> DeviceWeights {
        let device = device.clone().without_autodiff();
        let tensors = w
            .tensors
            .iter()
            .map(|t| upload(&t.data, &t.shape, &device).cast(precision.dtype()))
            .collect();
        DeviceWeights {
            device,
            tensors,
            precision,
        }
    }

    /// How many of `wanted` cache slots of `slot_bytes` each fit in what the device has
    /// left (its memory less what is allocated now, a tenth kept for activations): a batch
    /// too large for the device runs in fewer slots (results do not depend on the number
    /// of slots); one that cannot hold a single slot is an error saying what it needs.
    pub fn slots_that_fit(&self, wanted: usize, slot_bytes: u64) -> Result<usize, String> {
        let Some(has) = super::device::memory(&self.device) else {
            return Ok(wanted);
        };
        let used = self
            .device
            .memory_pool_usage()
            .map_or(0, |u| u.bytes_in_use);
        let free = has.saturating_sub(used) / 10 * 9;
        let fit = (free / slot_bytes.max(1)) as usize;
        if fit == 0 {
            use super::device::gib;
            return Err(format!(
                "the KV cache of one sequence needs {:.2} GiB; the device has {:.2} GiB of \
                 {:.2} GiB left after the weights",
                gib(slot_bytes),
                gib(free),
                gib(has)
            ));
        }
        Ok(wanted.min(fit))
    }

    /// The forward pass over these weights.
    pub fn model<'a>(&'a self, w: &'a Weights) -> DeviceModel<'a> {
        DeviceModel {
            config: &w.config,
            arch: &w.arch,
            w: &self.tensors,
            lora: None,
            device: &self.device,
            dtype: self.precision.dtype(),
        }
    }

    /// Summed loss over a batch's targets (training's loss, without gradients).
    pub fn loss_sum(&self, w: &Weights, b: &Batch) -> f64 {
        let inputs = Inputs::new(w, b, &self.device);
        f64::from(self.model(w).loss_sum(&inputs, None).into_scalar::<f32>())
    }
}

/// A KV cache of `slots` sequences of at most `capacity` tokens on a device.
pub struct DeviceDecoder<'a> {
    w: &'a Weights,
    on: &'a DeviceWeights,
    rope: Rope,
    capacity: usize,
    /// Per layer: `[slots * capacity, kv_heads * head_dim]` (an `Option` so that a call can
    /// take it out and update it in place: a second handle would make burn copy it).
    k: Vec<Option<Tensor<2>>>,
    v: Vec<Option<Tensor<2>>>,
    len: Vec<usize>,
}

impl<'a> DeviceDecoder<'a> {
    /// `capacity` (tokens a slot can hold) is capped at the positions the model runs at: a
    /// cache smaller than the model's context changes no result as long as no sequence
    /// outgrows it (`feed` says so when one would).
    pub fn new(w: &'a Weights, on: &'a DeviceWeights, slots: usize, capacity: usize) -> Self {
        let c = &w.config;
        let capacity = capacity.clamp(1, w.arch.positions);
        let kvw = c.kv_heads() * c.head_dim();
        // Keys and values in the compute type (half the memory in f16 and bf16).
        let dtype = on.precision.dtype().into();
        let zeros = || {
            Some(Tensor::<2>::zeros(
                [slots * capacity, kvw],
                (&on.device, dtype),
            ))
        };
        DeviceDecoder {
            w,
            on,
            rope: Rope::new(&w.arch, capacity),
            capacity,
            k: (0..c.num_hidden_layers).map(|_| zeros()).collect(),
            v: (0..c.num_hidden_layers).map(|_| zeros()).collect(),
            len: vec![0; slots],
        }
    }

    /// Bytes the cache of `slots` x `capacity` tokens takes (keys and values in `precision`).
    pub fn cache_bytes(
        c: &ModelConfig,
        slots: usize,
        capacity: usize,
        precision: Precision,
    ) -> u64 {
        (2 * c.num_hidden_layers * slots * capacity * c.kv_heads() * c.head_dim()) as u64
            * precision.bytes()
    }

    /// Sequences the cache holds at once.
    pub fn slots(&self) -> usize {
        self.len.len()
    }

    pub fn len(&self, slot: usize) -> usize {
        self.len[slot]
    }

    pub fn reset(&mut self, slot: usize) {
        self.len[slot] = 0;
    }

    /// Makes slot `to` hold the first `n` tokens of slot `from` (a prompt's keys and values,
    /// shared by the samples of that prompt): one gather and one indexed assignment per
    /// layer, on the device.
    pub fn copy_prefix(&mut self, from: usize, to: usize, n: usize) {
        assert!(
            n <= self.len[from],
            "slot {from} holds fewer than {n} tokens"
        );
        let dev = &self.on.device;
        let rows = |slot: usize| {
            let at = (slot * self.capacity) as i64;
            Tensor::<1, Int>::arange(at..at + n as i64, dev)
        };
        let (src, dst) = (rows(from), rows(to));
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let old = cache.take().expect("a cache per layer");
            let prefix = old.clone().select(0, src.clone());
            *cache = Some(old.select_assign(0, dst.clone(), prefix, IndexingUpdateOp::Assign));
        }
        self.len[to] = n;
    }

    /// Appends `tokens` and returns the logits `[wanted, vocab]` of those with `logits`
    /// set, in their order, as `cpu::decode::Decoder::feed`.
    pub fn feed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, String> {
        let c = &self.w.config;
        let dev = &self.on.device;
        let (h, hk, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        // Rows: the slots this call feeds, in order of first appearance; `at`: each token's
        // (row, index within the row).
        let mut slots: Vec<usize> = Vec::new();
        let mut count: Vec<usize> = Vec::new();
        let mut at = Vec::with_capacity(tokens.len());
        for t in tokens {
            let r = match slots.iter().position(|&s| s == t.slot) {
                Some(r) => r,
                None => {
                    slots.push(t.slot);
                    count.push(0);
                    slots.len() - 1
                }
            };
            at.push((r, count[r]));
            count[r] += 1;
        }
        for (r, &s) in slots.iter().enumerate() {
            let end = self.len[s] + count[r];
            if end > self.capacity {
                return Err(format!(
                    "a sequence would exceed {} tokens (the model's context or the cache)",
                    self.capacity
                ));
            }
        }
        let (rows, t) = (slots.len(), count.iter().copied().max().unwrap_or(0));
        if rows == 0 {
            return Ok(Vec::new());
        }
        // Padded `[rows, t]` grid: padding repeats a row's last position and is never read.
        let mut ids = vec![0i64; rows * t];
        let mut pos = vec![0u32; rows * t];
        for (r, &s) in slots.iter().enumerate() {
            for i in 0..t {
                pos[r * t + i] = (self.len[s] + i.min(count[r] - 1)) as u32;
            }
        }
        let mut src = Vec::with_capacity(tokens.len());
        let mut dst = Vec::with_capacity(tokens.len());
        for (tok, &(r, i)) in tokens.iter().zip(&at) {
            ids[r * t + i] = i64::from(tok.id);
            src.push((r * t + i) as i64);
            dst.push((slots[r] * self.capacity + self.len[slots[r]] + i) as i64);
        }
        let keys = (0..rows)
            .map(|r| self.len[slots[r]] + count[r])
            .max()
            .unwrap_or(0);
        let mut gather = Vec::with_capacity(rows * keys);
        for &s in &slots {
            gather.extend((0..keys).map(|j| (s * self.capacity + j) as i64));
        }
        let offsets: Vec<i64> = slots.iter().map(|&s| self.len[s] as i64).collect();
        let int = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), dev)
        };
        let (src, dst, gather) = (int(src), int(dst), int(gather));
        let offsets = int(offsets);
        let (cos, sin) = rope_tables(&self.rope, &pos, dev);
        let masks = WindowMasks::new(&self.w.arch.windows, |window| {
            cache_mask(&offsets, t, keys, window, dev)
        });
        let model = self.on.model(self.w);
        let (kc, vc) = (&mut self.k, &mut self.v);
        let windows = &self.w.arch.windows;
        let mut attend = |l: usize, q: Tensor<2>, k: Tensor<2>, v: Tensor<2>| {
            let store = |cache: &mut Option<Tensor<2>>, new: Tensor<2>| {
                let old = cache.take().expect("a cache per layer");
                let new = new.select(0, src.clone());
                let updated = old.select_assign(0, dst.clone(), new, IndexingUpdateOp::Assign);
                let seen = updated.clone().select(0, gather.clone());
                *cache = Some(updated);
                seen.reshape([rows, keys, hk, hd]).swap_dims(1, 2)
            };
            let (k4, v4) = (store(&mut kc[l], k), store(&mut vc[l], v));
            let q4 = q.reshape([rows, t, h, hd]).swap_dims(1, 2);
            model.attention(q4, k4, v4, masks.of(windows[l]), None)
        };
        let mut x = model.embed(int(ids), None);
        for l in 0..c.num_hidden_layers {
            x = model.layer(l, x, (&cos, &sin), None, &mut attend);
        }
        for (r, &s) in slots.iter().enumerate() {
            self.len[s] += count[r];
        }
        let wanted: Vec<i64> = tokens
            .iter()
            .zip(&at)
            .filter(|(tok, _)| tok.logits)
            .map(|(_, &(r, i))| (r * t + i) as i64)
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        Ok(download(&model.logits(x.select(0, int(wanted)))))
    }
}

/// Which cached keys each new token sees, `[rows, 1, t, keys]`: token `i` of a row whose
/// slot held `offset` tokens sits at position `offset + i` and sees keys `j <= offset + i`
/// within the window (the CPU decoder's rule). Made on the device from the offsets.
fn cache_mask(
    offsets: &Tensor<1, Int>,
    t: usize,
    keys: usize,
    window: Option<usize>,
    device: &Device,
) -> Tensor<4, Bool> {
    let rows = offsets.dims()[0];
    let i = Tensor::<1, Int>::arange(0..t as i64, device).reshape([1, 1, t, 1]);
    let q: Tensor<4, Int> = offsets.clone().reshape([rows, 1, 1, 1]) + i;
    let q = q.expand([rows, 1, t, keys]);
    let j: Tensor<4, Int> = Tensor::<1, Int>::arange(0..keys as i64, device)
        .reshape([1, 1, 1, keys])
        .expand([rows, 1, t, keys]);
    visible(q - j, window)
}
