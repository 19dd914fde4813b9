//! The `svd` kind: spectra of the weight changes finetuning made, as the paper's Section 6
//! reads them. For every layer and each of the seven projections: Delta = W_ft - W_base
//! (for a LoRA adapter, Delta = scale * B A exactly, not a difference of rounded merges), and
//! the singular values of Delta, W_base and W_ft; the rank explaining `variance` of the
//! spectrum, the effective rank, the numerical rank and Frobenius norms. Controls: a Gaussian
//! matrix A, A + cB and cB for c = 10^-6 .. 1, which show that full finetuning's Delta looks
//! like added low-magnitude noise of full rank.

pub mod spectrum;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::json;

use crate::cpu::lora::Adapters;
use crate::cpu::matmul::{Layout, gemm_into};
use crate::data::rng::Rng;
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};
use crate::model::config::ModelConfig;
use crate::model::weights::{Proj, Tensor, TensorFiles, normal_vec};
use spectrum::{effective_rank, frobenius, numerical_rank, rank_at, singular_values};

/// Registered as `kind = "svd"`.
pub static KIND: Kind = Kind {
    name: "svd",
    version: 1,
    doc: "singular values of the weight changes (Delta), the base and the finetuned weights; rank@p, effective rank, Gaussian controls",
    params: &[
        Param {
            name: "base",
            ty: ParamType::Input,
            default: Default::Required,
            doc: "the model finetuning started from",
        },
        Param {
            name: "finetuned",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "the finetuned model (give this or `adapter`)",
        },
        Param {
            name: "adapter",
            ty: ParamType::Input,
            default: Default::Optional,
            doc: "a train-lora `adapter`: Delta = scale * B A exactly",
        },
        Param {
            name: "variance",
            ty: ParamType::Float,
            default: Default::Value("0.9"),
            doc: "the share of the spectrum rank@p must explain",
        },
        Param {
            name: "spectrum",
            ty: ParamType::Choice(&["squared", "plain"]),
            default: Default::Value("\"squared\""),
            doc: "rank@p over sigma^2 (variance, the paper's) or sigma",
        },
        Param {
            name: "modules",
            ty: ParamType::List(&ParamType::Choice(&[
                "q", "k", "v", "o", "gate", "up", "down",
            ])),
            default: Default::Value("[\"q\", \"k\", \"v\", \"o\", \"gate\", \"up\", \"down\"]"),
            doc: "which projections",
        },
        Param {
            name: "controls",
            ty: ParamType::Bool,
            default: Default::Value("true"),
            doc: "also the Gaussian controls A, A + cB, cB (shape of the first module)",
        },
        Param {
            name: "control_log10_c",
            ty: ParamType::List(&ParamType::Float),
            default: Default::Value("[-6, -5, -4, -3, -2, -1, 0]"),
            doc: "log10 of the control scales c",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "the controls' Gaussian draws",
        },
    ],
    outputs: &["spectra"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    variance: f64,
    spectrum: String,
    modules: Vec<String>,
    controls: bool,
    control_log10_c: Vec<f64>,
    seed: i64,
}

/// One matrix's results.
struct Row {
    layer: usize,
    proj: Proj,
    shape: (usize, usize),
    spectra: [Vec<f32>; 3], // delta, base, finetuned
}

fn hf_name(layer: usize, p: Proj) -> String {
    format!("model.layers.{layer}.{}.weight", p.module())
}

/// Where Delta comes from.
enum Change {
    Model(TensorFiles),
    Lora(Adapters),
}

impl Change {
    /// W_ft and Delta for one matrix, given W_base.
    fn matrices(
        &self,
        name: &str,
        layer: usize,
        p: Proj,
        base: &Tensor,
    ) -> Result<(Vec<f32>, Vec<f32>), StageError> {
        match self {
            Change::Model(ft) => {
                let w = ft.read(name)?;
                if w.shape != base.shape {
                    return Err(StageError::Failed(format!(
                        "tensor `{name}`: finetuned shape {:?} differs from the base's {:?}",
                        w.shape, base.shape
                    )));
                }
                let delta = w.data.iter().zip(&base.data).map(|(a, b)| a - b).collect();
                Ok((w.data, delta))
            }
            Change::Lora(ad) => {
                let (out, inp) = (base.shape[0], base.shape[1]);
                let mut delta = vec![0.0f32; out * inp];
                if let Some((a, b)) = ad.get(layer, p) {
                    let r = ad.spec.rank;
                    // delta[o, i] = scale * sum_r B[o, r] A[r, i]
                    gemm_into(
                        out,
                        inp,
                        r,
                        &mut delta,
                        Layout::rows(inp, false),
                        b,
                        Layout::rows(r, false),
                        a,
                        Layout::rows(inp, false),
                        ad.spec.scale(),
                        false,
                        1,
                    );
                }
                let w = base.data.iter().zip(&delta).map(|(w, d)| w + d).collect();
                Ok((w, delta))
            }
        }
    }
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    if !(p.variance > 0.0 && p.variance <= 1.0) {
        return Err(StageError::Params(format!(
            "variance must be in (0, 1] (got {})",
            p.variance
        )));
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1))
        .build_global();
    let base_in = ctx
        .artifact("base")
        .ok_or_else(|| StageError::Params("missing `base`".into()))?;
    let config = ModelConfig::read(&base_in.dir.join("config.json"))?;
    let base = TensorFiles::open(&base_in.dir)?;
    let (change, source) = match (ctx.artifact("finetuned"), ctx.artifact("adapter")) {
        (Some(f), None) => (Change::Model(TensorFiles::open(&f.dir)?), f),
        (None, Some(a)) => (Change::Lora(Adapters::load(&a.dir, &config)?), a),
        _ => {
            return Err(StageError::Params(
                "give exactly one of `finetuned` (a model) and `adapter` (a LoRA adapter)".into(),
            ));
        }
    };
    let mods: Vec<Proj> = p
        .modules
        .iter()
        .map(|m| Proj::parse(m).expect("validated choice"))
        .collect();
    let jobs: Vec<(usize, Proj)> = (0..config.num_hidden_layers)
        .flat_map(|l| mods.iter().map(move |&m| (l, m)))
        .collect();
    let squared = p.spectrum == "squared";
    let done = Mutex::new(0usize);
    // One matrix per task, each task sequential inside: at most `threads` matrices (with
    // their base and finetuned copies) are in memory at once.
    let rows: Vec<Row> = jobs
        .par_iter()
        .map(|&(layer, proj)| -> Result<Row, StageError> {
            let name = hf_name(layer, proj);
            let b = base.read(&name)?;
            // The files are outside data: a 1-D or 3-D tensor under a matrix's name must be
            // an error naming it, not an index panic below.
            if b.shape.len() != 2 || b.shape.contains(&0) {
                return Err(StageError::Failed(format!(
                    "tensor `{name}` of the base model has shape {:?}; a weight matrix has two non-zero dimensions",
                    b.shape
                )));
            }
            let (w_ft, delta) = change.matrices(&name, layer, proj, &b)?;
            if let Some(bad) = [&b.data, &w_ft, &delta]
                .iter()
                .position(|m| m.iter().any(|v| !v.is_finite()))
            {
                return Err(StageError::Failed(format!(
                    "tensor `{name}`: the {} weights are not finite",
                    ["base", "finetuned", "changed"][bad]
                )));
            }
            let (rws, cols) = (b.shape[0], b.shape[1]);
            let spectra = [
                singular_values(&delta, rws, cols, 1),
                singular_values(&b.data, rws, cols, 1),
                singular_values(&w_ft, rws, cols, 1),
            ];
            let mut d = done.lock().expect("progress lock");
            *d += 1;
            ctx.progress
                .set_message(&format!("svd {}/{} matrices", *d, jobs.len()));
            Ok(Row {
                layer,
                proj,
                shape: (rws, cols),
                spectra,
            })
        })
        .collect::<Result<_, _>>()?;

    let out = ctx.output("spectra")?;
    let mut tensors = Vec::new();
    let mut csv = String::from(
        "layer,module,rows,cols,rank_delta,rank_base,rank_finetuned,effective_rank_delta,effective_rank_base,effective_rank_finetuned,numerical_rank_delta,fro_delta,fro_base,fro_finetuned\n",
    );
    let mut by_module: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for r in &rows {
        let [d, b, f] = &r.spectra;
        let ranks = [d, b, f].map(|s| rank_at(s, p.variance, squared));
        csv += &format!(
            "{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{:.6e},{:.6e},{:.6e}\n",
            r.layer,
            r.proj.short(),
            r.shape.0,
            r.shape.1,
            ranks[0],
            ranks[1],
            ranks[2],
            effective_rank(d),
            effective_rank(b),
            effective_rank(f),
            numerical_rank(d, r.shape.0, r.shape.1),
            frobenius(d),
            frobenius(b),
            frobenius(f)
        );
        by_module.entry(r.proj.short()).or_default().push(ranks[0]);
        for (which, s) in ["delta", "base", "finetuned"].iter().zip(&r.spectra) {
            tensors.push(vector(format!("{}.{which}", hf_name(r.layer, r.proj)), s));
        }
    }
    let controls = if p.controls && !rows.is_empty() {
        Some(controls(
            &p,
            rows[0].shape,
            ctx.threads,
            squared,
            &mut tensors,
        ))
    } else {
        None
    };
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes)
            .map_err(|e| StageError::io(format!("writing {name}"), e))
    };
    write("ranks.csv", csv.as_bytes())?;
    let path = out.join("spectra.safetensors");
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.as_str(), t)), None, &path)
        .map_err(|e| StageError::Failed(format!("writing {}: {e}", path.display())))?;
    let mean: BTreeMap<&str, f64> = by_module
        .iter()
        .map(|(m, v)| (*m, v.iter().sum::<usize>() as f64 / v.len() as f64))
        .collect();
    let mut summary = serde_json::Map::new();
    summary.insert("variance".into(), json!(p.variance));
    summary.insert("spectrum".into(), json!(p.spectrum));
    summary.insert("matrices".into(), json!(rows.len()));
    summary.insert("mean_rank_delta".into(), json!(mean));
    summary.insert("rank_delta_by_layer".into(), json!(by_module));
    summary.insert(
        "base".into(),
        json!({"stage": base_in.stage, "digest": base_in.digest}),
    );
    summary.insert(
        "finetuned".into(),
        json!({"stage": source.stage, "digest": source.digest,
               "kind": if matches!(change, Change::Lora(_)) { "adapter" } else { "model" }}),
    );
    if let Some(c) = controls {
        summary.insert("controls".into(), c);
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(summary)).expect("JSON");
    write("summary.json", (text + "\n").as_bytes())?;
    let mut outcome = StageOutcome::default();
    for (m, v) in mean {
        outcome.metrics.insert(format!("rank_delta/{m}"), json!(v));
    }
    let _ = writeln!(std::io::stderr(), "svd: {} matrices", rows.len());
    Ok(outcome)
}

