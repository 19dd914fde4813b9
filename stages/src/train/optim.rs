//! Optimizers over flat f32 parameter lists: decoupled LionW (the paper's) and AdamW
//! (PyTorch's semantics), plus global-norm gradient clipping as `clip_grad_norm_`.
//! Written out here (a few lines each) so that their state is plain vectors we checkpoint
//! bit-exactly, and so that they touch only what trains.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::gpu::precision::LossScale;

/// Which update rule, with its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Rule {
    /// `u = sign(b1 m + (1-b1) g); p -= lr u; m = b2 m + (1-b2) g`, with decoupled decay
    /// `p *= 1 - (lr / lr_max) wd` (Composer's DecoupledLionW).
    LionW { beta1: f32, beta2: f32 },
    /// PyTorch's AdamW: `p *= 1 - lr wd`, bias-corrected moments.
    AdamW { beta1: f32, beta2: f32, eps: f32 },
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
        }
    }

    /// One update of every parameter tensor with its gradient at learning rate `lr`.
    pub fn update(&mut self, params: &mut [&mut [f32]], grads: &[Vec<f32>], lr: f32) {
        self.step += 1;
        let t = self.step as i32;
        let wd = self.weight_decay;
        const CHUNK: usize = 16384;
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
                                *m = beta2 * *m + (1.0 - beta2) * g;
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
                                *m = beta1 * *m + (1.0 - beta1) * g;
                                *v = beta2 * *v + (1.0 - beta2) * g * g;
                                let denom = v.sqrt() / bc2_sqrt + eps;
                                *p -= step_size * *m / denom;
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
