//! The `report` kind: the study's figures and numbers from eval, svd and training results.
//! Learning vs forgetting (the paper's Figures 3-4), both against training duration, rank@p
//! of the weight changes by layer (Figure 6), spectra with the Gaussian control, loss curves,
//! and a table of every number with the stage that produced it. Seed replicates of a method
//! and duration are one point with a mean and a 95% interval (bootstrap over eval items and
//! seeds: [`stats`]), drawn as error bars, and a findings table says which of the paper's
//! four findings the run supports, contradicts or cannot tell at its noise.

pub mod figures;
pub mod findings;
mod plots;
mod points;
pub mod selections;
pub mod stats;
mod tables;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use self::plots::{by_duration, learning_vs_forgetting, loss_curves, rank_by_layer, spectra};
use self::points::{
    Curve, Run, checked_items, families, group, learning_path, metric, perplexity_metric,
    read_curve, read_json, read_samples,
};
pub use self::points::{Family, Point, higher_is_better, method_of};
pub use self::tables::escape;
use self::tables::{html, markdown, summary_csv, summary_table};
use crate::kind::{
    Default, InputArtifact, Kind, Param, ParamType, StageContext, StageError, StageOutcome,
};

/// Registered as `kind = "report"`.
pub static KIND: Kind = Kind {
    name: "report",
    version: 2,
    doc: "the study's report: learning vs forgetting, by duration, rank by layer, spectra, loss curves, every number, means and 95% intervals over seeds and eval items, the paper's findings (HTML, Markdown, SVG, PNG, CSV, JSON)",
    params: &[
        Param {
            name: "evals",
            ty: ParamType::Inputs,
            default: Default::Required,
            doc: "eval stages' `results` (groups are collected); an eval of a model without a training curve is the base reference",
        },
        Param {
            name: "curves",
            ty: ParamType::Inputs,
            default: Default::Optional,
            doc: "training stages' `curve` outputs: durations and loss curves",
        },
        Param {
            name: "svd",
            ty: ParamType::Inputs,
            default: Default::Optional,
            doc: "svd stages' `spectra`",
        },
        Param {
            name: "selections",
            ty: ParamType::Inputs,
            default: Default::Optional,
            doc: "`select` stages' choices: a table each of the candidates' values, the chosen one marked",
        },
        Param {
            name: "learning",
            ty: ParamType::Str,
            default: Default::Value("\"auto\""),
            doc: "TASK.METRIC on the y axis [auto: gsm8k.strict_match, else humaneval.pass@1, else the first perplexity loss]",
        },
        Param {
            name: "forgetting",
            ty: ParamType::Str,
            default: Default::Value("\"forgetting.score\""),
            doc: "TASK.METRIC on the x axis",
        },
        Param {
            name: "duration_keys",
            ty: ParamType::List(&ParamType::Str),
            default: Default::Value("[\"steps\", \"tokens\", \"epochs\"]"),
            doc: "sweep coordinates that are training duration: removed from a stage's name to find its method",
        },
        Param {
            name: "replicate_keys",
            ty: ParamType::List(&ParamType::Str),
            default: Default::Value("[\"seed\"]"),
            doc: "sweep coordinates that are replicates: removed from a stage's name too, so `full[seed=1,tokens=X]` and `full[seed=2,tokens=X]` are one point with a mean and an interval",
        },
        Param {
            name: "regularizers",
            ty: ParamType::List(&ParamType::Str),
            default: Default::Value("[\"weight_decay\", \"dropout\", \"_wd\"]"),
            doc: "a full-finetuning method whose name contains one of these is a regularization baseline (finding 3), not plain full finetuning",
        },
        Param {
            name: "matrix",
            ty: ParamType::Str,
            default: Default::Value("\"model.layers.0.self_attn.q_proj.weight\""),
            doc: "the matrix whose spectra are drawn",
        },
        Param {
            name: "title",
            ty: ParamType::Str,
            default: Default::Value("\"flow study\""),
            doc: "the report's title",
        },
    ],
    outputs: &["report"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    learning: String,
    forgetting: String,
    duration_keys: Vec<String>,
    replicate_keys: Vec<String>,
    regularizers: Vec<String>,
    matrix: String,
    title: String,
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    let out = ctx.output("report")?;
    let fig_dir = out.join("figures");
    std::fs::create_dir_all(&fig_dir)
        .map_err(|e| StageError::io(format!("creating {}", fig_dir.display()), e))?;

    let curves: Vec<Curve> = ctx
        .artifacts("curves")
        .iter()
        .map(read_curve)
        .collect::<Result<_, _>>()?;
    let tokens_of: BTreeMap<&str, f64> = curves
        .iter()
        .filter_map(|c| c.rows.last().map(|r| (c.stage.as_str(), r.1)))
        .collect();
    let summaries = families(ctx);
    let grouping: Vec<String> = p
        .duration_keys
        .iter()
        .chain(&p.replicate_keys)
        .cloned()
        .collect();

    // Every number, with the stage that produced it.
    let mut table: Vec<(String, String, String, f64)> = Vec::new();
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let mut learning_name = String::new();
    for a in ctx.artifacts("evals") {
        let m = read_json(&a.dir.join("metrics.json"))?;
        let tasks = &m["tasks"];
        let model = m["model"]["stage"].as_str().unwrap_or("?").to_string();
        flatten(tasks, "", &mut |k, v| {
            table.push((a.stage.clone(), model.clone(), k.to_string(), v))
        });
        let Some(lp) = learning_path(tasks, &p.learning) else {
            return Err(StageError::Failed(format!(
                "{}: no learning metric (`learning` = {:?})",
                a.stage, p.learning
            )));
        };
        let learning = metric(tasks, &lp)
            .or_else(|| perplexity_metric(tasks, &lp))
            .ok_or_else(|| {
                StageError::Failed(format!("{}: metrics.json has no `{lp}`", a.stage))
            })?;
        let forgetting = metric(tasks, &p.forgetting).unwrap_or(f64::NAN);
        let samples = read_samples(&a.dir);
        let learning_items = checked_items(
            &lp,
            learning,
            tasks,
            samples.as_deref(),
            &a.stage,
            &mut notes,
        );
        let forgetting_items = checked_items(
            &p.forgetting,
            forgetting,
            tasks,
            samples.as_deref(),
            &a.stage,
            &mut notes,
        );
        learning_name = lp;
        let tokens = tokens_of.get(model.as_str()).copied();
        let method = if tokens.is_some() {
            method_of(&model, &grouping)
        } else {
            format!("base ({})", method_of(&model, &grouping))
        };
        let unreplicated = method_of(&model, &p.replicate_keys);
        runs.push((
            Run {
                eval: a.stage.clone(),
                model,
                learning,
                forgetting,
                learning_items,
                forgetting_items,
            },
            method,
            tokens,
            unreplicated,
        ));
    }
    notes.dedup();
    let points = group(runs, &summaries, &p.regularizers);
    for c in &curves {
        if let Some(last) = c.rows.last() {
            table.push((
                c.stage.clone(),
                c.stage.clone(),
                "train.tokens".into(),
                last.1,
            ));
            table.push((
                c.stage.clone(),
                c.stage.clone(),
                "train.final_loss".into(),
                last.2,
            ));
            if last.3.is_finite() {
                table.push((
                    c.stage.clone(),
                    c.stage.clone(),
                    "train.heldout_loss".into(),
                    last.3,
                ));
            }
        }
    }
    let svds: Vec<(String, Value, &InputArtifact)> = ctx
        .artifacts("svd")
        .iter()
        .map(|a| Ok((a.stage.clone(), read_json(&a.dir.join("summary.json"))?, a)))
        .collect::<Result<_, StageError>>()?;
    for (stage, s, _) in &svds {
        let ft = s["finetuned"]["stage"].as_str().unwrap_or("?").to_string();
        if let Some(means) = s["mean_rank_delta"].as_object() {
            for (module, v) in means {
                if let Some(v) = v.as_f64() {
                    table.push((
                        stage.clone(),
                        ft.clone(),
                        format!("svd.mean_rank_delta.{module}"),
                        v,
                    ));
                }
            }
        }
    }
    let ranks = findings::svd_points(&svds, &tokens_of, &summaries, &grouping, &p.regularizers);
    let found = findings::assess(
        &points,
        &ranks,
        &learning_name,
        &p.forgetting,
        higher_is_better(&learning_name),
    );

    let mut figs = Vec::new();
    figs.push(learning_vs_forgetting(
        &points,
        &learning_name,
        &p.forgetting,
    ));
    if points.iter().any(|pt| pt.tokens.is_some()) {
        figs.push(by_duration(&points, &learning_name, &p.forgetting));
    }
    if !svds.is_empty() {
        figs.push(rank_by_layer(&svds, &tokens_of));
        if let Some(f) = spectra(&svds, &p.matrix, &tokens_of)? {
            figs.push(f);
        }
    }
    if !curves.is_empty() {
        figs.push(loss_curves(&curves));
    }
    let mut rendered = Vec::new();
    for f in &figs {
        rendered.push((f, f.render(&fig_dir)?));
    }

    // results.csv: every number as the stages reported it; summary.csv: the points.
    let mut csv = String::from("stage,model,metric,value\n");
    for (stage, model, k, v) in &table {
        let _ = writeln!(csv, "{},{},{},{}", quote(stage), quote(model), quote(k), v);
    }
    write(out, "results.csv", &csv)?;
    write(
        out,
        "summary.csv",
        &summary_csv(&points, &learning_name, &p.forgetting),
    )?;
    let findings_json = findings::to_json(&found, &p.replicate_keys);
    write(
        out,
        "findings.json",
        &(serde_json::to_string_pretty(&findings_json).expect("JSON") + "\n"),
    )?;
    let summary = summary_table(&points, &learning_name, &p.forgetting);
    write(out, "summary.txt", &summary.text)?;
    let intervals = intervals_note(&p.replicate_keys, &notes);
    let chosen = selections::read(ctx.artifacts("selections"))?;
    write(
        out,
        "report.md",
        &markdown(
            &p.title,
            &summary.markdown,
            &findings::markdown(&found),
            &intervals,
            &rendered,
            &selections::markdown(&chosen),
            &table,
        ),
    )?;
    write(
        out,
        "report.html",
        &html(
            &p.title,
            &points,
            &learning_name,
            &p.forgetting,
            &findings::html(&found),
            &intervals,
            &rendered,
            &selections::html(&chosen),
            &table,
        ),
    )?;
    let mut outcome = StageOutcome::default();
    outcome.metrics.insert("models".into(), json!(points.len()));
    outcome.metrics.insert(
        "evals".into(),
        json!(points.iter().map(|p| p.evals.len()).sum::<usize>()),
    );
    outcome.metrics.insert("figures".into(), json!(figs.len()));
    for f in &found {
        outcome
            .metrics
            .insert(format!("finding/{}", f.id), json!(f.verdict.as_str()));
    }
    Ok(outcome)
}

/// How the intervals were made, and which points lack the item level (and why).
fn intervals_note(replicate_keys: &[String], notes: &[String]) -> Vec<String> {
    let mut v = vec![format!(
        "Every number is a mean over seed replicates (runs differing only in {}) with its 95% interval: a percentile bootstrap ({} resamples, fixed seed) over eval items within each run (stratified by style for the forgetting score), combined with a bootstrap over seeds (rescaled by sqrt(S/(S-1))); binomial means within 5 items of 0 or n are floored by Wilson's interval. Differences between methods are paired over the same items.",
        if replicate_keys.is_empty() {
            "nothing: `replicate_keys` is empty".to_string()
        } else {
            replicate_keys
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        stats::REPLICATES
    )];
    v.extend(notes.iter().cloned());
    v
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), StageError> {
    std::fs::write(dir.join(name), text).map_err(|e| StageError::io(format!("writing {name}"), e))
}

fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Every numeric leaf of a JSON object, as dotted paths.
fn flatten(v: &Value, prefix: &str, f: &mut dyn FnMut(&str, f64)) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &p, f);
            }
        }
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                f(prefix, x);
            }
        }
        _ => {}
    }
}
