//! LoRA adapters on the host: for each adapted module of each layer, `A [r, in]` and
//! `B [out, r]`, with PEFT's tensor names so that adapters load in `peft` unchanged.
//!
//! A module is a projection, except in Phi-3, which stores q/k/v as one `qkv_proj` and
//! gate/up as one `gate_up_proj`: PEFT puts one adapter over each fused module, so its A
//! is shared by the parts and its B is theirs stacked by rows. flow keeps the tensors as
//! PEFT has them and gives each projection its A and its rows of B ([`Factors`]): the
//! computation per projection is the same as for an unfused model, the gradients of the
//! shared A add up, and the files are PEFT's.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::data::rng::Rng;
use crate::model::arch::Arch;
use crate::model::config::ModelConfig;
use crate::model::weights::{Proj, Tensor, fused_module, normal_vec};

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

/// Adapters for every (layer, adapted module) pair, as a flat tensor list `[A, B]` per
/// pair, in layer order then module order.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    pub spec: LoraSpec,
    pub tensors: Vec<Tensor>,
    index: BTreeMap<(usize, Proj), Factors>,
}

/// Where an adapted projection's factors are in [`Adapters::tensors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Factors {
    /// A, `[r, in]` (shared by a fused module's parts).
    pub a: usize,
    /// B, `[module out, r]`.
    pub b: usize,
    /// The projection's rows of B: all of them unless its module is fused.
    pub rows: Range<usize>,
    /// The module's first projection: a fused module's parts see one dropout mask, as
    /// PEFT's one adapter does.
    pub site: Proj,
}

impl Factors {
    /// The projection's part of B's data (`rows` of `rank` columns each).
    pub fn b_range(&self, rank: usize) -> Range<usize> {
        self.rows.start * rank..self.rows.end * rank
    }
}

/// A projection's adapted module: PEFT's module path under `model.layers.N.`, the
/// projections it computes, and this one's rows of its output (a fused module's as
/// [`fused_module`] lays it out, else the projection alone).
pub fn module_of(
    c: &ModelConfig,
    arch: &Arch,
    p: Proj,
) -> (&'static str, &'static [Proj], Range<usize>) {
    static ALONE: [[Proj; 1]; 7] = [
        [Proj::Q],
        [Proj::K],
        [Proj::V],
        [Proj::O],
        [Proj::Gate],
        [Proj::Up],
        [Proj::Down],
    ];
    fused_module(c, arch, p).unwrap_or_else(|| (p.module(), &ALONE[p as usize], 0..p.shape(c).0))
}

/// PEFT's name of a LoRA factor of a module (a path as [`module_of`] gives it).
pub fn peft_name(layer: usize, module: &str, factor: char) -> String {
    format!("base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight")
}

/// The adapted modules of `targets`, in order, each once; an error names a projection whose
/// fused module's other parts are not targets (PEFT cannot adapt part of a module).
pub fn modules(
    c: &ModelConfig,
    arch: &Arch,
    targets: &[Proj],
) -> Result<Vec<&'static str>, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for &p in targets {
        let (module, parts, _) = module_of(c, arch, p);
        if let Some(missing) = parts.iter().find(|q| !targets.contains(q)) {
            let names = parts
                .iter()
                .map(|q| q.short())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(format!(
                "targets: `{}` is part of {}'s fused `{}` (with {names}), which PEFT adapts whole: target {names} together, or none of them (missing `{}`)",
                p.short(),
                arch.family.model_type(),
                module.rsplit('.').next().expect("a name"),
                missing.short()
            ));
        }
        if !out.contains(&module) {
            out.push(module);
        }
    }
    Ok(out)
}

impl Adapters {
    /// Fresh adapters (seeded). `spec.targets` must be whole modules ([`modules`]).
    pub fn init(config: &ModelConfig, spec: &LoraSpec, init: LoraInit, seed: u64) -> Adapters {
        let arch = Arch::of(config).expect("a validated config");
        let mods = modules(config, &arch, &spec.targets).expect("targets checked by the caller");
        let root = Rng::new(seed).fork("lora");
        let mut tensors = Vec::new();
        for l in 0..config.num_hidden_layers {
            for &module in &mods {
                let (out, inp) = module_shape(config, &arch, module);
                let name = peft_name(l, module, 'A');
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
                tensors.push(Tensor::zeros(
                    peft_name(l, module, 'B'),
                    vec![out, spec.rank],
                ));
            }
        }
        Adapters::from_tensors(config, spec.clone(), tensors)
    }

