//! A model's parameters on the host, f32, in Hugging Face's names and layout (a Linear
//! weight is `[out, in]`), read from and written as safetensors, single file or sharded with
//! `model.safetensors.index.json`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::arch::{Arch, Extra};
use super::config::ModelConfig;
use crate::data::rng::Rng;
use crate::kind::StageError;
use crate::relpath::checked_rel_path;

/// One named parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            name: name.into(),
            shape,
            data: vec![0.0; n],
        }
    }
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// The seven projections LoRA can adapt, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// `q` ... `down`, as in pipeline files.
    pub fn short(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }

    /// The module path under `model.layers.N.` (PEFT's target module names end with it).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    pub fn parse(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.short() == s)
    }

    /// (out, in) features of this projection.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim();
        let kv = c.kv_heads() * c.head_dim();
        match self {
            Proj::Q => (q, d),
            Proj::K | Proj::V => (kv, d),
            Proj::O => (d, q),
            Proj::Gate | Proj::Up => (f, d),
            Proj::Down => (d, f),
        }
    }
}

/// Position of each tensor in [`Weights::tensors`]: the embedding, then per layer the
/// attention norm, q, k, v, o, the MLP norm, gate, up, down; then the final norm and, when
/// the embeddings are not tied, the LM head; then each layer's [`Extra`] tensors (biases,
/// query and key norms), as the architecture has them.
pub const PER_LAYER: usize = 9;

/// A model: config, the architecture it describes, and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub config: ModelConfig,
    /// `Arch::of(&config)`, kept beside it: every pass reads it.
    pub arch: Arch,
    pub tensors: Vec<Tensor>,
}

