//! Optimizers over flat f32 parameter lists: decoupled LionW (the paper's) and AdamW
//! (PyTorch's semantics), plus global-norm gradient clipping as `clip_grad_norm_`.
//! Written out here (a few lines each) so that their state is plain vectors we checkpoint
//! bit-exactly, and so that they touch only what trains.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::gpu::device::Choice;
use crate::gpu::precision::LossScale;
use crate::kind::StageError;

/// Which update rule, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Rule {
    /// `u = sign(b1 m + (1-b1) g); p -= lr u; m = b2 m + (1-b2) g`, with decoupled decay
    /// `p *= 1 - (lr / lr_max) wd` (Composer's DecoupledLionW).
    LionW { beta1: f32, beta2: f32 },
    /// PyTorch's AdamW: `p *= 1 - lr wd`, bias-corrected moments.
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

/// The type the optimizer's moments are stored in (`optimizer_state = "f32" | "bf16"`). The
/// update computes in f32 either way; bf16 rounds each moment to nearest (ties to even) when
/// it is stored. It halves the moments' memory, which is what lets Llama-2-7B's full
/// finetuning with LionW fit an 80 GB GPU (`super::memory`), and it changes results, so it is
/// part of a stage's key. bf16 keeps f32's exponent range: gradients as small as 1e-30 still
/// move the moment, where f16's would flush to zero below 6e-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateType {
    /// f32 moments, as PyTorch's optimizers keep them.
    #[default]
    F32,
    /// bfloat16 moments, computed in f32 and rounded to nearest-even when stored. On a
    /// burn device they are stored in bf16 (half the bytes); the CPU engine keeps the same
    /// rounded values in f32 words.
    Bf16,
}

/// The names `optimizer_state` accepts.
pub const STATE_TYPES: &[&str] = &["f32", "bf16"];

impl StateType {
    /// The param's value; the engine has already checked it is one of [`STATE_TYPES`]
    /// (as [`crate::gpu::precision::Precision::parse`] for `precision`).
    pub fn parse(name: &str) -> Result<StateType, StageError> {
        match name {
            "f32" => Ok(StateType::F32),
            "bf16" => Ok(StateType::Bf16),
            other => Err(StageError::Params(format!(
                "unknown optimizer_state `{other}` (one of {})",
                STATE_TYPES.join(", ")
            ))),
        }
    }

    /// The name the param gives it.
    pub fn name(self) -> &'static str {
        match self {
            StateType::F32 => "f32",
            StateType::Bf16 => "bf16",
        }
    }

    /// Bytes per stored moment element.
    pub fn bytes(self) -> u64 {
        match self {
            StateType::F32 => 4,
            StateType::Bf16 => 2,
        }
    }

    /// Fails, before anything loads, when a burn device cannot store this type: the message
    /// names the device and the type. The CPU engine keeps the rounded values in f32 words
    /// and takes either.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
    pub fn check(self, choice: &Choice) -> Result<(), StageError> {
        match (self, choice) {
            (StateType::F32, _) | (_, Choice::Cpu) => Ok(()),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            (StateType::Bf16, Choice::Burn(device, name)) => {
                if device.supports_dtype(burn::tensor::FloatDType::BF16) {
                    Ok(())
                } else {
                    Err(StageError::Params(format!(
                        "optimizer_state `bf16`: device {name} has no bf16 type to store the \
                         optimizer's moments in; give `optimizer_state = \"f32\"`, or another \
                         device"
                    )))
                }
            }
        }
    }

    /// `x` as this type stores it: bf16's round to nearest, ties to even (as PyTorch's
    /// `.to(torch.bfloat16)` and CUDA's `__float2bfloat16`), f32 as it is.
    pub fn store(self, x: f32) -> f32 {
        match self {
            StateType::F32 => x,
            StateType::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Optimizer state: one moment (Lion) or two (Adam) per parameter tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub rule: Rule,
    pub weight_decay: f32,
    pub lr_max: f32,
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// f16 training's dynamic loss scale (None in f32 and bf16): state that a resumed run
    /// needs to scale, and skip, as an uninterrupted one.
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
    /// The type the moments are stored in; `m` and `v` hold values it can represent.
    #[serde(default)]
    pub state_type: StateType,
}

impl Optimizer {
    pub fn new(rule: Rule, weight_decay: f32, lr_max: f32, sizes: &[usize]) -> Optimizer {
        let zeros = || sizes.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>();
        let v = match rule {
            Rule::AdamW { .. } => zeros(),
            Rule::LionW { .. } => Vec::new(),
        };
        Optimizer {
            rule,
            weight_decay,
            lr_max,
            step: 0,
            m: zeros(),
            v,
            loss_scale: None,
            state_type: StateType::F32,
        }
    }

    /// The same optimizer with its moments stored in `state_type`.
    pub fn with_state_type(mut self, state_type: StateType) -> Optimizer {
        self.state_type = state_type;
        self
    }

    /// One update of every parameter tensor with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: &mut [&mut [f32]], grads: &[Vec<f32>], lr: f32) {
        self.step += 1;
        let t = self.step as i32;
        let wd = self.weight_decay;
        const CHUNK: usize = 16384;
        let st = self.state_type;
        match self.rule {
            Rule::LionW { beta1, beta2 } => {
                let decay = 1.0 - (lr / self.lr_max) * wd;
                for ((p, g), m) in params.iter_mut().zip(grads).zip(&mut self.m) {
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK))
                        .for_each(|((p, g), m)| {
                            for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                                if wd != 0.0 {
                                    *p *= decay;
                                }
                                let c = beta1 * *m + (1.0 - beta1) * g;
                                // sign(0) = 0, as torch.sign
                                let u = if c > 0.0 {
                                    1.0
                                } else if c < 0.0 {
                                    -1.0
                                } else {
                                    0.0
                                };
                                *p -= lr * u;
                                *m = st.store(beta2 * *m + (1.0 - beta2) * g);
                            }
                        });
                }
            }
            Rule::AdamW { beta1, beta2, eps } => {
                let bc1 = 1.0 - beta1.powi(t);
                let bc2 = 1.0 - beta2.powi(t);
                let step_size = lr / bc1;
                let bc2_sqrt = bc2.sqrt();
                for (((p, g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(&mut self.m)
                    .zip(&mut self.v)
                {
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .for_each(|(((p, g), m), v)| {
                            for (((p, &g), m), v) in
                                p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                            {
                                if wd != 0.0 {
                                    *p *= 1.0 - lr * wd;
                                }
                                // The update reads the f32 moments; they are stored
                                // rounded to the state type.
                                let m1 = beta1 * *m + (1.0 - beta1) * g;
                                let v1 = beta2 * *v + (1.0 - beta2) * g * g;
                                let denom = v1.sqrt() / bc2_sqrt + eps;
                                *p -= step_size * m1 / denom;
                                *m = st.store(m1);
                                *v = st.store(v1);
                            }
                        });
                }
            }
        }
    }
}

