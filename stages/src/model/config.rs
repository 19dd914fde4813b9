//! A Llama model's shape, read from and written as a Hugging Face `config.json`, so that
//! models move between flow and `transformers` unchanged.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::kind::StageError;

/// The fields of `LlamaConfig` flow uses; others in the file are ignored on import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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

impl LlamaConfig {
    /// A config for a fresh model of the given size, as `LlamaConfig(...)` would fill it.
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
    ) -> LlamaConfig {
        LlamaConfig {
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

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Reads `config.json`; errors name the file and the field.
    pub fn read(path: &Path) -> Result<LlamaConfig, StageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        let config: LlamaConfig = serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        let mut config = config;
        config.rope_theta = config.theta();
        config.rope_parameters = None;
        Ok(config)
    }

    /// Writes `config.json` as `transformers` expects it.
    pub fn write(&self, path: &Path) -> Result<(), StageError> {
        let mut value = serde_json::to_value(self).expect("configs serialize");
        let obj = value.as_object_mut().expect("an object");
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
        obj.insert("torch_dtype".into(), serde_json::json!("float32"));
        obj.retain(|_, v| !v.is_null());
        let text = serde_json::to_string_pretty(&value).expect("json");
        std::fs::write(path, text + "\n")
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
    }

    /// What flow's Llama cannot run, named by field.
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
        if self.model_type != "llama" {
            return Err(format!(
                "field `model_type` is {:?}; flow runs Llama models only",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "field `hidden_act` is {:?}; Llama uses \"silu\"",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err("fields `attention_bias`/`mlp_bias`: biases are not supported".into());
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .and_then(|t| t.as_str());
        if rope_type.is_some_and(|t| t != "default") {
            return Err(format!(
                "field `rope_parameters.rope_type` is {rope_type:?}: only \"default\" RoPE is supported"
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("field `rope_scaling`: scaled RoPE is not supported".into());
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
        Ok(())
    }

    /// Parameter count (embeddings included, tied ones once).
    pub fn param_count(&self) -> usize {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let q = self.num_attention_heads * hd;
        let kv = self.kv_heads() * hd;
        let layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.num_hidden_layers * layer + d + head
    }
}
