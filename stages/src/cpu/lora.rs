//! LoRA adapters on the host: for each adapted projection of each layer, `A [r, in]` and
//! `B [out, r]`, with PEFT's tensor names so that adapters load in `peft` unchanged.

use std::collections::BTreeMap;

use crate::data::rng::Rng;
use crate::model::config::ModelConfig;
use crate::model::weights::{Proj, Tensor, normal_vec};

/// The adapter's hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Scale alpha/sqrt(r) instead of alpha/r (rsLoRA).
    pub rslora: bool,
    pub dropout: f32,
    pub targets: Vec<Proj>,
}

impl LoraSpec {
    /// The factor of `B A` in `W x + scale B A x`.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            (self.alpha / (self.rank as f64).sqrt()) as f32
        } else {
            (self.alpha / self.rank as f64) as f32
        }
    }
}

/// How A is initialized (B always starts at zero, so training starts from the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    Kaiming,
    /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r).
    Gaussian,
}

/// Adapters for every (layer, target) pair, as a flat tensor list `[A, B]` per pair, in
/// layer order then target order.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    pub spec: LoraSpec,
    pub tensors: Vec<Tensor>,
    index: BTreeMap<(usize, Proj), usize>,
}

/// PEFT's name of a LoRA factor.
pub fn peft_name(layer: usize, proj: Proj, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        proj.module()
    )
}

impl Adapters {
    /// Fresh adapters (seeded).
    pub fn init(config: &ModelConfig, spec: &LoraSpec, init: LoraInit, seed: u64) -> Adapters {
        let root = Rng::new(seed).fork("lora");
        let mut tensors = Vec::new();
        for l in 0..config.num_hidden_layers {
            for &p in &spec.targets {
                let (out, inp) = p.shape(config);
                let name = peft_name(l, p, 'A');
                let mut rng = root.fork(&name);
                let a = match init {
                    LoraInit::Kaiming => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        (0..spec.rank * inp)
                            .map(|_| {
                                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                                ((2.0 * u - 1.0) * bound) as f32
                            })
                            .collect()
                    }
                    LoraInit::Gaussian => {
                        normal_vec(&mut rng, spec.rank * inp, 1.0 / spec.rank as f32)
                    }
                };
                tensors.push(Tensor {
                    name,
                    shape: vec![spec.rank, inp],
                    data: a,
                });
                tensors.push(Tensor::zeros(peft_name(l, p, 'B'), vec![out, spec.rank]));
            }
        }
        Adapters::from_tensors(spec.clone(), tensors)
    }

    /// Adapters from tensors named as PEFT names them (any order).
    pub fn from_tensors(spec: LoraSpec, tensors: Vec<Tensor>) -> Adapters {
        let mut index = BTreeMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if let Some((l, p)) = parse_name(&t.name)
                && t.name.contains(".lora_A.")
            {
                index.insert((l, p), i);
            }
        }
        Adapters {
            spec,
            tensors,
            index,
        }
    }

    /// (A, B) of a layer's projection, if adapted.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<(&[f32], &[f32])> {
        let a = *self.index.get(&(layer, proj))?;
        let b = self.b_index(a)?;
        Some((&self.tensors[a].data, &self.tensors[b].data))
    }

    /// Tensor indices (A, B) of a layer's projection, if adapted.
    pub fn indices(&self, layer: usize, proj: Proj) -> Option<(usize, usize)> {
        let a = *self.index.get(&(layer, proj))?;
        Some((a, self.b_index(a)?))
    }

    fn b_index(&self, a: usize) -> Option<usize> {
        let want = self.tensors[a].name.replace(".lora_A.", ".lora_B.");
        if self.tensors.get(a + 1).is_some_and(|t| t.name == want) {
            return Some(a + 1);
        }
        self.tensors.iter().position(|t| t.name == want)
    }
}

/// (layer, projection) of a PEFT LoRA tensor name.
pub fn parse_name(name: &str) -> Option<(usize, Proj)> {
    let rest = name.split("layers.").nth(1)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let proj = Proj::ALL
        .into_iter()
        .find(|p| rest.starts_with(p.module()))?;
    Some((layer, proj))
}