    /// Adapters from tensors named as PEFT names them (any order), for a model of `config`.
    pub fn from_tensors(config: &ModelConfig, spec: LoraSpec, tensors: Vec<Tensor>) -> Adapters {
        let arch = Arch::of(config).expect("a validated config");
        let position = |name: &str| tensors.iter().position(|t| t.name == name);
        let mut index = BTreeMap::new();
        for l in 0..config.num_hidden_layers {
            for &p in &spec.targets {
                let (module, parts, rows) = module_of(config, &arch, p);
                if let (Some(a), Some(b)) = (
                    position(&peft_name(l, module, 'A')),
                    position(&peft_name(l, module, 'B')),
                ) {
                    let site = parts[0];
                    index.insert((l, p), Factors { a, b, rows, site });
                }
            }
        }
        Adapters {
            spec,
            tensors,
            index,
        }
    }

    /// (A, the projection's rows of B) of a layer's projection, if adapted.
    pub fn get(&self, layer: usize, proj: Proj) -> Option<(&[f32], &[f32])> {
        let f = self.indices(layer, proj)?;
        let b = &self.tensors[f.b].data[f.b_range(self.spec.rank)];
        Some((&self.tensors[f.a].data, b))
    }

    /// Where a layer's projection's factors are, if adapted.
    pub fn indices(&self, layer: usize, proj: Proj) -> Option<&Factors> {
        self.index.get(&(layer, proj))
    }
}

/// (out, in) of an adapted module (a fused one's out is its parts' together).
pub fn module_shape(c: &ModelConfig, arch: &Arch, module: &str) -> (usize, usize) {
    let mut out = 0;
    let mut inp = 0;
    for p in Proj::ALL {
        if module_of(c, arch, p).0 == module {
            out += p.shape(c).0;
            inp = p.shape(c).1;
        }
    }
    (out, inp)
}

