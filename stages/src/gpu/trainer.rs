//! Training on a burn device: parameters, gradient accumulators and optimizer moments stay
//! on the device; only the loss (one number per micro-batch) and checkpoints come back.
//!
//! In f16 or bf16 (`super::precision`) the parameters that train and their gradients stay
//! f32 (master weights); the optimizer's moments are f32 too unless `optimizer_state` stores
//! them in bf16 (the update still computes in f32). LoRA's frozen base is stored in the half
//! type, as PEFT users load it. f16 scales the loss ([`LossScale`]).

use burn::tensor::{Device, FloatDType, Tensor};

use super::llama::{DeviceLora, DeviceModel, Inputs, download, total, upload};
use super::precision::{LossScale, Precision};
use crate::cpu::batch::Batch;
use crate::cpu::llama::Dropouts;
use crate::cpu::lora::Adapters;
use crate::model::weights::{Tensor as HostTensor, Weights};
use crate::train::optim::{Optimizer, Rule, StateType};
use crate::train::trainer::{Trainer, Update, restore_by_name};

/// A tensor stored in any float type (moments in bf16), read back as f32 values.
fn download_f32(t: &Tensor<2>) -> Vec<f32> {
    download(&t.clone().cast(FloatDType::F32))
}

/// Adds a gradient to a sum that may not have started.
fn add_into(sum: &mut Option<Tensor<2>>, g: Tensor<2>) {
    *sum = Some(match sum.take() {
        Some(acc) => acc + g,
        None => g,
    });
}

/// A model being trained on a burn device.
pub struct BurnTrainer {
    weights: Weights,
    adapters: Option<Adapters>,
    device: Device,
    base: Vec<Tensor<2>>,
    lora_meta: Option<DeviceLora>,
    lora: Vec<Tensor<2>>,
    grads: Vec<Option<Tensor<2>>>,
    rule: Rule,
    weight_decay: f32,
    lr_max: f32,
    step: u64,
    m: Vec<Tensor<2>>,
    v: Vec<Tensor<2>>,
    /// The type `m` and `v` are stored in (the update computes in f32).
    state_type: StateType,
    precision: Precision,
    /// f16's loss scale (None in f32 and bf16).
    loss_scale: Option<LossScale>,
    /// Recompute each block in the backward pass instead of keeping its activations.
    activation_checkpointing: bool,
}

impl BurnTrainer {
    /// `device` must have autodiff enabled, and arithmetic in `precision` (checked by the
    /// stage with `Precision::check`).
    pub fn new(
        weights: Weights,
        adapters: Option<Adapters>,
        opt: &Optimizer,
        device: Device,
        precision: Precision,
    ) -> BurnTrainer {
        let plain = device.clone();
        // LoRA's base is frozen: no master copy, it is kept in the compute type.
        let stored = if adapters.is_some() {
            precision.dtype()
        } else {
            burn::tensor::FloatDType::F32
        };
        let base: Vec<Tensor<2>> = weights
            .tensors
            .iter()
            .map(|t| upload(&t.data, &t.shape, &plain).inner().cast(stored))
            .collect();
        let (lora_meta, lora) = match &adapters {
            Some(a) => {
                let mut factors = std::collections::BTreeMap::new();
                for l in 0..weights.config.num_hidden_layers {
                    for &p in &a.spec.targets {
                        if let Some(f) = a.indices(l, p) {
                            factors.insert((l, p), f.clone());
                        }
                    }
                }
                let t = a
                    .tensors
                    .iter()
                    .map(|t| upload(&t.data, &t.shape, &plain).inner())
                    .collect();
                (
                    Some(DeviceLora {
                        scale: a.spec.scale(),
                        factors,
                    }),
                    t,
                )
            }
            None => (None, Vec::new()),
        };
        let mut me = BurnTrainer {
            weights,
            adapters,
            device,
            base,
            lora_meta,
            lora,
            grads: Vec::new(),
            rule: opt.rule,
            weight_decay: opt.weight_decay,
            lr_max: opt.lr_max,
            step: 0,
            m: Vec::new(),
            v: Vec::new(),
            state_type: opt.state_type,
            precision,
            loss_scale: None,
            activation_checkpointing: false,
        };
        me.grads = vec![None; me.trainable().len()];
        me.set_optimizer(opt);
        me
    }