impl Weights {
    /// Names and shapes of every parameter, in storage order.
    pub fn layout(c: &ModelConfig, arch: &Arch) -> Vec<(String, Vec<usize>)> {
        let d = c.hidden_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![c.vocab_size, d],
        )];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            for proj in [Proj::Q, Proj::K, Proj::V, Proj::O] {
                let (o, i) = proj.shape(c);
                out.push((format!("{p}.{}.weight", proj.module()), vec![o, i]));
            }
            // Gemma 2's `post_attention_layernorm` norms the attention output (an extra);
            // its MLP's input norm is the `pre_feedforward_layernorm`.
            let mlp_norm = if arch.post_norms {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            };
            out.push((format!("{p}.{mlp_norm}.weight"), vec![d]));
            for proj in [Proj::Gate, Proj::Up, Proj::Down] {
                let (o, i) = proj.shape(c);
                out.push((format!("{p}.{}.weight", proj.module()), vec![o, i]));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        if !c.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
        }
        let extras = arch.extras();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for e in &extras {
                out.push(match e {
                    Extra::Bias(proj) => {
                        (format!("{p}.{}.bias", proj.module()), vec![proj.shape(c).0])
                    }
                    Extra::QNorm => (format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim()]),
                    Extra::KNorm => (format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim()]),
                    Extra::PostAttnNorm => {
                        (format!("{p}.post_attention_layernorm.weight"), vec![d])
                    }
                    Extra::PostMlpNorm => {
                        (format!("{p}.post_feedforward_layernorm.weight"), vec![d])
                    }
                });
            }
        }
        out
    }

    /// Index of a layer's tensor: `j` is 0 (attention norm), 1..=4 (q, k, v, o), 5 (MLP
    /// norm), 6..=8 (gate, up, down).
    pub fn layer_index(layer: usize, j: usize) -> usize {
        1 + layer * PER_LAYER + j
    }

    pub fn proj_index(layer: usize, proj: Proj) -> usize {
        let j = match proj {
            Proj::Q => 1,
            Proj::K => 2,
            Proj::V => 3,
            Proj::O => 4,
            Proj::Gate => 6,
            Proj::Up => 7,
            Proj::Down => 8,
        };
        Self::layer_index(layer, j)
    }

    pub fn final_norm_index(&self) -> usize {
        1 + self.config.num_hidden_layers * PER_LAYER
    }

    /// The LM head: its own tensor, or the embedding when tied.
    pub fn lm_head_index(&self) -> usize {
        if self.config.tie_word_embeddings {
            0
        } else {
            self.final_norm_index() + 1
        }
    }

    /// Index of a layer's optional tensor, None when the architecture has none.
    pub fn extra_index(&self, layer: usize, extra: Extra) -> Option<usize> {
        extra_index(&self.config, &self.arch, layer, extra)
    }

    /// A projection's bias, if it has one.
    pub fn bias(&self, layer: usize, proj: Proj) -> Option<&[f32]> {
        self.extra_index(layer, Extra::Bias(proj))
            .map(|i| self.tensors[i].data.as_slice())
    }

    /// A freshly initialized model as `transformers` initializes one: Linear and Embedding
    /// weights ~ N(0, initializer_range), norms at 1 (at 0 where the norm adds 1 itself,
    /// Gemma's). Seeded: same seed, same bits.
    /// `config` must be valid ([`ModelConfig::validate`]).
    pub fn init(config: &ModelConfig, seed: u64) -> Weights {
        let arch = Arch::of(config).expect("a validated config");
        let std = config.initializer_range as f32;
        let root = Rng::new(seed);
        let tensors = Self::layout(config, &arch)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with("norm.weight") {
                    vec![1.0 - arch.norm_offset; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    let mut rng = root.fork(&name);
                    normal_vec(&mut rng, n, std)
                };
                Tensor { name, shape, data }
            })
            .collect();
        Weights {
            config: config.clone(),
            arch,
            tensors,
        }
    }

    /// Loads `config.json` and the safetensors of a Hugging Face model directory. bf16 and
    /// f16 weights become f32.
    pub fn load(dir: &Path) -> Result<Weights, StageError> {
        let config = ModelConfig::read(&dir.join("config.json"))?;
        let arch = Arch::of(&config).expect("validated when read");
        let files = weight_files(dir)?;
        let mut found: HashMap<String, Tensor> = HashMap::new();
        let layout = Self::layout(&config, &arch);
        // What the files hold: the layout's tensors, Phi-3's fused ones in place of their parts.
        let parts: Vec<Option<FusedPart>> = layout
            .iter()
            .map(|(n, _)| fused_source(&config, &arch, n))
            .collect();
        let wanted: HashMap<&str, &Vec<usize>> = layout
            .iter()
            .zip(&parts)
            .map(|((n, s), part)| match part {
                Some(f) => (f.name.as_str(), &f.shape),
                None => (n.as_str(), s),
            })
            .collect();
        for file in &files {
            let bytes = std::fs::read(file)
                .map_err(|e| StageError::io(format!("reading {}", file.display()), e))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| StageError::Failed(format!("{}: {e}", file.display())))?;
            for (name, view) in st.iter() {
                if name.ends_with("rotary_emb.inv_freq") {
                    continue; // a buffer older checkpoints carry, recomputed from rope_theta
                }
                if name == "lm_head.weight" && config.tie_word_embeddings {
                    continue;
                }
                let Some(shape) = wanted.get(name) else {
                    return Err(StageError::Failed(format!(
                        "{}: unexpected tensor `{name}` for a {} model with this config",
                        file.display(),
                        config.model_type
                    )));
                };
                if view.shape() != shape.as_slice() {
                    return Err(StageError::Failed(format!(
                        "{}: tensor `{name}` has shape {:?}, config.json implies {:?}",
                        file.display(),
                        view.shape(),
                        shape
                    )));
                }
                let data = to_f32(view.dtype(), view.data()).map_err(|e| {
                    StageError::Failed(format!("{}: tensor `{name}`: {e}", file.display()))
                })?;
                found.insert(
                    name.to_string(),
                    Tensor {
                        name: name.to_string(),
                        shape: view.shape().to_vec(),
                        data,
                    },
                );
            }
        }
        let mut tensors = Vec::with_capacity(layout.len());
        for ((name, _), part) in layout.iter().zip(parts) {
            if let Some(part) = part {
                // Its shape was checked as it was read.
                let Some(t) = found.get(&part.name) else {
                    return Err(StageError::Failed(format!(
                        "{}: tensor `{}` is missing",
                        dir.display(),
                        part.name
                    )));
                };
                tensors.push(row_slice(t, name, part.rows));
                continue;
            }
            match found.remove(name) {
                Some(t) => tensors.push(t),
                None => {
                    return Err(StageError::Failed(format!(
                        "{}: tensor `{name}` is missing",
                        dir.display()
                    )));
                }
            }
        }
        Ok(Weights {
            config,
            arch,
            tensors,
        })
    }

    /// The tensors as the files hold them: Phi-3's q/k/v and gate/up joined into their fused
    /// tensors (in the order of the first of each group), every other tensor as it is. Also
    /// what compares flow's gradients with transformers' by the checkpoint's names.
    pub fn stored_tensors(&self) -> Vec<Cow<'_, Tensor>> {
        let mut out: Vec<Cow<'_, Tensor>> = Vec::with_capacity(self.tensors.len());
        let mut joined: HashMap<String, usize> = HashMap::new();
        for t in &self.tensors {
            match fused_source(&self.config, &self.arch, &t.name) {
                None => out.push(Cow::Borrowed(t)),
                Some(FusedPart { name: fused, .. }) => match joined.get(&fused) {
                    Some(&i) => {
                        let f = out[i].to_mut();
                        f.shape[0] += t.shape[0];
                        f.data.extend_from_slice(&t.data);
                    }
                    None => {
                        joined.insert(fused.clone(), out.len());
                        out.push(Cow::Owned(Tensor {
                            name: fused,
                            shape: t.shape.clone(),
                            data: t.data.clone(),
                        }));
                    }
                },
            }
        }
        out
    }

    /// Writes `config.json` and the weights (f32): one `model.safetensors`, or shards of at
    /// most `max_shard_bytes` with `model.safetensors.index.json`, as `save_pretrained` does.
    pub fn save(&self, dir: &Path, max_shard_bytes: Option<u64>) -> Result<(), StageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        self.config.write(&dir.join("config.json"))?;
        let stored = self.stored_tensors();
        let mut shards: Vec<Vec<&Tensor>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in stored.iter().map(|t| &**t) {
            let bytes = t.data.len() as u64 * 4;
            if let Some(max) = max_shard_bytes
                && size > 0
                && size + bytes > max
            {
                shards.push(Vec::new());
                size = 0;
            }
            shards.last_mut().expect("one shard").push(t);
            size += bytes;
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let write = |tensors: &[&Tensor], path: &Path| {
            safetensors::serialize_to_file(
                tensors.iter().map(|t| (t.name.as_str(), *t)),
                Some(meta.clone()),
                path,
            )
            .map_err(|e| StageError::Failed(format!("writing {}: {e}", path.display())))
        };
        if shards.len() == 1 {
            return write(&shards[0], &dir.join("model.safetensors"));
        }
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write(shard, &dir.join(&file))?;
            for t in shard {
                weight_map.insert(t.name.clone(), file.clone());
            }
        }
        let total: u64 = stored.iter().map(|t| t.data.len() as u64 * 4).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("json"))
            .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
    }
}

