//! The `model` kind: a Llama model as a Hugging Face directory (`config.json`,
//! safetensors, `tokenizer.json` when known), either freshly initialized at a given size
//! (seeded) or imported from local files, `s3://`, `http(s)://` or `hf://`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::config::ModelConfig;
use super::weights::Weights;
use crate::data::remote;
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "model"`.
pub static KIND: Kind = Kind {
    name: "model",
    version: 2,
    doc: "a decoder model (HF config.json + safetensors; Llama 2 and 3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2): a fresh Llama seeded at a given size, or imported with its tokenizer, generation and chat settings",
    params: &[
        Param {
            name: "source",
            ty: ParamType::Files,
            default: Default::Optional,
            doc: "import instead of initializing: the model's files (`dir/*`) or its directory URL (`hf://OWNER/NAME[@REV]`, `s3://bucket/prefix`, `https://...`)",
        },
        Param {
            name: "tokenizer",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "a tokenize stage's `tokenizer`: gives the vocabulary size and special ids, and is saved with the model",
        },
        Param {
            name: "hidden_size",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: width d [default: 256]",
        },
        Param {
            name: "intermediate_size",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: MLP width [default: 8d/3 rounded up to a multiple of 64]",
        },
        Param {
            name: "layers",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: transformer blocks [default: 4]",
        },
        Param {
            name: "heads",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: attention heads [default: 8]",
        },
        Param {
            name: "kv_heads",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: key/value heads, fewer for grouped-query attention [default: heads]",
        },
        Param {
            name: "vocab_size",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: vocabulary size [default: the tokenizer's]",
        },
        Param {
            name: "max_positions",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "fresh model: max_position_embeddings [default: 2048]",
        },
        Param {
            name: "tie_embeddings",
            ty: ParamType::Bool,
            default: Default::Optional,
            doc: "fresh model: share the embedding and LM head [default: false]",
        },
        Param {
            name: "rope_theta",
            ty: ParamType::Float,
            default: Default::Optional,
            doc: "fresh model: RoPE base [default: 10000]",
        },
        Param {
            name: "init_std",
            ty: ParamType::Float,
            default: Default::Optional,
            doc: "fresh model: std of the normal init of every matrix [default: 0.02]",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "fresh model: initialization seed",
        },
    ],
    outputs: &["model"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    source: Option<Vec<String>>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    layers: Option<i64>,
    heads: Option<i64>,
    kv_heads: Option<i64>,
    vocab_size: Option<i64>,
    max_positions: Option<i64>,
    tie_embeddings: Option<bool>,
    rope_theta: Option<f64>,
    init_std: Option<f64>,
    seed: i64,
}

fn positive(name: &str, v: Option<i64>, default: usize) -> Result<usize, StageError> {
    match v {
        None => Ok(default),
        Some(v) if v > 0 => Ok(v as usize),
        Some(v) => Err(StageError::Params(format!(
            "{name} must be positive (got {v})"
        ))),
    }
}

/// Special token ids a tokenize stage recorded.
fn specials(dir: &Path) -> Result<serde_json::Value, StageError> {
    let p = dir.join("special_tokens.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| StageError::io(format!("reading {}", p.display()), e))?;
    serde_json::from_str(&text).map_err(|e| StageError::Failed(format!("{}: {e}", p.display())))
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    let out = ctx.output("model")?;
    let tokenizer = ctx
        .inputs
        .get("tokenizer")
        .map(|s| s.artifacts[0].dir.clone());
    let weights = match &p.source {
        Some(files) => {
            let sized = [
                p.hidden_size,
                p.intermediate_size,
                p.layers,
                p.heads,
                p.kv_heads,
                p.vocab_size,
                p.max_positions,
            ]
            .iter()
            .any(Option::is_some)
                || p.tie_embeddings.is_some()
                || p.rope_theta.is_some()
                || p.init_std.is_some();
            if sized {
                return Err(StageError::Params(
                    "`source` imports a model whose size its config.json gives: drop the size params".into(),
                ));
            }
            let dir = import(files, ctx.scratch)?;
            let w = Weights::load(&dir)?;
            // Keep the tokenizer that came with the model unless one is given, and the
            // generation settings (its end-of-turn ids) and tokenizer settings (specials,
            // chat template) in any case.
            if tokenizer.is_none() && dir.join("tokenizer.json").is_file() {
                copy(&dir.join("tokenizer.json"), &out.join("tokenizer.json"))?;
            }
            for name in COMPANIONS {
                if dir.join(name).is_file() {
                    copy(&dir.join(name), &out.join(name))?;
                }
            }
            w
        }
        None => {
            let d = positive("hidden_size", p.hidden_size, 256)?;
            let heads = positive("heads", p.heads, 8)?;
            let mut vocab = p.vocab_size.map(|v| v as usize);
            let mut bos = None;
            let mut eos = None;
            if let Some(dir) = &tokenizer {
                let s = specials(dir)?;
                let tv = s["vocab_size"].as_u64().map(|v| v as usize);
                if let (Some(v), Some(t)) = (vocab, tv)
                    && v < t
                {
                    return Err(StageError::Params(format!(
                        "vocab_size {v} is smaller than the tokenizer's {t}"
                    )));
                }
                vocab = vocab.or(tv);
                bos = s["bos_id"].as_u64().map(|v| v as u32);
                eos = s["eos_id"].as_u64().map(|v| v as u32);
            }
            let vocab = vocab.ok_or_else(|| {
                StageError::Params("a fresh model needs `vocab_size` or a `tokenizer`".into())
            })?;
            let ff_default = (8 * d / 3).div_ceil(64) * 64;
            let mut config = ModelConfig::new(
                positive("vocab_size", Some(vocab as i64), vocab)?,
                d,
                positive("intermediate_size", p.intermediate_size, ff_default)?,
                positive("layers", p.layers, 4)?,
                heads,
                positive("kv_heads", p.kv_heads, heads)?,
                positive("max_positions", p.max_positions, 2048)?,
                p.tie_embeddings.unwrap_or(false),
            );
            config.rope_theta = p.rope_theta.unwrap_or(10000.0);
            config.initializer_range = p.init_std.unwrap_or(0.02);
            config.bos_token_id = bos;
            config.eos_token_id = eos.map(|e| json!(e));
            config.validate().map_err(StageError::Params)?;
            Weights::init(&config, p.seed as u64)
        }
    };
    if let Some(dir) = &tokenizer {
        copy(&dir.join("tokenizer.json"), &out.join("tokenizer.json"))?;
    }
    weights.save(out, Some(2 << 30))?;
    let c = &weights.config;
    let mut outcome = StageOutcome::default();
    for (k, v) in [
        ("params", c.param_count()),
        ("layers", c.num_hidden_layers),
        ("hidden_size", c.hidden_size),
        ("vocab_size", c.vocab_size),
    ] {
        outcome.metrics.insert(k.into(), json!(v));
    }
    Ok(outcome)
}

/// Files of a Hugging Face model directory kept beside the weights when present.
const COMPANIONS: [&str; 3] = [
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

fn copy(from: &Path, to: &Path) -> Result<(), StageError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| StageError::io(format!("copying {} to {}", from.display(), to.display()), e))
}

/// A local directory holding the model: the common directory of local files, or a download
/// of a remote model directory into scratch (resumable: finished files are kept).
fn import(files: &[String], scratch: &Path) -> Result<PathBuf, StageError> {
    if files.len() == 1 && files[0].contains("://") {
        let base = files[0].trim_end_matches('/');
        let dir = scratch.join("import");
        let get = |name: &str| -> Result<PathBuf, StageError> {
            let dest = crate::relpath::join_checked(&dir, name)
                .map_err(|e| StageError::Failed(format!("{base}: {e}")))?;
            let got = remote::fetch(&format!("{base}/{name}"), &dir.join("dl"))?;
            if !dest.is_file() {
                let parent = dest.parent().unwrap_or(&dir);
                std::fs::create_dir_all(parent)
                    .map_err(|e| StageError::io("creating the import dir", e))?;
                std::fs::rename(&got, &dest)
                    .map_err(|e| StageError::io(format!("moving {}", got.display()), e))?;
            }
            Ok(dest)
        };
        get("config.json")?;
        match get("model.safetensors.index.json") {
            Ok(index) => {
                let text = std::fs::read_to_string(&index)
                    .map_err(|e| StageError::io("reading the index", e))?;
                // Every shard name is checked before the first download: a name may not
                // leave the import directory (nor the remote model directory).
                let shards = super::weights::index_shards(&text).map_err(|e| {
                    StageError::Failed(format!("{base}/model.safetensors.index.json: {e}"))
                })?;
                for s in shards {
                    get(&s)?;
                }
            }
            Err(_) => {
                get("model.safetensors")?;
            }
        }
        let _ = get("tokenizer.json"); // optional
        for name in COMPANIONS {
            let _ = get(name); // optional
        }
        return Ok(dir);
    }
    let paths: Vec<&Path> = files.iter().map(Path::new).collect();
    let parent = paths
        .first()
        .and_then(|p| p.parent())
        .ok_or_else(|| StageError::Params("`source` matched no files".into()))?;
    if paths.iter().any(|p| p.parent() != Some(parent)) {
        return Err(StageError::Params(
            "`source` files must be in one directory (a model directory's `dir/*`)".into(),
        ));
    }
    Ok(parent.to_path_buf())
}