    /// Recomputes each block in the backward pass (see `checkpointed_grads`): a forward
    /// pass more for a block's activations instead of every block's.
    pub fn with_activation_checkpointing(mut self, on: bool) -> BurnTrainer {
        self.activation_checkpointing = on;
        self
    }

    fn trainable(&self) -> &Vec<Tensor<2>> {
        if self.lora_meta.is_some() {
            &self.lora
        } else {
            &self.base
        }
    }

    /// The type moments are stored in on the device.
    fn state_dtype(&self) -> FloatDType {
        match self.state_type {
            StateType::F32 => FloatDType::F32,
            StateType::Bf16 => FloatDType::BF16,
        }
    }

    fn set_optimizer(&mut self, opt: &Optimizer) {
        self.state_type = opt.state_type;
        let shapes: Vec<[usize; 2]> = self.trainable().iter().map(|t| t.dims()).collect();
        let stored = self.state_dtype();
        // The host's moments are values of the state type: the cast is exact.
        let up = |data: &Vec<Vec<f32>>| -> Vec<Tensor<2>> {
            data.iter()
                .zip(&shapes)
                .map(|(d, s)| upload(d, &[s[0], s[1]], &self.device).inner().cast(stored))
                .collect()
        };
        self.m = up(&opt.m);
        self.v = up(&opt.v);
        self.step = opt.step;
        self.loss_scale = match self.precision {
            Precision::F16 => Some(opt.loss_scale.unwrap_or_default()),
            Precision::F32 | Precision::Bf16 => None,
        };
    }

    fn host_trainable(&self) -> Vec<HostTensor> {
        let names: Vec<(String, Vec<usize>)> = match &self.adapters {
            Some(a) => a
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
            None => self
                .weights
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        };
        names
            .into_iter()
            .zip(self.trainable())
            .map(|((name, shape), t)| HostTensor {
                name,
                shape,
                data: download(t),
            })
            .collect()
    }

    /// The parameters as autodiff leaves (those that train requiring gradients when `grad`),
    /// and the model over them: (base, LoRA tensors).
    fn leaves(&self, grad: bool) -> (Vec<Tensor<2>>, Vec<Tensor<2>>) {
        let full = self.lora_meta.is_none();
        let wrap = |t: &Tensor<2>, train: bool| {
            let a = t.clone().autodiff();
            if train && grad { a.require_grad() } else { a }
        };
        let base = self.base.iter().map(|t| wrap(t, full)).collect();
        let lora = self.lora.iter().map(|t| wrap(t, !full)).collect();
        (base, lora)
    }

