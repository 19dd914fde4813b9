//! What the training loop needs from a device: the CPU engine and burn devices both provide it.

use crate::cpu::batch::Batch;
use crate::cpu::llama::Dropouts;
use crate::cpu::lora::Adapters;
use crate::model::weights::{Tensor, Weights};
use crate::train::optim::Optimizer;

/// A model being trained, on some device.
pub trait Trainer: Send + Sync {
    /// Adds the gradient of `scale * summed loss` of a micro-batch; returns (summed loss,
    /// targets).
    fn accumulate(&mut self, batch: &Batch, scale: f32, drop: Option<Dropouts>) -> (f64, usize);
    /// Clips to `clip` (0 = off), updates at `lr`, clears the gradients.
    fn apply(&mut self, lr: f32, clip: f64) -> Update;
    /// Summed loss and targets of a batch, without dropout or gradients.
    fn eval(&self, batch: &Batch) -> (f64, usize);
    /// Trainable parameter count.
    fn trainable_count(&self) -> usize;
    /// Host copies of the trainable tensors and optimizer state (for checkpoints).
    fn snapshot(&self) -> (Vec<Tensor>, Optimizer);
    /// Puts back what [`Trainer::snapshot`] took.
    fn restore(&mut self, trainable: Vec<Tensor>, opt: Optimizer) -> Result<(), String>;
    /// The trained model (and adapters, for LoRA).
    fn finish(self: Box<Self>) -> (Weights, Option<Adapters>);
    /// LoRA's input dropout (0 without LoRA).
    fn lora_dropout(&self) -> f32;
    /// f16's dynamic loss scale now, where there is one (see `gpu::precision::LossScale`).
    fn loss_scale(&self) -> Option<f32> {
        None
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// The global gradient norm before clipping (of the unscaled gradients; not finite
    /// when they overflowed).
    pub grad_norm: f64,
    /// Nothing changed but the loss scale: f16 gradients overflowed under loss scaling,
    /// and the step was skipped (as PyTorch's `GradScaler.step` skips it).
    pub skipped: bool,
}

/// Puts a checkpoint's tensors into `current`, matched by name, each with its element count:
/// what every trainer's `restore` does with the host side of its parameters.
pub fn restore_by_name(current: &mut [Tensor], saved: Vec<Tensor>) -> Result<(), String> {
    let mut by_name: std::collections::HashMap<String, Tensor> =
        saved.into_iter().map(|t| (t.name.clone(), t)).collect();
    for t in current.iter_mut() {
        let s = by_name
            .remove(&t.name)
            .ok_or_else(|| format!("the checkpoint lacks `{}`", t.name))?;
        if s.data.len() != t.data.len() {
            return Err(format!("the checkpoint's `{}` has another shape", t.name));
        }
        t.data = s.data;
    }
    Ok(())
}
