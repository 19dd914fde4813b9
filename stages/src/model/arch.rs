//! The one description of a model's architecture that every path reads: the CPU engine's
//! forward and backward pass (`cpu::llama`), its KV-cached decoder (`cpu::decode`) and the
//! burn graph (`gpu::llama`).
//!
//! The supported families are one decoder (pre-norm RMSNorm, rotary attention with grouped
//! query heads, a SwiGLU MLP) with a few variations, and each variation is a field here,
//! not a family name: which projections carry a bias, whether queries and keys get a
//! per-head RMSNorm, each layer's attention window, and RoPE's frequencies. A path
//! implements every variation once and never asks which family it runs, so a new family
//! that only recombines them is a new arm in [`Arch::of`] (and its name in [`Family`]); one
//! that needs a new variation adds a field here and its implementation in each of the three
//! paths. (litgpt drives ~20 families from flags the same way; transformers forks a file
//! per family, which three paths cannot afford.)

use serde_json::Value;

use super::config::ModelConfig;
use super::weights::Proj;

/// A model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
}

impl Family {
    const ALL: [Family; 5] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Phi3,
    ];

    /// The family a config names, or an error naming the field.
    pub fn of(c: &ModelConfig) -> Result<Family, String> {
        Family::ALL
            .into_iter()
            .find(|f| f.model_type() == c.model_type)
            .ok_or_else(|| {
                let known: Vec<&str> = Family::ALL.iter().map(|f| f.model_type()).collect();
                format!(
                    "field `model_type` is {:?}; flow runs {}",
                    c.model_type,
                    known.join(", ")
                )
            })
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
        }
    }

    /// The `transformers` class a saved model names in `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// A layer's optional tensors, stored after the ones every family has (see
/// [`super::weights::Weights::layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// `{module}.bias` of a projection, `[out]`.
    Bias(Proj),
    /// `self_attn.q_norm.weight`, `[head_dim]`: RMSNorm of each query head before RoPE.
    QNorm,
    /// `self_attn.k_norm.weight`, `[head_dim]`.
    KNorm,
}