    /// The forward pass over parameters `w` and `lora` (autodiff leaves or plain tensors)
    /// on `device`.
    fn model<'a>(
        &'a self,
        w: &'a [Tensor<2>],
        lora: &'a [Tensor<2>],
        device: &'a Device,
    ) -> DeviceModel<'a> {
        DeviceModel {
            config: &self.weights.config,
            arch: &self.weights.arch,
            w,
            lora: self.lora_meta.as_ref().map(|m| (m, lora)),
            device,
            dtype: self.precision.dtype(),
        }
    }

    fn forward_loss(
        &self,
        batch: &Batch,
        drop: Option<&Dropouts>,
        grad: bool,
    ) -> (Tensor<1>, Vec<Tensor<2>>) {
        let (base, lora) = self.leaves(grad);
        let inputs = Inputs::new(&self.weights, batch, &self.device);
        let loss = self
            .model(&base, &lora, &self.device)
            .loss_sum(&inputs, drop);
        (loss, if self.lora_meta.is_none() { base } else { lora })
    }

    /// Moves the gradients `grads` holds for the trainable leaves into the sums `into`: each
    /// leaves `grads` as it is added, so its memory is free for the next.
    fn collect(
        &self,
        into: &mut [Option<Tensor<2>>],
        base: &[Tensor<2>],
        lora: &[Tensor<2>],
        grads: &mut burn::tensor::Gradients,
    ) {
        let leaves = if self.lora_meta.is_none() { base } else { lora };
        for (i, leaf) in leaves.iter().enumerate() {
            if let Some(g) = leaf.grad_remove(grads) {
                add_into(&mut into[i], g.inner());
            }
        }
    }

    /// Adds a micro-batch's gradients (of `scale` times its summed loss) to the step's sums
    /// `into`, with activation checkpointing, as `torch.utils.checkpoint` per block: a forward pass without a graph
    /// keeps only each block's input; the head's loss is differentiated from the last one;
    /// then, from the last block to the first, the block is recomputed with a graph from
    /// its input and differentiated against the gradient of its output (the surrogate
    /// `sum(y * dy)`, whose gradient at `y` is exactly `dy`), giving its parameters'
    /// gradients and its input's. Memory holds the blocks' inputs and one block's graph;
    /// the cost is a forward pass more. Each layer's dropout masks come from its own seed,
    /// so the recomputed block draws the forward pass's masks: the same bits as without.
    ///
    /// A block's gradients go into the sums as its backward makes them, so that from a
    /// step's second micro-batch on no second set of gradients is held beside the sums (7B's
    /// is 25 GiB). Only a tied embedding's, which two backward passes reach (the head's and
    /// the embedding's), is summed first: every weight's sum is `sum + micro-batch's`, as
    /// without checkpointing. Returns the micro-batch's summed loss.
    fn checkpointed_grads(
        &self,
        batch: &Batch,
        scale: f32,
        drop: Option<&Dropouts>,
        into: &mut [Option<Tensor<2>>],
    ) -> f32 {
        let layers = self.weights.config.num_hidden_layers;
        let plain = self.device.clone().without_autodiff();
        // Attention by the fused kernels (`super::flash`: linear memory in the sequence
        // length) where they apply.
        let inputs_on = |device: &Device| Inputs::for_fused(&self.weights, batch, drop, device);
        let mut inputs: Vec<Tensor<2>> = Vec::with_capacity(layers);
        // The forward pass's inputs (the plain path's masks among them) go with it.
        let last = {
            let model = self.model(&self.base, &self.lora, &plain);
            let inp = inputs_on(&plain);
            let mut x = model.embed_inputs(&inp);
            for l in 0..layers {
                inputs.push(x.clone());
                x = model.block(l, x, &inp, drop);
            }
            x
        };
        let (base, lora) = self.leaves(true);
        let model = self.model(&base, &lora, &self.device);
        let inp = inputs_on(&self.device);
        let mut ends = vec![None; self.trainable().len()];
        let x = last.autodiff().require_grad();
        let loss = model.head_loss(x.clone(), &inp);
        let sum: f32 = loss.clone().into_scalar();
        let mut g = loss.mul_scalar(scale).backward();
        self.collect(&mut ends, &base, &lora, &mut g);
        // What the head's pass reached joins the sums now (the head's weights, the final
        // norm), but a tied embedding's part (the first tensor in storage order), which waits
        // for the embedding's pass.
        let tied = self.weights.config.tie_word_embeddings && self.lora_meta.is_none();
        for (i, (sum, g)) in into.iter_mut().zip(ends.iter_mut()).enumerate() {
            if !(tied && i == 0)
                && let Some(g) = g.take()
            {
                add_into(sum, g);
            }
        }
        let mut dy = x
            .grad(&g)
            .expect("the loss depends on the last block")
            .inner();
        for l in (0..layers).rev() {
            let x = inputs
                .pop()
                .expect("an input per block")
                .autodiff()
                .require_grad();
            let y = model.block(l, x.clone(), &inp, drop);
            let mut g = total(y * dy.autodiff()).backward();
            self.collect(into, &base, &lora, &mut g);
            dy = x.grad(&g).expect("a block depends on its input").inner();
        }
        // The embedding trains in full finetuning only (LoRA leaves it frozen).
        if self.lora_meta.is_none() {
            let x0 = model.embed_inputs(&inp);
            let mut g = total(x0 * dy.autodiff()).backward();
            self.collect(&mut ends, &base, &lora, &mut g);
        }
        for (sum, g) in into.iter_mut().zip(ends) {
            if let Some(g) = g {
                add_into(sum, g);
            }
        }
        sum
    }
}

