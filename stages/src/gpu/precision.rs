//! The float type a stage computes in (`precision = "f32" | "f16" | "bf16"`), as PyTorch's
//! autocast does it: parameters that train stay f32 (master weights, optimizer state and
//! gradients in f32); matmuls, attention scores and the MLP run in the half type; norms,
//! softmax, the residual stream, the loss and every reduction stay f32. With f16, whose
//! range is small, the loss is scaled dynamically (see [`LossScale`]).
//!
//! It is part of a stage's key (it changes results); the device is not. A device without
//! arithmetic in the asked type is an error before anything loads, never a silent fallback:
//! flow's CPU engine computes in f32 only, WGSL has f16 where the adapter has `shader-f16`
//! and no bf16, CUDA has both.

use serde::{Deserialize, Serialize};

use super::device::Choice;
use crate::kind::{Default, Param, ParamType, StageError};

/// The float type of a stage's matmuls and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32 (the CPU engine's only type).
    F32,
    /// IEEE half: 11 significant bits, range to 65504 (hence the loss scaling).
    F16,
    /// bfloat16: 8 significant bits, f32's range (no loss scaling needed).
    Bf16,
}

/// The names `precision` accepts.
pub const NAMES: &[&str] = &["f32", "f16", "bf16"];

/// The `precision` param of the training kinds and `eval`: one definition, one doc.
pub const PARAM: Param = Param {
    name: "precision",
    ty: ParamType::Choice(NAMES),
    default: Default::Value("\"f32\""),
    doc: "float type of matmuls and activations (autocast: f32 master weights, optimizer state, norms, softmax and loss; f16 with dynamic loss scaling); f16 and bf16 need a device with arithmetic in them (the CPU engine is f32 only)",
};

impl Precision {
    /// The param's value; the engine has already checked it is one of [`NAMES`].
    pub fn parse(name: &str) -> Result<Precision, StageError> {
        match name {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            other => Err(StageError::Params(format!(
                "unknown precision `{other}` (one of {})",
                NAMES.join(", ")
            ))),
        }
    }

    /// The name the param gives it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per element in this type.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }

    /// burn's type for it.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    pub fn dtype(self) -> burn::tensor::FloatDType {
        use burn::tensor::FloatDType;
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// Fails, before the stage loads anything, when the chosen device cannot compute in
    /// this type: the message names the device and the type, and what the device has.
    pub fn check(self, choice: &Choice) -> Result<(), StageError> {
        if self == Precision::F32 {
            return Ok(());
        }
        match choice {
            Choice::Cpu => Err(StageError::Params(format!(
                "precision `{}`: flow's CPU engine computes in f32 only; run the stage on a \
                 GPU device (`device = \"wgpu\"`, `\"cuda\"`) or give `precision = \"f32\"`",
                self.name()
            ))),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            Choice::Burn(device, name) => {
                if device.supports_dtype(self.dtype()) {
                    return Ok(());
                }
                let has: Vec<&str> = [Precision::F16, Precision::Bf16]
                    .into_iter()
                    .filter(|p| device.supports_dtype(p.dtype()))
                    .map(Precision::name)
                    .collect();
                Err(StageError::Params(format!(
                    "precision `{}`: device {name} has no {} arithmetic (it computes in f32{}); \
                     give `precision` one of those, or another device",
                    self.name(),
                    self.name(),
                    has.iter().map(|h| format!(" and {h}")).collect::<String>()
                )))
            }
        }
    }
}

/// f16's dynamic loss scale, as PyTorch's `GradScaler`: the loss is multiplied by `scale`
/// before the backward pass so that small gradients do not flush to zero in f16; the
/// gradients are divided by it before the update. A step whose gradients overflowed
/// (inf or NaN) is skipped and the scale halved; after `GROWTH_INTERVAL` good steps in a
/// row it doubles. Kept in checkpoints, so a resumed run scales as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// What the loss is multiplied by.
    pub scale: f32,
    /// Good steps since the scale last changed.
    pub good_steps: u32,
}

impl LossScale {
    /// PyTorch's `init_scale=2**16`.
    pub const INITIAL: f32 = 65536.0;
    /// PyTorch's `growth_interval=2000`: good steps in a row before the scale doubles.
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// The scale a run starts at.
    pub fn new() -> LossScale {
        LossScale {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// Records a step: `finite` says whether its gradients were; returns whether the step
    /// is taken.
    pub fn record(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
        finite
    }
}

impl std::default::Default for LossScale {
    fn default() -> Self {
        LossScale::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale halves on an overflow and doubles after GROWTH_INTERVAL good steps, as
    /// GradScaler's `update`.
    #[test]
    fn the_loss_scale_backs_off_and_grows() {
        let mut s = LossScale::new();
        assert!(!s.record(false));
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert!(s.record(true));
        }
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        assert!(s.record(true));
        assert_eq!(s.scale, LossScale::INITIAL);
        assert_eq!(s.good_steps, 0);
    }

    #[test]
    fn the_cpu_engine_refuses_half_types_by_name() {
        assert!(Precision::F32.check(&Choice::Cpu).is_ok());
        for p in [Precision::F16, Precision::Bf16] {
            let e = p.check(&Choice::Cpu).unwrap_err().to_string();
            assert!(e.contains(p.name()) && e.contains("CPU engine"), "{e}");
        }
        for n in NAMES {
            assert_eq!(Precision::parse(n).unwrap().name(), *n);
        }
        assert!(Precision::parse("fp8").is_err());
    }
}