fn vector(name: String, s: &[f32]) -> Tensor {
    Tensor {
        name,
        shape: vec![s.len()],
        data: s.to_vec(),
    }
}

/// The paper's control: spectra of a Gaussian A, of A + cB and of cB, and the mean absolute
/// difference between the spectra of A and A + cB.
fn controls(
    p: &Params,
    (rows, cols): (usize, usize),
    threads: usize,
    squared: bool,
    tensors: &mut Vec<Tensor>,
) -> serde_json::Value {
    let rng = Rng::new(p.seed as u64).fork("svd-controls");
    let a = normal_vec(&mut rng.fork("A"), rows * cols, 1.0);
    let b = normal_vec(&mut rng.fork("B"), rows * cols, 1.0);
    let sa = singular_values(&a, rows, cols, threads);
    tensors.push(vector("control.A".into(), &sa));
    let mut per_c = Vec::new();
    for &e in &p.control_log10_c {
        let c = 10f64.powf(e) as f32;
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + c * y).collect();
        let cb: Vec<f32> = b.iter().map(|y| c * y).collect();
        let s_sum = singular_values(&sum, rows, cols, threads);
        let s_cb = singular_values(&cb, rows, cols, threads);
        let diff = sa
            .iter()
            .zip(&s_sum)
            .map(|(x, y)| (x - y).abs() as f64)
            .sum::<f64>()
            / sa.len() as f64;
        per_c.push(json!({"log10_c": e, "mean_abs_diff_A_vs_A_plus_cB": diff,
            "rank_A_plus_cB": rank_at(&s_sum, p.variance, squared),
            "rank_cB": rank_at(&s_cb, p.variance, squared)}));
        tensors.push(vector(format!("control.A+cB.{e}"), &s_sum));
        tensors.push(vector(format!("control.cB.{e}"), &s_cb));
    }
    json!({"shape": [rows, cols], "rank_A": rank_at(&sa, p.variance, squared), "c": per_c})
}