impl Trainer for BurnTrainer {
    fn accumulate(&mut self, batch: &Batch, scale: f32, drop: Option<Dropouts>) -> (f64, usize) {
        if let Some(d) = &drop {
            // The micro-batch's own seed (from the stage seed, the step and the micro-batch)
            // drives the device's generator: dropout masks repeat run to run and after a
            // resume, as the CPU engine's do.
            self.device.seed(d.seed);
        }
        let scale = scale * self.loss_scale.map_or(1.0, |s| s.scale);
        // This micro-batch's gradients, added to the step's sums: `sum + micro-batch's` for
        // every weight whether or not blocks are recomputed.
        let mut sums = std::mem::take(&mut self.grads);
        let sum = if self.activation_checkpointing {
            self.checkpointed_grads(batch, scale, drop.as_ref(), &mut sums)
        } else {
            let (base, lora) = self.leaves(true);
            let inputs = Inputs::new(&self.weights, batch, &self.device);
            let loss = self
                .model(&base, &lora, &self.device)
                .loss_sum(&inputs, drop.as_ref());
            let sum: f32 = loss.clone().into_scalar();
            let mut g = loss.mul_scalar(scale).backward();
            self.collect(&mut sums, &base, &lora, &mut g);
            sum
        };
        self.grads = sums;
        (sum as f64, batch.target_count())
    }