impl Adapters {
    /// Reads a PEFT LoRA adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`) for a model of `config`.
    pub fn load(
        dir: &std::path::Path,
        config: &ModelConfig,
    ) -> Result<Adapters, crate::kind::StageError> {
        use crate::kind::StageError;
        let cpath = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath)
            .map_err(|e| StageError::io(format!("reading {}", cpath.display()), e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("{}: {e}", cpath.display())))?;
        let field = |name: &str| {
            v.get(name).ok_or_else(|| {
                StageError::Failed(format!("{}: field `{name}` is missing", cpath.display()))
            })
        };
        if field("peft_type")?.as_str() != Some("LORA") {
            return Err(StageError::Failed(format!(
                "{}: field `peft_type` must be \"LORA\"",
                cpath.display()
            )));
        }
        let rank = field("r")?.as_u64().filter(|r| *r > 0).ok_or_else(|| {
            StageError::Failed(format!(
                "{}: field `r` must be a positive integer",
                cpath.display()
            ))
        })? as usize;
        let alpha = field("lora_alpha")?.as_f64().ok_or_else(|| {
            StageError::Failed(format!(
                "{}: field `lora_alpha` must be a number",
                cpath.display()
            ))
        })?;
        let rslora = v
            .get("use_rslora")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        let dropout = v
            .get("lora_dropout")
            .and_then(|d| d.as_f64())
            .unwrap_or(0.0) as f32;
        let wpath = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&wpath)
            .map_err(|e| StageError::io(format!("reading {}", wpath.display()), e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| StageError::Failed(format!("{}: {e}", wpath.display())))?;
        let mut targets = std::collections::BTreeSet::new();
        let mut tensors = Vec::new();
        let mut names: Vec<&str> = st.names().into_iter().collect();
        names.sort_by_key(|n| (parse_name(n), n.contains("lora_B")));
        for name in names {
            let (layer, proj) = parse_name(name).ok_or_else(|| {
                StageError::Failed(format!("{}: unexpected tensor `{name}`", wpath.display()))
            })?;
            if layer >= config.num_hidden_layers {
                return Err(StageError::Failed(format!(
                    "{}: tensor `{name}` names layer {layer}, the model has {}",
                    wpath.display(),
                    config.num_hidden_layers
                )));
            }
            let view = st.tensor(name).expect("listed");
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(StageError::Failed(format!(
                    "{}: tensor `{name}` is {:?}; adapters are read as f32",
                    wpath.display(),
                    view.dtype()
                )));
            }
            let (out, inp) = proj.shape(config);
            let want = if name.contains(".lora_A.") {
                vec![rank, inp]
            } else {
                vec![out, rank]
            };
            if view.shape() != want.as_slice() {
                return Err(StageError::Failed(format!(
                    "{}: tensor `{name}` has shape {:?}, expected {want:?}",
                    wpath.display(),
                    view.shape()
                )));
            }
            targets.insert(proj);
            // PEFT saves without the adapter name (`lora_A.weight`); normalise to that form.
            let canonical = peft_name(
                layer,
                proj,
                if name.contains(".lora_A.") { 'A' } else { 'B' },
            );
            tensors.push(Tensor {
                name: canonical,
                shape: want,
                data: view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                    .collect(),
            });
        }
        let spec = LoraSpec {
            rank,
            alpha,
            rslora,
            dropout,
            targets: targets.into_iter().collect(),
        };
        Ok(Adapters::from_tensors(spec, tensors))
    }

    /// Writes the adapter in PEFT's layout, loadable by `PeftModel.from_pretrained`.
    pub fn save(
        &self,
        dir: &std::path::Path,
        base_model: Option<&str>,
    ) -> Result<(), crate::kind::StageError> {
        use crate::kind::StageError;
        std::fs::create_dir_all(dir)
            .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        let modules: Vec<&str> = self
            .spec
            .targets
            .iter()
            .map(|p| p.module().rsplit('.').next().expect("a name"))
            .collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": self.spec.dropout,
            "use_rslora": self.spec.rslora,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_dora": false,
        });
        let cpath = dir.join("adapter_config.json");
        std::fs::write(
            &cpath,
            serde_json::to_string_pretty(&config).expect("json") + "\n",
        )
        .map_err(|e| StageError::io(format!("writing {}", cpath.display()), e))?;
        let wpath = dir.join("adapter_model.safetensors");
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            self.tensors.iter().map(|t| (t.name.as_str(), t)),
            Some(meta),
            &wpath,
        )
        .map_err(|e| StageError::Failed(format!("writing {}: {e}", wpath.display())))
    }

    /// The base model with every adapter merged in: `W + scale * B A`.
    pub fn merge(&self, base: &crate::model::weights::Weights) -> crate::model::weights::Weights {
        use crate::model::weights::Weights;
        let mut out = base.clone();
        let s = self.spec.scale();
        let r = self.spec.rank;
        for l in 0..base.config.num_hidden_layers {
            for &p in &self.spec.targets {
                let Some((a, b)) = self.get(l, p) else {
                    continue;
                };
                let (o, i) = p.shape(&base.config);
                let w = &mut out.tensors[Weights::proj_index(l, p)].data;
                // W[o, i] += s * B[o, r] A[r, i]
                super::matmul::gemm_into(
                    o,
                    i,
                    r,
                    w,
                    super::matmul::Layout::rows(i, false),
                    b,
                    super::matmul::Layout::rows(r, false),
                    a,
                    super::matmul::Layout::rows(i, false),
                    s,
                    true,
                    1,
                );
            }
        }
        out
    }
}