/// The global L2 norm of all gradients (f64 sum in tensor order, so deterministic).
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    grads
        .iter()
        .map(|g| {
            g.par_chunks(16384)
                .map(|c| c.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>())
                .collect::<Vec<f64>>()
                .into_iter()
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Scales gradients so that their global norm is at most `max` (PyTorch's
/// `clip_grad_norm_`: factor `max / (norm + 1e-6)` when that is below 1). Returns the norm
/// before clipping.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max: f64) -> f64 {
    let norm = global_norm(grads);
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        let c = coef as f32;
        for g in grads.iter_mut() {
            g.par_iter_mut().for_each(|v| *v *= c);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_steps_match_the_closed_form() {
        // One parameter, constant gradient g: after step 1, m̂ = g, v̂ = g², so
        // p1 = p0 (1 - lr wd) - lr g / (|g| + eps).
        let mut opt = Optimizer::new(
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.1,
            1e-2,
            &[1],
        );
        let mut p = [2.0f32];
        opt.update(&mut [&mut p[..]], &[vec![0.5]], 1e-2);
        let want = 2.0 * (1.0 - 1e-3) - 1e-2 * 0.5 / (0.5 + 1e-8);
        assert!((p[0] - want).abs() < 1e-7, "{} vs {want}", p[0]);
    }

    #[test]
    fn lion_moves_every_weight_by_lr_times_a_sign_and_decays_decoupled() {
        let mut opt = Optimizer::new(
            Rule::LionW {
                beta1: 0.9,
                beta2: 0.95,
            },
            0.5,
            1e-2,
            &[3],
        );
        let mut p = vec![1.0f32, -1.0, 0.25];
        opt.update(&mut [&mut p[..]], &[vec![3.0, -0.001, 0.0]], 5e-3);
        // decay factor 1 - (5e-3/1e-2) * 0.5 = 0.75
        assert_eq!(p, vec![0.75 - 5e-3, -0.75 + 5e-3, 0.1875]);
        let k = 1.0f32 - 0.95; // (1 - beta2) as f32 arithmetic gives it
        assert_eq!(opt.m[0], vec![k * 3.0, k * -0.001, 0.0]);
    }

    /// With bf16 state every stored moment is a bf16 value (its low 16 bits zero) and is
    /// the f32 update's moment rounded to nearest-even, checked against the `half` crate's
    /// conversion and against the bit rule itself; the first steps move the weights as the
    /// f32 optimizer does (they read the same f32 moments), and the two part later.
    #[test]
    fn bf16_state_stores_the_f32_moments_rounded() {
        for rule in [
            Rule::LionW {
                beta1: 0.9,
                beta2: 0.99,
            },
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let n = 257;
            let mut exact = Optimizer::new(rule, 0.1, 1e-2, &[n]);
            let mut rounded =
                Optimizer::new(rule, 0.1, 1e-2, &[n]).with_state_type(StateType::Bf16);
            let (mut p32, mut p16) = (vec![0.5f32; n], vec![0.5f32; n]);
            for step in 0..4u32 {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i as f32 * 0.37 + step as f32).sin() * 1e-3) + 1e-7 * i as f32)
                    .collect();
                // What the f32 rule makes of the rounded moments, rounded by the bit rule.
                let before = rounded.clone();
                let mut reference = before.clone().with_state_type(StateType::F32);
                let mut p_ref = p16.clone();
                reference.update(&mut [&mut p_ref[..]], std::slice::from_ref(&g), 1e-2);
                rounded.update(&mut [&mut p16[..]], std::slice::from_ref(&g), 1e-2);
                exact.update(&mut [&mut p32[..]], std::slice::from_ref(&g), 1e-2);
                assert_eq!(p16, p_ref, "the update reads f32 moments");
                let nearest_even = |x: f32| {
                    let b = x.to_bits();
                    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
                };
                for (moments, want) in [(&rounded.m, &reference.m), (&rounded.v, &reference.v)] {
                    for (got, want) in moments.iter().flatten().zip(want.iter().flatten()) {
                        assert_eq!(got.to_bits() & 0xffff, 0, "{got} is not a bf16 value");
                        assert_eq!(*got, nearest_even(*want));
                    }
                }
                if step == 0 {
                    assert_eq!(p16, p32, "the first step reads zero moments either way");
                }
            }
            assert_ne!(rounded.m, exact.m, "rounding changes the moments");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_global_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-12);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.3f32]];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.3);
    }
}