    fn apply(&mut self, lr: f32, clip: f64) -> Update {
        let n = self.trainable().len();
        let grads: Vec<Tensor<2>> = (0..n)
            .map(|i| {
                self.grads[i]
                    .take()
                    .unwrap_or_else(|| self.trainable()[i].clone().zeros_like())
            })
            .collect();
        let sq: f32 = grads
            .iter()
            // Reduced along each axis in turn, not by `total`: a weight's gradient from the
            // transposed matmul is a transposed view, which `total`'s reshape to one row
            // would copy whole first. Not burn's `sum` either, which adds partial sums
            // atomically where the device can (CUDA): the norm, and with it the clipped
            // step, would change in its last bits from run to run.
            .map(|g| g.clone().powi_scalar(2).sum_dim(1).sum_dim(0).reshape([1]))
            .reduce(|a, b| a + b)
            .map(|t| t.into_scalar())
            .unwrap_or(0.0);
        // The gradients hold `loss scale` times the true ones (1 but in f16).
        let unscale = self.loss_scale.map_or(1.0, |s| s.scale);
        let norm = (sq as f64).sqrt() / f64::from(unscale);
        if let Some(s) = &mut self.loss_scale
            && !s.record(norm.is_finite())
        {
            return Update {
                grad_norm: norm,
                skipped: true,
            };
        }
        let coef = if clip > 0.0 {
            (clip / (norm + 1e-6)).min(1.0) as f32
        } else {
            1.0
        } / unscale;
        self.step += 1;
        let t = self.step as i32;
        let wd = self.weight_decay;
        let lr_max = self.lr_max;
        let rule = self.rule;
        // Moments are read in f32 and stored back in their type (rounded to nearest-even
        // in bf16), as the CPU engine's optimizer does.
        let stored = self.state_dtype();
        let (m, v) = (&mut self.m, &mut self.v);
        let params = if self.lora_meta.is_some() {
            &mut self.lora
        } else {
            &mut self.base
        };
        for (i, g) in grads.into_iter().enumerate() {
            let g = if coef != 1.0 { g.mul_scalar(coef) } else { g };
            let p = params[i].clone();
            match rule {
                Rule::LionW { beta1, beta2 } => {
                    let p = if wd != 0.0 {
                        p.mul_scalar(1.0 - (lr / lr_max) * wd)
                    } else {
                        p
                    };
                    let m0 = m[i].clone().cast(FloatDType::F32);
                    let c = m0.clone().mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1);
                    params[i] = p - c.sign().mul_scalar(lr);
                    m[i] = (m0.mul_scalar(beta2) + g.mul_scalar(1.0 - beta2)).cast(stored);
                }
                Rule::AdamW { beta1, beta2, eps } => {
                    let p = if wd != 0.0 {
                        p.mul_scalar(1.0 - lr * wd)
                    } else {
                        p
                    };
                    let m1 = m[i].clone().cast(FloatDType::F32).mul_scalar(beta1)
                        + g.clone().mul_scalar(1.0 - beta1);
                    let v1 = v[i].clone().cast(FloatDType::F32).mul_scalar(beta2)
                        + g.powi_scalar(2).mul_scalar(1.0 - beta2);
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    let denom = v1.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(eps);
                    params[i] = p - (m1.clone() / denom).mul_scalar(lr / bc1);
                    m[i] = m1.cast(stored);
                    v[i] = v1.cast(stored);
                }
            }
        }
        Update {
            grad_norm: norm,
            skipped: false,
        }
    }

    fn eval(&self, batch: &Batch) -> (f64, usize) {
        let (loss, _) = self.forward_loss(batch, None, false);
        (loss.into_scalar::<f32>() as f64, batch.target_count())
    }

    fn trainable_count(&self) -> usize {
        self.trainable()
            .iter()
            .map(|t| t.dims().iter().product::<usize>())
            .sum()
    }

    fn snapshot(&self) -> (Vec<HostTensor>, Optimizer) {
        let opt = Optimizer {
            rule: self.rule,
            weight_decay: self.weight_decay,
            lr_max: self.lr_max,
            step: self.step,
            m: self.m.iter().map(download_f32).collect(),
            v: self.v.iter().map(download_f32).collect(),
            loss_scale: self.loss_scale,
            state_type: self.state_type,
        };
        (self.host_trainable(), opt)
    }

    fn restore(&mut self, saved: Vec<HostTensor>, opt: Optimizer) -> Result<(), String> {
        // The host copies know names and shapes (no download needed); they take the
        // checkpoint's data, then go up to the device.
        let host = match &mut self.adapters {
            Some(a) => &mut a.tensors,
            None => &mut self.weights.tensors,
        };
        restore_by_name(host, saved)?;
        // What trains is f32 (master weights) whatever the precision.
        let up: Vec<Tensor<2>> = host
            .iter()
            .map(|t| upload(&t.data, &t.shape, &self.device).inner())
            .collect();
        if self.lora_meta.is_some() {
            self.lora = up
        } else {
            self.base = up
        }
        self.set_optimizer(&opt);
        Ok(())
    }

    fn finish(self: Box<Self>) -> (Weights, Option<Adapters>) {
        let trained = self.host_trainable();
        let mut weights = self.weights;
        let mut adapters = self.adapters;
        let target = match &mut adapters {
            Some(a) => &mut a.tensors,
            None => &mut weights.tensors,
        };
        for (t, h) in target.iter_mut().zip(trained) {
            t.data = h.data;
        }
        (weights, adapters)
    }

    fn lora_dropout(&self) -> f32 {
        self.adapters.as_ref().map_or(0.0, |a| a.spec.dropout)
    }

    fn loss_scale(&self) -> Option<f32> {
        self.loss_scale.map(|s| s.scale)
    }
}