/// Where a tensor of the layout lives in a fused checkpoint (Phi-3).
struct FusedPart {
    /// The fused tensor's name.
    name: String,
    /// Its shape as the config implies it (`[q + 2 kv, d]`, `[2 f, d]`).
    shape: Vec<usize>,
    /// The part's rows in it.
    rows: std::ops::Range<usize>,
}

/// The fused module a projection is stored in (Phi-3's `qkv_proj` and `gate_up_proj`), or
/// None when it is stored as itself: the module's path under `model.layers.N.`, its parts in
/// order, and this projection's rows of it. The one description of the fused layout, for
/// the weights here and for the adapters (`cpu::lora`).
pub fn fused_module(
    c: &ModelConfig,
    arch: &Arch,
    p: Proj,
) -> Option<(&'static str, &'static [Proj], std::ops::Range<usize>)> {
    if !arch.fused {
        return None;
    }
    const QKV: &[Proj] = &[Proj::Q, Proj::K, Proj::V];
    const GATE_UP: &[Proj] = &[Proj::Gate, Proj::Up];
    let (q, kv, f) = (Proj::Q.shape(c).0, Proj::K.shape(c).0, c.intermediate_size);
    match p {
        Proj::Q => Some(("self_attn.qkv_proj", QKV, 0..q)),
        Proj::K => Some(("self_attn.qkv_proj", QKV, q..q + kv)),
        Proj::V => Some(("self_attn.qkv_proj", QKV, q + kv..q + 2 * kv)),
        Proj::Gate => Some(("mlp.gate_up_proj", GATE_UP, 0..f)),
        Proj::Up => Some(("mlp.gate_up_proj", GATE_UP, f..2 * f)),
        Proj::O | Proj::Down => None,
    }
}

