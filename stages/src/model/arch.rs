//! The one description of a model's architecture that every path reads: the CPU engine's
//! forward and backward pass (`cpu::llama`), its KV-cached decoder (`cpu::decode`) and the
//! burn graph (`gpu::llama`).
//!
//! The supported families are one decoder (pre-norm RMSNorm, rotary attention with grouped
//! query heads, a gated MLP) with a few variations, and each variation is a field here,
//! not a family name: which projections carry a bias, whether queries and keys get a
//! per-head RMSNorm, each layer's attention window, RoPE's frequencies, the norm's form
//! and whether block outputs are normed too, the MLP's activation, the embedding and
//! attention scales and the soft caps of scores and logits. A path
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
    Gemma2,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Phi3,
        Family::Gemma2,
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
            Family::Gemma2 => "gemma2",
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
            Family::Gemma2 => "Gemma2ForCausalLM",
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
    /// `post_attention_layernorm.weight`, `[hidden]`: Gemma 2's norm of the attention
    /// output before the residual add (its MLP's input norm is `pre_feedforward_layernorm`).
    PostAttnNorm,
    /// `post_feedforward_layernorm.weight`, `[hidden]`: the same of the MLP output.
    PostMlpNorm,
}

/// The activation of the MLP's gate: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `x * sigmoid(x)` (SwiGLU), `hidden_act = "silu"`.
    Silu,
    /// GELU's tanh approximation (GeGLU), `"gelu_pytorch_tanh"` as Gemma has it.
    GeluTanh,
}

impl Act {
    fn parse(name: &str) -> Option<Act> {
        match name {
            "silu" | "swish" => Some(Act::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Some(Act::GeluTanh),
            _ => None,
        }
    }
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
    /// RoPE's cos and sin are multiplied by this (LongRoPE's attention factor; else 1).
    pub rope_factor: f32,
    /// The longest sequence flow runs the model at: `max_position_embeddings`, or with
    /// LongRoPE `original_max_position_embeddings` (transformers switches to the long
    /// factors past it; flow has the short ones only, and refuses longer rows).
    pub positions: usize,
    /// Whether `positions` is LongRoPE's short range.
    pub long_rope: bool,
    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`: a matter of
    /// the files only (split on load, joined on save), the computation is the same.
    pub fused: bool,
    /// Every RMSNorm multiplies by `norm_offset + w`: 0, or 1 for Gemma (whose norm weights
    /// start at 0 and are stored so).
    pub norm_offset: f32,
    /// Gemma 2's norms of the attention and MLP outputs ([`Extra::PostAttnNorm`],
    /// [`Extra::PostMlpNorm`]) before each residual add.
    pub post_norms: bool,
    pub act: Act,
    /// Embeddings are multiplied by this after the lookup (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f32>,
    /// The attention scores' scale: `head_dim^-1/2`, or `query_pre_attn_scalar^-1/2`
    /// (Gemma 2).
    pub attn_scale: f32,
    /// `cap * tanh(s / cap)` of the scaled attention scores, before the mask
    /// (`attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// The same of the final logits (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
}

impl Arch {
    /// The architecture a config describes, or an error naming the field flow cannot run.
    pub fn of(c: &ModelConfig) -> Result<Arch, String> {
        let family = Family::of(c)?;
        let gemma = family == Family::Gemma2;
        // Gemma's configs name the activation `hidden_activation`; the others `hidden_act`.
        let (act_field, act_name) = match c.extra.get("hidden_activation").and_then(Value::as_str) {
            Some(a) if gemma => ("hidden_activation", a),
            _ => ("hidden_act", c.hidden_act.as_str()),
        };
        let act = match Act::parse(act_name) {
            Some(Act::GeluTanh) if gemma => Act::GeluTanh,
            Some(Act::Silu) if !gemma => Act::Silu,
            _ => {
                return Err(format!(
                    "field `{act_field}` is {act_name:?}; the {} family uses {:?}",
                    family.model_type(),
                    if gemma { "gelu_pytorch_tanh" } else { "silu" }
                ));
            }
        };
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
            Family::Mistral | Family::Phi3 | Family::Gemma2 => {}
            // Qwen2 always has q/k/v biases (its config has no field for them).
            Family::Qwen2 => set(&[Proj::Q, Proj::K, Proj::V]),
        }
        if matches!(family, Family::Mistral | Family::Phi3 | Family::Gemma2)
            && (c.attention_bias || c.mlp_bias)
        {
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
        let positive = |field: &str| -> Result<Option<f32>, String> {
            match c.extra.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(x) if x > 0.0 => Ok(Some(x as f32)),
                    _ => Err(format!("field `{field}` must be a positive number or null")),
                },
            }
        };
        let attn_scale = match positive("query_pre_attn_scalar")? {
            Some(s) if gemma => 1.0 / s.sqrt(),
            _ => 1.0 / (c.head_dim() as f32).sqrt(),
        };
        let (attn_softcap, final_softcap) = if gemma {
            (
                positive("attn_logit_softcapping")?,
                positive("final_logit_softcapping")?,
            )
        } else {
            (None, None)
        };
        let rope = rope(c)?;
        Ok(Arch {
            family,
            bias,
            qk_norm: family == Family::Qwen3,
            windows: windows(c, family)?,
            inv_freq: rope.inv_freq,
            rope_factor: rope.factor,
            positions: rope.positions.unwrap_or(c.max_position_embeddings),
            long_rope: rope.positions.is_some(),
            fused: family == Family::Phi3,
            norm_offset: if gemma { 1.0 } else { 0.0 },
            post_norms: gemma,
            act,
            // transformers: `torch.tensor(hidden_size ** 0.5, dtype)`, the f64 root rounded.
            embed_scale: gemma.then(|| (c.hidden_size as f64).sqrt() as f32),
            attn_scale,
            attn_softcap,
            final_softcap,
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
        if self.post_norms {
            out.extend([Extra::PostAttnNorm, Extra::PostMlpNorm]);
        }
        out
    }

    /// Where [`Arch::positions`] comes from, for messages.
    pub fn positions_source(&self) -> &'static str {
        if self.long_rope {
            "longrope's `original_max_position_embeddings`: flow has its short factors only"
        } else {
            "`max_position_embeddings`"
        }
    }

