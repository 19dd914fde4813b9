//! A model's shape, read from and written as a Hugging Face `config.json`, so that models
//! move between flow and `transformers` unchanged. What the fields mean for the computation
//! (the family's norm, biases, windows and RoPE) is [`super::arch::Arch`], derived from it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::arch::{Arch, Extra, Family};
use crate::kind::StageError;

/// The fields of a `config.json` flow reads (Llama's, and the families [`Family`] lists);
/// the others are kept in `extra` and written back unchanged, so a saved Qwen or Mistral
/// config still loads in `transformers` as what it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention when smaller than the head count (HF's default: equal).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_parameters = {rope_theta, rope_type}` instead of
    /// `rope_theta`; both are read.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Mistral's window of every layer; Qwen's of the layers `layer_types` (or
    /// `use_sliding_window` with `max_window_layers`) name.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Per layer `"full_attention"` or `"sliding_attention"` (transformers 5).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Every other field of the file, written back as read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The defaults of a family's `transformers` config class for the fields that change the
/// computation, filled in where a `config.json` omits them: `save_pretrained` leaves out
/// what equals the class default (Gemma 2's files have no `tie_word_embeddings`, and Gemma
/// ties), so reading a field as flow's generic default would build another model.
fn fill_class_defaults(obj: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::json;
    let defaults = match obj.get("model_type").and_then(|t| t.as_str()) {
        Some("gemma2") => vec![
            ("tie_word_embeddings", json!(true)),
            ("head_dim", json!(256)),
            ("rms_norm_eps", json!(1e-6)),
            ("hidden_activation", json!("gelu_pytorch_tanh")),
            ("query_pre_attn_scalar", json!(256)),
            ("sliding_window", json!(4096)),
            ("attn_logit_softcapping", json!(50.0)),
            ("final_logit_softcapping", json!(30.0)),
        ],
        Some("mistral") => vec![("sliding_window", json!(4096))],
        _ => return,
    };
    for (field, value) in defaults {
        obj.entry(field).or_insert(value);
    }
    // Gemma reads `hidden_activation`; keep `hidden_act` (which flow writes back) the same.
    if let Some(act) = obj.get("hidden_activation").cloned() {
        obj.entry("hidden_act").or_insert(act);
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_positions() -> usize {
    2048
}
fn default_init() -> f64 {
    0.02
}
fn default_act() -> String {
    "silu".into()
}
fn default_model_type() -> String {
    "llama".into()
}

impl ModelConfig {
    /// A config for a fresh model of the given size, as `ModelConfig(...)` would fill it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
        tie_word_embeddings: bool,
    ) -> ModelConfig {
        ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: Some(num_key_value_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings,
            tie_word_embeddings,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            rope_scaling: None,
            rope_parameters: None,
            model_type: "llama".into(),
            sliding_window: None,
            use_sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            extra: serde_json::Map::new(),
        }
    }

    /// RoPE's base, from `rope_parameters` (transformers 5) or `rope_theta`.
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(self.rope_theta)
    }

    /// RoPE's scaling (`rope_type` and its factors), from `rope_parameters` (transformers 5)
    /// or `rope_scaling`; None for plain RoPE.
    pub fn rope_scaling(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        let given = match &self.rope_parameters {
            Some(p) => Some(p),
            None => self.rope_scaling.as_ref(),
        }?;
        let map = given.as_object()?;
        let kind = map
            .get("rope_type")
            .or_else(|| map.get("type"))
            .and_then(|t| t.as_str());
        (kind != Some("default")).then_some(map)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Reads `config.json`; errors name the file and the field.
    pub fn read(path: &Path) -> Result<ModelConfig, StageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        let mut raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        if let Some(obj) = raw.as_object_mut() {
            fill_class_defaults(obj);
        }
        let config: ModelConfig = serde_json::from_value(raw)
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        let mut config = config;
        // What `write` sets itself: the class name (from the family) and the dtype (f32).
        for field in ["architectures", "torch_dtype", "dtype"] {
            config.extra.remove(field);
        }
        // One spelling on the way out: `rope_theta` and (when scaled) `rope_scaling`, which
        // transformers 4 and 5 both read.
        config.rope_theta = config.theta();
        if config.rope_parameters.is_some() {
            config.rope_scaling = config.rope_scaling().map(|m| {
                let mut m = m.clone();
                m.remove("rope_theta");
                serde_json::Value::Object(m)
            });
            config.rope_parameters = None;
        }
        Ok(config)
    }

    /// Writes `config.json` as `transformers` expects it.
    pub fn write(&self, path: &Path) -> Result<(), StageError> {
        let mut value = serde_json::to_value(self).expect("configs serialize");
        let obj = value.as_object_mut().expect("an object");
        let family = Family::of(self).expect("a validated config names its family");
        obj.insert(
            "architectures".into(),
            serde_json::json!([family.architecture()]),
        );
        obj.insert("torch_dtype".into(), serde_json::json!("float32"));
        // flow's unset fields go; a null the file had stays (Gemma 2's null soft cap means
        // none, its absence the class default).
        obj.retain(|k, v| !v.is_null() || self.extra.contains_key(k));
        let text = serde_json::to_string_pretty(&value).expect("json");
        std::fs::write(path, text + "\n")
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
    }

    /// What flow cannot run, named by field: the shape's own rules here, the family's
    /// features in [`Arch::of`].
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(format!("field `{field}` must be positive"));
            }
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "field `num_key_value_heads` ({kv}) must divide `num_attention_heads` ({})",
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even (RoPE)",
                self.head_dim()
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "field `hidden_size` ({}) must be a multiple of `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Arch::of(self).map(|_| ())
    }

    /// Parameter count (embeddings included, tied ones once).
    pub fn param_count(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let q = self.num_attention_heads * hd;
        let kv = self.kv_heads() * hd;
        let arch = Arch::of(self).expect("a validated config");
        let extras: usize = arch
            .extras()
            .iter()
            .map(|e| match e {
                Extra::Bias(p) => p.shape(self).0,
                Extra::QNorm | Extra::KNorm => hd,
                Extra::PostAttnNorm | Extra::PostMlpNorm => d,
            })
            .sum();
        let layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d + extras;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Gemma 2 `config.json` as `save_pretrained` writes it leaves out what equals the
    /// class defaults (tying among them): read, it is the model transformers builds.
    #[test]
    fn omitted_fields_take_the_family_class_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let fields = r#""vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2"#;
        std::fs::write(&path, format!(r#"{{"model_type": "gemma2", {fields}}}"#)).unwrap();
        let c = ModelConfig::read(&path).unwrap();
        assert!(c.tie_word_embeddings);
        assert_eq!(
            (c.head_dim(), c.rms_norm_eps, c.sliding_window),
            (256, 1e-6, Some(4096))
        );
        let a = Arch::of(&c).unwrap();
        assert_eq!((a.attn_softcap, a.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(a.attn_scale, 1.0 / 16.0);
        // What a file states wins, null included.
        std::fs::write(
            &path,
            format!(
                r#"{{"model_type": "gemma2", "tie_word_embeddings": false,
                "final_logit_softcapping": null, {fields}}}"#
            ),
        )
        .unwrap();
        let c = ModelConfig::read(&path).unwrap();
        assert!(!c.tie_word_embeddings);
        assert_eq!(Arch::of(&c).unwrap().final_softcap, None);
        // Llama's generic defaults stay.
        std::fs::write(&path, format!(r#"{{"model_type": "llama", {fields}}}"#)).unwrap();
        let c = ModelConfig::read(&path).unwrap();
        assert!(!c.tie_word_embeddings && c.sliding_window.is_none());
    }
}
