//! Training on the CPU engine: gradients accumulate in host buffers shaped like what trains.

use crate::cpu::batch::Batch;
use crate::cpu::llama::{Dropouts, Llama, Trainable};
use crate::cpu::lora::Adapters;
use crate::cpu::ops::Rope;
use crate::model::weights::{Tensor, Weights};
use crate::train::optim::{Optimizer, clip_global_norm};
use crate::train::trainer::{Trainer, Update, restore_by_name};

/// A model being trained on the CPU (full finetuning, or LoRA with a frozen base).
pub struct CpuTrainer {
    pub weights: Weights,
    pub lora: Option<Adapters>,
    pub opt: Optimizer,
    grads: Vec<Vec<f32>>,
    rope: Rope,
    threads: usize,
}

impl CpuTrainer {
    pub fn new(
        weights: Weights,
        lora: Option<Adapters>,
        opt: Optimizer,
        max_positions: usize,
        threads: usize,
    ) -> CpuTrainer {
        let rope = Rope::new(&weights.arch, max_positions);
        let sizes: Vec<usize> = match &lora {
            Some(l) => l.tensors.iter().map(|t| t.data.len()).collect(),
            None => weights.tensors.iter().map(|t| t.data.len()).collect(),
        };
        CpuTrainer {
            grads: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            weights,
            lora,
            opt,
            rope,
            threads,
        }
    }

    fn model(&self) -> Llama<'_> {
        Llama {
            w: &self.weights,
            lora: self.lora.as_ref(),
            rope: &self.rope,
            threads: self.threads,
        }
    }
}

impl Trainer for CpuTrainer {
    /// Adds the gradient of `scale * summed loss` of a micro-batch; returns (summed loss,
    /// targets).
    fn accumulate(&mut self, batch: &Batch, scale: f32, drop: Option<Dropouts>) -> (f64, usize) {
        let batch = &batch.without_untrained_tails();
        if batch.rows == 0 {
            return (0.0, 0);
        }
        let fwd = self.model().forward(batch, drop, true);
        let out = (fwd.loss_sum, fwd.targets);
        let mut grads = std::mem::take(&mut self.grads);
        {
            let model = self.model();
            let train = match &self.lora {
                Some(l) => Trainable::Lora(l),
                None => Trainable::Full,
            };
            model.backward(fwd, batch, scale, &train, &mut grads);
        }
        self.grads = grads;
        out
    }

    /// Clips to `clip` (0 = off), updates at `lr`, clears the gradients; returns the norm
    /// before clipping.
    fn apply(&mut self, lr: f32, clip: f64) -> Update {
        let norm = if clip > 0.0 {
            clip_global_norm(&mut self.grads, clip)
        } else {
            crate::train::optim::global_norm(&self.grads)
        };
        let tensors = match &mut self.lora {
            Some(l) => &mut l.tensors,
            None => &mut self.weights.tensors,
        };
        let mut params: Vec<&mut [f32]> = tensors.iter_mut().map(|t| &mut t.data[..]).collect();
        self.opt.update(&mut params, &self.grads, lr);
        for g in &mut self.grads {
            g.fill(0.0);
        }
        Update {
            grad_norm: norm,
            skipped: false,
        }
    }

    /// Summed loss and target count of a batch, without dropout or gradients.
    fn eval(&self, batch: &Batch) -> (f64, usize) {
        let batch = &batch.without_untrained_tails();
        if batch.rows == 0 {
            return (0.0, 0);
        }
        let f = self.model().forward(batch, None, false);
        (f.loss_sum, f.targets)
    }

    fn trainable_count(&self) -> usize {
        self.trainable().iter().map(|t| t.data.len()).sum()
    }

    fn snapshot(&self) -> (Vec<Tensor>, Optimizer) {
        (self.trainable().to_vec(), self.opt.clone())
    }

    fn restore(&mut self, saved: Vec<Tensor>, opt: Optimizer) -> Result<(), String> {
        let tensors = match &mut self.lora {
            Some(l) => &mut l.tensors,
            None => &mut self.weights.tensors,
        };
        restore_by_name(tensors, saved)?;
        self.opt = opt;
        Ok(())
    }

    fn finish(self: Box<Self>) -> (Weights, Option<Adapters>) {
        (self.weights, self.lora)
    }

    fn lora_dropout(&self) -> f32 {
        self.lora.as_ref().map_or(0.0, |l| l.spec.dropout)
    }
}

impl CpuTrainer {
    fn trainable(&self) -> &[Tensor] {
        match &self.lora {
            Some(l) => &l.tensors,
            None => &self.weights.tensors,
        }
    }
}