    /// A norm's effective weight, `norm_offset + w` (borrowed when there is no offset).
    pub fn norm_weight<'w>(&self, w: &'w [f32]) -> std::borrow::Cow<'w, [f32]> {
        if self.norm_offset == 0.0 {
            std::borrow::Cow::Borrowed(w)
        } else {
            w.iter().map(|v| v + self.norm_offset).collect()
        }
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
        Family::Qwen2 | Family::Qwen3 | Family::Gemma2 => {
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
            if family == Family::Gemma2 {
                // Gemma 2 without `layer_types`: even layers slide, odd ones see everything.
                let w = window("a gemma2 config has no `layer_types`")?;
                return Ok((0..n).map(|l| (l % 2 == 0).then_some(w)).collect());
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

/// RoPE as a config asks for it.
struct RopeSpec {
    inv_freq: Vec<f32>,
    factor: f32,
    /// A limit on positions the scaling sets (LongRoPE's short range).
    positions: Option<usize>,
}

/// RoPE's inverse frequencies, as transformers computes them in f32: `theta^(-2i/d)`, then
/// the config's scaling (`llama3`: Llama 3.1's smooth interpolation between the low- and
/// high-frequency bands; `linear`: every frequency over `factor`; `longrope` (Phi-3's,
/// once `su`): each frequency over its `short_factor`, cos and sin times the attention
/// factor).
fn rope(c: &ModelConfig) -> Result<RopeSpec, String> {
    let hd = c.head_dim();
    let theta = c.theta() as f32;
    let powers: Vec<f32> = (0..hd / 2)
        .map(|i| theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    let base: Vec<f32> = powers.iter().map(|p| 1.0 / p).collect();
    let plain = |inv_freq| RopeSpec {
        inv_freq,
        factor: 1.0,
        positions: None,
    };
    let Some(scaling) = c.rope_scaling() else {
        return Ok(plain(base));
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
            Ok(plain(base.into_iter().map(|f| f / factor).collect()))
        }
        "longrope" | "su" => {
            let short: Vec<f32> = scaling
                .get("short_factor")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_f64)
                        .map(|v| v as f32)
                        .collect()
                })
                .unwrap_or_default();
            if short.len() != hd / 2 || short.iter().any(|f| *f <= 0.0) {
                return Err(format!(
                    "field `{field}.short_factor` must be {} positive numbers (one per pair of a head's dimensions)",
                    hd / 2
                ));
            }
            // transformers 5 keeps it in the scaling, 4 beside `max_position_embeddings`.
            let original = scaling
                .get("original_max_position_embeddings")
                .or_else(|| c.extra.get("original_max_position_embeddings"))
                .and_then(Value::as_u64)
                .filter(|v| *v > 1)
                .ok_or("field `original_max_position_embeddings` is missing (longrope needs it)")?
                as usize;
            let factor = match scaling.get("factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => c.max_position_embeddings as f64 / original as f64,
            };
            let attention = match scaling.get("attention_factor").and_then(Value::as_f64) {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Ok(RopeSpec {
                inv_freq: powers
                    .iter()
                    .zip(&short)
                    .map(|(p, s)| 1.0 / (s * p))
                    .collect(),
                factor: attention as f32,
                positions: Some(original.min(c.max_position_embeddings)),
            })
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
            Ok(plain(
                base.into_iter()
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
                    .collect(),
            ))
        }
        other => Err(format!(
            "field `{field}.rope_type` is {other:?}: flow supports \"default\", \"linear\", \"llama3\" and \"longrope\""
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
        let e = Arch::of(&config("gemma3")).unwrap_err();
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
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`rope_scaling.short_factor` must be 4")
        );
        c.rope_scaling =
            Some(serde_json::json!({"type": "longrope", "short_factor": [1.0, 1.0, 1.0, 1.0]}));
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`original_max_position_embeddings`")
        );
        c.rope_scaling = None;
        c.extra
            .insert("partial_rotary_factor".into(), serde_json::json!(0.5));
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`partial_rotary_factor`")
        );
    }

    #[test]
    fn gemma2_sets_its_norms_scales_caps_and_alternating_windows() {
        let mut c = config("gemma2");
        c.head_dim = Some(16);
        c.sliding_window = Some(8);
        c.extra
            .insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        c.extra.insert("query_pre_attn_scalar".into(), 64.into());
        c.extra.insert("attn_logit_softcapping".into(), 50.0.into());
        c.extra
            .insert("final_logit_softcapping".into(), Value::Null);
        let a = Arch::of(&c).unwrap();
        assert_eq!(
            (a.norm_offset, a.post_norms, a.act),
            (1.0, true, Act::GeluTanh)
        );
        assert_eq!(a.embed_scale, Some((32f64).sqrt() as f32));
        assert_eq!(a.attn_scale, 0.125);
        assert_eq!((a.attn_softcap, a.final_softcap), (Some(50.0), None));
        assert_eq!(a.windows, [Some(8), None, Some(8), None]);
        assert_eq!(a.extras(), [Extra::PostAttnNorm, Extra::PostMlpNorm]);
        assert_eq!(&*a.norm_weight(&[0.5, -1.0]), &[1.5, 0.0]);
        c.extra.insert("hidden_activation".into(), "silu".into());
        let e = Arch::of(&c).unwrap_err();
        assert!(
            e.contains("`hidden_activation`") && e.contains("gelu_pytorch_tanh"),
            "{e}"
        );
        c.extra
            .insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
        c.extra
            .insert("attn_logit_softcapping".into(), (-1.0).into());
        assert!(
            Arch::of(&c)
                .unwrap_err()
                .contains("`attn_logit_softcapping`")
        );
        // Llama reads none of Gemma's fields.
        let mut l = config("llama");
        l.extra = c.extra.clone();
        let a = Arch::of(&l).unwrap();
        assert_eq!(
            (a.norm_offset, a.embed_scale, a.attn_softcap),
            (0.0, None, None)
        );
        assert_eq!(a.attn_scale, 1.0 / 8f32.sqrt());
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