/// What the computation of a model is, beyond its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub family: Family,
    /// Which projections add a bias, indexed by `Proj as usize`.
    pub bias: [bool; 7],
    /// Per-head RMSNorm of queries and keys (weights `[head_dim]`) before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer: `Some(w)` lets a query see only the `w` latest keys (itself included),
    /// as transformers' `kv_idx > q_idx - sliding_window`; None is plain causal attention.
    pub windows: Vec<Option<usize>>,
    /// RoPE's inverse frequency of each pair of a head's dimensions, scaling applied.
    pub inv_freq: Vec<f32>,
    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`: a matter of
    /// the files only (split on load, joined on save), the computation is the same.
    pub fused: bool,
}

impl Arch {
    /// The architecture a config describes, or an error naming the field flow cannot run.
    pub fn of(c: &ModelConfig) -> Result<Arch, String> {
        let family = Family::of(c)?;
        if c.hidden_act != "silu" {
            return Err(format!(
                "field `hidden_act` is {:?}; the {} family uses \"silu\"",
                c.hidden_act,
                family.model_type()
            ));
        }
        let mut bias = [false; 7];
        let attention = [Proj::Q, Proj::K, Proj::V, Proj::O];
        let mlp = [Proj::Gate, Proj::Up, Proj::Down];
        let mut set = |ps: &[Proj]| ps.iter().for_each(|p| bias[*p as usize] = true);
        match family {
            Family::Llama | Family::Qwen3 => {
                if c.attention_bias {
                    set(&attention);
                }
                if c.mlp_bias {
                    set(&mlp);
                }
            }
            Family::Mistral | Family::Phi3 => {}
            // Qwen2 always has q/k/v biases (its config has no field for them).
            Family::Qwen2 => set(&[Proj::Q, Proj::K, Proj::V]),
        }
        if matches!(family, Family::Mistral | Family::Phi3) && (c.attention_bias || c.mlp_bias) {
            return Err(format!(
                "fields `attention_bias`/`mlp_bias`: {} has no biases",
                family.model_type()
            ));
        }
        let partial = c
            .extra
            .get("partial_rotary_factor")
            .or_else(|| c.rope_parameters.as_ref()?.get("partial_rotary_factor"))
            .and_then(Value::as_f64);
        if let Some(f) = partial
            && f != 1.0
        {
            return Err(format!(
                "field `partial_rotary_factor` is {f}: flow rotates whole heads (1.0)"
            ));
        }
        Ok(Arch {
            family,
            bias,
            qk_norm: family == Family::Qwen3,
            windows: windows(c, family)?,
            inv_freq: inv_freq(c)?,
            fused: family == Family::Phi3,
        })
    }

    /// A layer's optional tensors in storage order: biases in projection order, then the
    /// query and key norms.
    pub fn extras(&self) -> Vec<Extra> {
        let mut out: Vec<Extra> = Proj::ALL
            .into_iter()
            .filter(|p| self.bias[*p as usize])
            .map(Extra::Bias)
            .collect();
        if self.qk_norm {
            out.extend([Extra::QNorm, Extra::KNorm]);
        }
        out
    }
}

/// Each layer's attention window.
fn windows(c: &ModelConfig, family: Family) -> Result<Vec<Option<usize>>, String> {
    let n = c.num_hidden_layers;
    let window = |what: &str| -> Result<usize, String> {
        match c.sliding_window {
            Some(0) => Err("field `sliding_window` must be positive".into()),
            Some(w) => Ok(w),
            None => Err(format!("{what} but field `sliding_window` is not set")),
        }
    };
    match family {
        Family::Llama => Ok(vec![None; n]),
        // Mistral and Phi-3 slide every layer when `sliding_window` is set, none when null.
        Family::Mistral | Family::Phi3 => match c.sliding_window {
            Some(_) => Ok(vec![Some(window("")?); n]),
            None => Ok(vec![None; n]),
        },
        Family::Qwen2 | Family::Qwen3 => {
            if let Some(types) = &c.layer_types {
                if types.len() != n {
                    return Err(format!(
                        "field `layer_types` has {} entries for {n} layers",
                        types.len()
                    ));
                }
                return types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        "full_attention" => Ok(None),
                        "sliding_attention" => {
                            window(&format!("`layer_types[{i}]` is \"sliding_attention\"")).map(Some)
                        }
                        other => Err(format!(
                            "field `layer_types[{i}]` is {other:?}: \"full_attention\" or \"sliding_attention\""
                        )),
                    })
                    .collect();
            }
            if c.use_sliding_window != Some(true) {
                return Ok(vec![None; n]);
            }
            // transformers: layers from `max_window_layers` on slide.
            let w = window("`use_sliding_window` is true")?;
            let from = c.max_window_layers.unwrap_or(n);
            Ok((0..n).map(|l| (l >= from).then_some(w)).collect())
        }
    }
}

/// RoPE's inverse frequencies, as transformers computes them in f32: `theta^(-2i/d)`, then
/// the config's scaling (`llama3`: Llama 3.1's smooth interpolation between the low- and
/// high-frequency bands; `linear`: every frequency over `factor`).
fn inv_freq(c: &ModelConfig) -> Result<Vec<f32>, String> {
    let hd = c.head_dim();
    let theta = c.theta() as f32;
    let base: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    let Some(scaling) = c.rope_scaling() else {
        return Ok(base);
    };
    let field = if c.rope_parameters.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("field `{field}.rope_type` is missing"))?;
    let num = |key: &str| -> Result<f32, String> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("field `{field}.{key}` is missing or not a number"))
    };
    match kind {
        "linear" => {
            let factor = num("factor")?;
            Ok(base.into_iter().map(|f| f / factor).collect())
        }
        "llama3" => {
            let factor = num("factor")?;
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            let old = num("original_max_position_embeddings")?;
            if high <= low || factor <= 0.0 {
                return Err(format!(
                    "field `{field}`: llama3 scaling needs high_freq_factor > low_freq_factor and factor > 0"
                ));
            }
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            Ok(base
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
        other => Err(format!(
            "field `{field}.rope_type` is {other:?}: flow supports \"default\", \"linear\" and \"llama3\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model_type: &str) -> ModelConfig {
        let mut c = ModelConfig::new(64, 32, 64, 4, 4, 2, 128, false);
        c.model_type = model_type.into();
        c
    }

    #[test]
    fn each_family_sets_its_variations() {
        let llama = Arch::of(&config("llama")).unwrap();
        assert_eq!(llama.extras(), []);
        assert_eq!(llama.windows, [None; 4]);
        let qwen2 = Arch::of(&config("qwen2")).unwrap();
        assert_eq!(
            qwen2.extras(),
            [
                Extra::Bias(Proj::Q),
                Extra::Bias(Proj::K),
                Extra::Bias(Proj::V)
            ]
        );
        let qwen3 = Arch::of(&config("qwen3")).unwrap();
        assert_eq!(qwen3.extras(), [Extra::QNorm, Extra::KNorm]);
        let mut mistral = config("mistral");
        mistral.sliding_window = Some(8);
        assert_eq!(Arch::of(&mistral).unwrap().windows, [Some(8); 4]);
        let mut q = config("qwen2");
        q.sliding_window = Some(16);
        q.use_sliding_window = Some(true);
        q.max_window_layers = Some(2);
        assert_eq!(
            Arch::of(&q).unwrap().windows,
            [None, None, Some(16), Some(16)]
        );
        q.layer_types = Some(vec!["sliding_attention".into(); 3]);
        assert!(
            Arch::of(&q)
                .unwrap_err()
                .contains("`layer_types` has 3 entries")
        );
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        let e = Arch::of(&config("gemma2")).unwrap_err();
        assert!(e.contains("`model_type`") && e.contains("qwen3"), "{e}");
        let mut c = config("llama");
        c.rope_scaling = Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
        let e = Arch::of(&c).unwrap_err();
        assert!(
            e.contains("`rope_scaling.rope_type`") && e.contains("yarn"),
            "{e}"
        );
        c.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
        let e = Arch::of(&c).unwrap_err();
        assert!(e.contains("`rope_scaling.low_freq_factor`"), "{e}");
        let mut c = config("qwen2");
        c.use_sliding_window = Some(true);
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`sliding_window` is not set")
        );
        let mut c = config("llama");
        c.hidden_act = "gelu".into();
        assert!(Arch::of(&c).unwrap_err().contains("`hidden_act`"));
        let mut c = config("phi3");
        assert!(Arch::of(&c).unwrap().fused);
        c.rope_scaling = Some(serde_json::json!({"type": "longrope", "short_factor": [1.0]}));
        assert!(Arch::of(&c).unwrap_err().contains("\"longrope\""));
        c.rope_scaling = None;
        c.extra
            .insert("partial_rotary_factor".into(), serde_json::json!(0.5));
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`partial_rotary_factor`")
        );
    }

    /// Llama 3.1's scaling keeps the high frequencies, divides the low ones by `factor` and
    /// blends between (transformers' `_compute_llama3_parameters`, worked by hand at the
    /// band edges).
    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = config("llama");
        c.rope_theta = 500000.0;
        c.rope_scaling = Some(serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16
        }));
        let scaled = Arch::of(&c).unwrap().inv_freq;
        c.rope_scaling = None;
        let plain = Arch::of(&c).unwrap().inv_freq;
        for (s, p) in scaled.iter().zip(&plain) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 4.0 {
                assert_eq!(s, p);
            } else if wavelen > 16.0 {
                assert_eq!(*s, p / 8.0);
            } else {
                assert!(*s < *p && *s > p / 8.0);
            }
        }
        assert!(scaled.iter().zip(&plain).any(|(s, p)| s != p));
    }
}