/// (layer, the module's first projection) of a PEFT LoRA tensor name, for a model of this
/// architecture.
fn parse_name(c: &ModelConfig, arch: &Arch, name: &str) -> Option<(usize, Proj)> {
    let rest = name.split("layers.").nth(1)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let first = Proj::ALL.into_iter().find(|&p| {
        let (module, parts, _) = module_of(c, arch, p);
        parts[0] == p
            && rest
                .strip_prefix(module)
                .is_some_and(|r| r.starts_with(".lora_"))
    })?;
    Some((layer, first))
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
        let arch = Arch::of(config).expect("a validated config");
        let mut targets = std::collections::BTreeSet::new();
        let mut tensors = Vec::new();
        let mut names: Vec<&str> = st.names().into_iter().collect();
        names.sort_by_key(|n| (parse_name(config, &arch, n), n.contains("lora_B")));
        for name in names {
            let (layer, first) = parse_name(config, &arch, name).ok_or_else(|| {
                StageError::Failed(format!(
                    "{}: unexpected tensor `{name}` for a {} model",
                    wpath.display(),
                    config.model_type
                ))
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
            let (module, parts, _) = module_of(config, &arch, first);
            let (out, inp) = module_shape(config, &arch, module);
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
            targets.extend(parts.iter().copied());
            // PEFT saves without the adapter name (`lora_A.weight`); normalise to that form.
            let canonical = peft_name(
                layer,
                module,
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
        let adapters = Adapters::from_tensors(config, spec, tensors);
        let used: std::collections::BTreeSet<usize> =
            adapters.index.values().flat_map(|f| [f.a, f.b]).collect();
        if let Some(t) = (0..adapters.tensors.len()).find(|i| !used.contains(i)) {
            return Err(StageError::Failed(format!(
                "{}: tensor `{}` has no matching lora_A/lora_B",
                wpath.display(),
                adapters.tensors[t].name
            )));
        }
        Ok(adapters)
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
            .index
            .values()
            .map(|f| &self.tensors[f.a].name)
            .filter_map(|n| n.split(".lora_A.").next()?.rsplit('.').next())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn phi3() -> ModelConfig {
        let mut c = ModelConfig::new(64, 32, 48, 2, 4, 2, 64, false);
        c.model_type = "phi3".into();
        c
    }

    /// Phi-3's fused modules are adapted whole, as PEFT adapts them: one A shared by the
    /// parts, one B whose rows are theirs in order; a target list naming part of a fused
    /// module is an error naming the missing part.
    #[test]
    fn fused_modules_share_a_and_split_b_by_rows() {
        let c = phi3();
        let arch = Arch::of(&c).unwrap();
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            rslora: false,
            dropout: 0.0,
            targets: Proj::ALL.to_vec(),
        };
        let a = Adapters::init(&c, &spec, LoraInit::Kaiming, 3);
        // 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj) x (A, B)
        assert_eq!(a.tensors.len(), 16);
        let (q, k, v) = (
            a.indices(0, Proj::Q).unwrap(),
            a.indices(0, Proj::K).unwrap(),
            a.indices(0, Proj::V).unwrap(),
        );
        assert!(q.a == k.a && k.a == v.a && q.b == k.b && k.b == v.b);
        assert_eq!(
            (q.rows.clone(), k.rows.clone(), v.rows.clone()),
            (0..32, 32..48, 48..64)
        );
        assert_eq!(a.tensors[q.b].shape, [64, 2]);
        assert!(
            a.tensors[q.b]
                .name
                .ends_with("self_attn.qkv_proj.lora_B.weight")
        );
        let up = a.indices(1, Proj::Up).unwrap();
        assert_eq!((up.rows.clone(), up.site), (48..96, Proj::Gate));
        let e = modules(&c, &arch, &[Proj::Q, Proj::V, Proj::O]).unwrap_err();
        assert!(e.contains("`qkv_proj`") && e.contains("missing `k`"), "{e}");
        assert_eq!(
            modules(&c, &arch, &[Proj::Gate, Proj::Up, Proj::Down]).unwrap(),
            ["mlp.gate_up_proj", "mlp.down_proj"]
        );
        // Unfused families adapt any projection alone.
        let mut l = c.clone();
        l.model_type = "llama".into();
        assert_eq!(
            modules(&l, &Arch::of(&l).unwrap(), &[Proj::K]).unwrap(),
            ["self_attn.k_proj"]
        );
    }

    /// A PEFT file with a factor whose partner is missing, or a module the family does not
    /// have, is an error naming the tensor.
    #[test]
    fn incomplete_or_foreign_adapters_are_named_errors() {
        let c = phi3();
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            rslora: false,
            dropout: 0.0,
            targets: vec![Proj::O],
        };
        let a = Adapters::init(&c, &spec, LoraInit::Kaiming, 3);
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path(), None).unwrap();
        assert_eq!(Adapters::load(dir.path(), &c).unwrap(), a);
        let write = |tensors: Vec<&Tensor>| {
            safetensors::serialize_to_file(
                tensors.iter().map(|t| (t.name.as_str(), *t)),
                None,
                &dir.path().join("adapter_model.safetensors"),
            )
            .unwrap()
        };
        write(
            a.tensors
                .iter()
                .filter(|t| !t.name.contains("layers.1.self_attn.o_proj.lora_B"))
                .collect(),
        );
        let e = Adapters::load(dir.path(), &c).unwrap_err().to_string();
        assert!(
            e.contains("layers.1.self_attn.o_proj.lora_A") && e.contains("no matching"),
            "{e}"
        );
        let q = Tensor::zeros(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            vec![2, 32],
        );
        write(a.tensors.iter().chain([&q]).collect());
        let e = Adapters::load(dir.path(), &c).unwrap_err().to_string();
        assert!(
            e.contains("unexpected tensor") && e.contains("q_proj") && e.contains("phi3"),
            "{e}"
        );
    }
}