/// The fused tensor a tensor of the layout is part of, or None for one stored as itself.
fn fused_source(c: &ModelConfig, arch: &Arch, name: &str) -> Option<FusedPart> {
    let (prefix, p) = Proj::ALL.into_iter().find_map(|p| {
        let prefix = name.strip_suffix(&format!(".{}.weight", p.module()))?;
        Some((prefix, p))
    })?;
    let (module, parts, rows) = fused_module(c, arch, p)?;
    Some(FusedPart {
        name: format!("{prefix}.{module}.weight"),
        shape: vec![parts.iter().map(|q| q.shape(c).0).sum(), c.hidden_size],
        rows,
    })
}

/// Rows `rows` of a row-major `[_, cols]` tensor, as a tensor of its own.
fn row_slice(t: &Tensor, name: &str, rows: std::ops::Range<usize>) -> Tensor {
    let cols = t.shape[1];
    Tensor {
        name: name.to_string(),
        shape: vec![rows.len(), cols],
        data: t.data[rows.start * cols..rows.end * cols].to_vec(),
    }
}

/// Where a layer's optional tensor is stored (see [`Weights::layout`]).
pub fn extra_index(c: &ModelConfig, arch: &Arch, layer: usize, extra: Extra) -> Option<usize> {
    let extras = arch.extras();
    let at = extras.iter().position(|e| *e == extra)?;
    let core = 1 + c.num_hidden_layers * PER_LAYER + 1 + usize::from(!c.tie_word_embeddings);
    Some(core + layer * extras.len() + at)
}

/// The tensors of a model directory, read one at a time by name (memory-mapped): what the
/// spectral analysis of a 7B model needs, which must never hold all 224 matrices at once.
pub struct TensorFiles {
    files: Vec<(std::path::PathBuf, memmap2::Mmap)>,
    /// The model's config and architecture when its files fuse projections (Phi-3), so that
    /// `q_proj` and the others read as rows of the fused tensor.
    fused: Option<Box<(ModelConfig, Arch)>>,
}

impl TensorFiles {
    pub fn open(dir: &Path) -> Result<TensorFiles, StageError> {
        let mut files = Vec::new();
        for path in weight_files(dir)? {
            let file = std::fs::File::open(&path)
                .map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
            // SAFETY: cache artifacts are read-only views that are never modified in place
            // (writes go to a temp path and are renamed).
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| StageError::io(format!("mapping {}", path.display()), e))?;
            files.push((path, map));
        }
        let config = dir.join("config.json");
        let fused = if config.is_file() {
            let c = ModelConfig::read(&config)?;
            let arch = Arch::of(&c).expect("validated when read");
            arch.fused.then(|| Box::new((c, arch)))
        } else {
            None
        };
        Ok(TensorFiles { files, fused })
    }

    /// The named tensor as f32 (a fused checkpoint's parts by their own names), or an error
    /// naming the directory's files.
    pub fn read(&self, name: &str) -> Result<Tensor, StageError> {
        if let Some(fa) = &self.fused
            && let Some(part) = fused_source(&fa.0, &fa.1, name)
        {
            let t = self.read_stored(&part.name)?;
            if t.shape != part.shape {
                return Err(StageError::Failed(format!(
                    "tensor `{}` has shape {:?}, config.json implies {:?}",
                    part.name, t.shape, part.shape
                )));
            }
            return Ok(row_slice(&t, name, part.rows));
        }
        self.read_stored(name)
    }

    /// A tensor under the name the files give it.
    fn read_stored(&self, name: &str) -> Result<Tensor, StageError> {
        for (path, map) in &self.files {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
            if let Ok(view) = st.tensor(name) {
                let data = to_f32(view.dtype(), view.data()).map_err(|e| {
                    StageError::Failed(format!("{}: tensor `{name}`: {e}", path.display()))
                })?;
                return Ok(Tensor {
                    name: name.to_string(),
                    shape: view.shape().to_vec(),
                    data,
                });
            }
        }
        Err(StageError::Failed(format!(
            "tensor `{name}` is in none of {}",
            self.files
                .iter()
                .map(|f| f.0.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// The safetensors files of a model directory: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, StageError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| StageError::io(format!("reading {}", index.display()), e))?;
        let shards = index_shards(&text)
            .map_err(|e| StageError::Failed(format!("{}: {e}", index.display())))?;
        return Ok(shards.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(StageError::Failed(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// The shard files a `model.safetensors.index.json` names, sorted and deduplicated. The
/// index may come from a download, so every name must be a relative path inside the model
/// directory ([`checked_rel_path`]) before anything is fetched, read or written by it.
pub(crate) fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = v["weight_map"]
        .as_object()
        .ok_or("field `weight_map` is missing")?;
    let mut files = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map.{tensor} is not a file name"))?;
        checked_rel_path(file).map_err(|e| format!("weight_map.{tensor}: {e}"))?;
        files.push(file.to_string());
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Little-endian f32, bf16 or f16 tensor bytes as f32.
pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes(c.try_into().expect("2")).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes(c.try_into().expect("2")).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (f32, bf16, f16)")),
    })
}

/// `n` draws from N(0, std^2) by Box-Muller on the seeded stream (never changes with a
/// dependency upgrade, unlike `rand_distr`).
pub fn normal_vec(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model directory whose index names `shard` for its one tensor, beside a file
    /// `outside.safetensors` one level up that the index must not reach.
    fn model_dir(shard: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("outside.safetensors"), b"secret").unwrap();
        let dir = root.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        let index = serde_json::json!({"weight_map": {"lm_head.weight": shard}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        root
    }

    #[test]
    fn shard_names_that_leave_the_model_directory_are_refused() {
        for shard in ["../outside.safetensors", "/etc/passwd", "a/./b.safetensors"] {
            let root = model_dir(shard);
            let Err(e) = TensorFiles::open(&root.path().join("model")) else {
                panic!("{shard}: a shard outside the model directory was opened");
            };
            let msg = e.to_string();
            assert!(
                msg.contains("model.safetensors.index.json")
                    && msg.contains("weight_map.lm_head.weight")
                    && msg.contains(shard),
                "{msg}"
            );
        }
    }

    #[test]
    fn index_shards_are_sorted_and_deduplicated() {
        let text = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors",
                       "c": "m-2.safetensors"}}"#;
        assert_eq!(
            index_shards(text).unwrap(),
            ["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(index_shards(r#"{"weight_map": {"a": 3}}"#).is_err());
        assert!(index_shards("{}").unwrap_err().contains("weight_map"));
    }
}
