//! The `report` kind: the study's figures and numbers from eval, svd and training results.
//! Learning vs forgetting (the paper's Figures 3-4), both against training duration, rank@p
//! of the weight changes by layer (Figure 6), spectra with the Gaussian control, loss curves,
//! and a table of every number with the stage that produced it. Seed replicates of a method
//! and duration are one point with a mean and a 95% interval (bootstrap over eval items and
//! seeds: [`stats`]), drawn as error bars, and a findings table says which of the paper's
//! four findings the run supports, contradicts or cannot tell at its noise.

pub mod figures;
pub mod findings;
pub mod selections;
pub mod stats;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use self::figures::{Figure, Panel, Series};
use self::stats::{Estimate, Items, Replicate};
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

fn read_json(path: &Path) -> Result<Value, StageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))
}

/// `name[a=1,steps=10]` without the duration coordinates: `name[a=1]`.
pub fn method_of(stage: &str, duration_keys: &[String]) -> String {
    let Some((name, rest)) = stage.split_once('[') else {
        return stage.to_string();
    };
    let coords: Vec<&str> = rest
        .trim_end_matches(']')
        .split(',')
        .filter(|c| {
            let key = c.split('=').next().unwrap_or("");
            !duration_keys.iter().any(|k| k == key)
        })
        .collect();
    if coords.is_empty() {
        name.to_string()
    } else {
        format!("{name}[{}]", coords.join(","))
    }
}

/// One training curve.
struct Curve {
    stage: String,
    /// (step, tokens, loss, heldout loss or NaN)
    rows: Vec<(f64, f64, f64, f64)>,
}

fn read_curve(a: &InputArtifact) -> Result<Curve, StageError> {
    let path = a.dir.join("curve.csv");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<f64> = line
            .split(',')
            .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
            .collect();
        if f.len() < 6 {
            return Err(StageError::Failed(format!(
                "{}:{}: expected 6 columns (step,tokens,lr,loss,grad_norm,heldout_loss)",
                path.display(),
                i + 1
            )));
        }
        rows.push((f[0], f[1], f[3], f[5]));
    }
    Ok(Curve {
        stage: a.stage.clone(),
        rows,
    })
}

/// One eval of one model: a replicate of its point.
#[derive(Debug, Clone)]
struct Run {
    eval: String,
    model: String,
    learning: f64,
    forgetting: f64,
    learning_items: Option<Items>,
    forgetting_items: Option<Items>,
}

/// What trained a point's model, for the findings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// Not trained here: the base reference.
    Base,
    /// Plain full finetuning.
    Full,
    /// Full finetuning with a regularizer (weight decay, dropout): finding 3's baselines.
    Regularized,
    /// LoRA, with its rank when known.
    Lora(Option<f64>),
}

/// One evaluated (method, duration): its seed replicates, means and intervals.
#[derive(Debug, Clone)]
pub struct Point {
    /// The method: the model's stage name without duration and replicate coordinates.
    pub method: String,
    /// The model's stage name without replicate coordinates.
    pub model: String,
    /// The eval stages behind the point.
    pub evals: Vec<String>,
    /// Tokens trained (None: not trained here, the base reference).
    pub tokens: Option<f64>,
    /// What trained it.
    pub family: Family,
    /// The learning metric over the replicates.
    pub learning: Estimate,
    /// The forgetting metric over the replicates.
    pub forgetting: Estimate,
}

fn metric(tasks: &Value, path: &str) -> Option<f64> {
    let (task, name) = path.split_once('.')?;
    tasks.get(task)?.get(name)?.as_f64()
}

fn learning_path(tasks: &Value, wanted: &str) -> Option<String> {
    if wanted != "auto" {
        return Some(wanted.to_string());
    }
    for p in ["gsm8k.strict_match", "humaneval.pass@1"] {
        if metric(tasks, p).is_some() {
            return Some(p.to_string());
        }
    }
    let ppl = tasks.get("perplexity")?.as_object()?;
    ppl.keys().next().map(|k| format!("perplexity.{k}"))
}

fn perplexity_metric(tasks: &Value, path: &str) -> Option<f64> {
    // perplexity.STAGE -> that input's loss
    let (_, stage) = path.split_once('.')?;
    tasks.get("perplexity")?.get(stage)?.get("loss")?.as_f64()
}

/// Higher is better for every metric but a perplexity (a loss).
pub fn higher_is_better(metric: &str) -> bool {
    !metric.starts_with("perplexity.")
}

/// The eval's `samples.jsonl` (None when absent or unreadable: the point then has no
/// item-level interval, and the report says so).
fn read_samples(dir: &Path) -> Option<Vec<Value>> {
    let text = std::fs::read_to_string(dir.join("samples.jsonl")).ok()?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A sample's id within its task, for lining items up across runs.
fn item_id(s: &Value) -> String {
    match (&s["task_id"], &s["index"]) {
        (Value::String(t), _) => t.clone(),
        (_, Value::Number(n)) => format!("{n:>12}"),
        _ => String::new(),
    }
}

fn sorted(mut v: Vec<(String, f64)>) -> Vec<f64> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter().map(|x| x.1).collect()
}

/// Per-item scores of `path` (TASK.METRIC) from an eval's samples: GSM8K's strict or
/// flexible correctness, HumanEval's pass@k per problem (from its samples' passes), a
/// multiple-choice style's accuracy, and the forgetting score as three strata (its styles).
/// None for metrics without items (perplexity) or samples that do not have them.
fn items_for(path: &str, tasks: &Value, samples: &[Value]) -> Option<Items> {
    let (task, name) = path.split_once('.')?;
    fn of_task<'a>(samples: &'a [Value], t: &'a str) -> impl Iterator<Item = &'a Value> {
        samples.iter().filter(move |s| s["task"] == t)
    }
    let correct = |s: &Value, metric: &str| -> Option<f64> {
        let pred = s[format!("pred_{metric}")].as_u64()?;
        Some((pred == s["gold"].as_u64()?) as u8 as f64)
    };
    let items = match (task, name) {
        ("gsm8k", "strict_match" | "flexible_extract") => {
            let field = if name == "strict_match" {
                "correct_strict"
            } else {
                "correct_flexible"
            };
            let v: Option<Vec<(String, f64)>> = of_task(samples, "gsm8k")
                .map(|s| Some((item_id(s), s[field].as_bool()? as u8 as f64)))
                .collect();
            Items::flat(task, sorted(v?))
        }
        ("humaneval", k) => {
            let k: usize = k.strip_prefix("pass@")?.parse().ok()?;
            let mut problems: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for s in of_task(samples, "humaneval") {
                let e = problems.entry(item_id(s)).or_default();
                e.0 += 1;
                e.1 += s["passed"].as_bool()? as usize;
            }
            if problems.values().any(|&(n, _)| n < k) {
                return None;
            }
            let v = problems
                .into_iter()
                .map(|(id, (n, c))| (id, crate::eval::humaneval::pass_at_k(n, c, k)))
                .collect();
            Items::flat(task, sorted(v))
        }
        ("forgetting", "score") => {
            let f = tasks.get("forgetting")?;
            let m = f["metric"].as_str()?;
            let mut strata = Vec::new();
            for style in f["parts"].as_object()?.keys() {
                let v: Option<Vec<(String, f64)>> = of_task(samples, style)
                    .map(|s| Some((item_id(s), correct(s, m)?)))
                    .collect();
                strata.push((style.clone(), sorted(v?)));
            }
            Items { strata }
        }
        (style, m @ ("acc" | "acc_norm" | "acc_ppl")) => {
            let v: Option<Vec<(String, f64)>> = of_task(samples, style)
                .map(|s| Some((item_id(s), correct(s, m)?)))
                .collect();
            Items::flat(style, sorted(v?))
        }
        _ => return None,
    };
    items.valid().then_some(items)
}

/// The items of `path`, kept only when they reproduce the eval's own number (so the interval
/// is around what the report shows); a note says why a point has none.
fn checked_items(
    path: &str,
    value: f64,
    tasks: &Value,
    samples: Option<&[Value]>,
    eval: &str,
    notes: &mut Vec<String>,
) -> Option<Items> {
    if !value.is_finite() || !higher_is_better(path) {
        return None;
    }
    let Some(samples) = samples else {
        notes.push(format!(
            "{eval}: no samples.jsonl: `{path}` has no item-level interval"
        ));
        return None;
    };
    match items_for(path, tasks, samples) {
        Some(items) if (items.statistic() - value).abs() <= 1e-9 => Some(items),
        Some(items) => {
            notes.push(format!(
                "{eval}: samples.jsonl gives {} for `{path}` where metrics.json has {value}: no item-level interval",
                items.statistic()
            ));
            None
        }
        None => {
            notes.push(format!(
                "{eval}: samples.jsonl has no per-item scores for `{path}`: no item-level interval"
            ));
            None
        }
    }
}

/// The training stages' `summary.json` (method and rank), by stage.
fn families(ctx: &StageContext) -> BTreeMap<String, Value> {
    ctx.artifacts("curves")
        .iter()
        .filter_map(|a| {
            Some((
                a.stage.clone(),
                read_json(&a.dir.join("summary.json")).ok()?,
            ))
        })
        .collect()
}

/// A coordinate's value in a stage name (`rank` of `lora[rank=16]`).
fn coordinate(stage: &str, key: &str) -> Option<f64> {
    let (_, rest) = stage.split_once('[')?;
    rest.trim_end_matches(']')
        .split(',')
        .find_map(|c| c.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn family_of(
    model: &str,
    method: &str,
    trained: bool,
    summaries: &BTreeMap<String, Value>,
    regularizers: &[String],
) -> Family {
    if !trained {
        return Family::Base;
    }
    let s = summaries.get(model);
    let lora = match s.and_then(|s| s["method"].as_str()) {
        Some(m) => m == "lora",
        None => method.starts_with("lora"),
    };
    if lora {
        let rank = s
            .and_then(|s| s["rank"].as_f64())
            .or_else(|| coordinate(model, "rank"));
        Family::Lora(rank)
    } else if regularizers.iter().any(|r| method.contains(r.as_str())) {
        Family::Regularized
    } else {
        Family::Full
    }
}

/// A run with its tokens and method.
type Member = (Run, Option<f64>, String);

/// Runs grouped into points by (method, model without replicates), in a stable order.
fn group(
    runs: Vec<(Run, String, Option<f64>, String)>,
    summaries: &BTreeMap<String, Value>,
    regularizers: &[String],
) -> Vec<Point> {
    let mut groups: BTreeMap<(String, String), Vec<Member>> = BTreeMap::new();
    for (run, method, tokens, model) in runs {
        groups
            .entry((method.clone(), model.clone()))
            .or_default()
            .push((run, tokens, method));
    }
    let mut points = Vec::new();
    for ((method, model), members) in groups {
        let tokens = members.iter().find_map(|m| m.1);
        let label = format!("{method}@{model}");
        let est = |f: &dyn Fn(&Run) -> Replicate, what: &str| {
            let reps: Vec<Replicate> = members.iter().map(|m| f(&m.0)).collect();
            stats::estimate(
                &reps,
                &format!("{what}/{label}"),
                stats::REPLICATES,
                stats::SEED,
            )
        };
        let learning = est(
            &|r| Replicate {
                value: r.learning,
                items: r.learning_items.clone(),
            },
            "learning",
        );
        let forgetting = est(
            &|r| Replicate {
                value: r.forgetting,
                items: r.forgetting_items.clone(),
            },
            "forgetting",
        );
        let first = &members[0].0.model;
        points.push(Point {
            family: family_of(first, &method, tokens.is_some(), summaries, regularizers),
            evals: members.iter().map(|m| m.0.eval.clone()).collect(),
            method,
            model,
            tokens,
            learning,
            forgetting,
        });
    }
    points
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

/// Points grouped by method, each group sorted by duration.
fn by_method(points: &[Point]) -> BTreeMap<&str, Vec<&Point>> {
    let mut m: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for pt in points.iter().filter(|p| p.tokens.is_some()) {
        m.entry(pt.method.as_str()).or_default().push(pt);
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| a.tokens.partial_cmp(&b.tokens).expect("finite"));
    }
    m
}

/// A point's interval for a whisker (None: the point has none).
fn whisker(e: &Estimate) -> Option<(f64, f64)> {
    e.has_interval().then_some((e.lo, e.hi))
}

fn references(
    points: &[Point],
    xy: impl Fn(&Point) -> (f64, f64),
    err: impl Fn(&Point) -> (Option<(f64, f64)>, Option<(f64, f64)>),
) -> Vec<Series> {
    points
        .iter()
        .filter(|p| p.tokens.is_none())
        .map(|p| Series {
            label: p.method.clone(),
            points: vec![xy(p)],
            sizes: None,
            line: false,
            reference: true,
            x_err: vec![err(p).0],
            y_err: vec![err(p).1],
        })
        .collect()
}

fn learning_vs_forgetting(points: &[Point], learning: &str, forgetting: &str) -> Figure {
    let max = points.iter().filter_map(|p| p.tokens).fold(1.0, f64::max);
    let mut series: Vec<Series> = by_method(points)
        .into_iter()
        .map(|(m, pts)| Series {
            label: m.to_string(),
            points: pts
                .iter()
                .map(|p| (p.forgetting.mean, p.learning.mean))
                .collect(),
            sizes: Some(
                pts.iter()
                    .map(|p| 3.0 + 7.0 * p.tokens.unwrap_or(0.0) / max)
                    .collect(),
            ),
            line: true,
            reference: false,
            x_err: pts.iter().map(|p| whisker(&p.forgetting)).collect(),
            y_err: pts.iter().map(|p| whisker(&p.learning)).collect(),
        })
        .collect();
    series.extend(references(
        points,
        |p| (p.forgetting.mean, p.learning.mean),
        |p| (whisker(&p.forgetting), whisker(&p.learning)),
    ));
    Figure {
        name: "learning_vs_forgetting".into(),
        title: String::new(),
        cols: 1,
        panels: vec![Panel {
            title: "Learning vs forgetting (marker size = training tokens, bars = 95% CI)".into(),
            x_label: format!("forgetting: {forgetting} (higher = forgets less)"),
            y_label: format!("learning: {learning}"),
            series,
        }],
    }
}

fn by_duration(points: &[Point], learning: &str, forgetting: &str) -> Figure {
    let panel = |title: &str, label: &str, get: fn(&Point) -> &Estimate| {
        let mut series: Vec<Series> = by_method(points)
            .into_iter()
            .map(|(m, pts)| Series {
                label: m.to_string(),
                points: pts
                    .iter()
                    .map(|p| (p.tokens.unwrap_or(0.0), get(p).mean))
                    .collect(),
                sizes: Some(vec![4.0; pts.len()]),
                line: true,
                reference: false,
                x_err: Vec::new(),
                y_err: pts.iter().map(|p| whisker(get(p))).collect(),
            })
            .collect();
        series.extend(references(
            points,
            |p| (0.0, get(p).mean),
            |p| (None, whisker(get(p))),
        ));
        Panel {
            title: title.into(),
            x_label: "training tokens".into(),
            y_label: label.into(),
            series,
        }
    };
    Figure {
        name: "by_duration".into(),
        title: String::new(),
        cols: 2,
        panels: vec![
            panel("Learning by training duration (95% CI)", learning, |p| {
                &p.learning
            }),
            panel(
                "Forgetting by training duration (95% CI)",
                forgetting,
                |p| &p.forgetting,
            ),
        ],
    }
}

fn rank_by_layer(svds: &[(String, Value, &InputArtifact)], tokens: &BTreeMap<&str, f64>) -> Figure {
    let mut modules: Vec<String> = Vec::new();
    for (_, s, _) in svds {
        if let Some(m) = s["rank_delta_by_layer"].as_object() {
            for k in m.keys() {
                if !modules.contains(k) {
                    modules.push(k.clone());
                }
            }
        }
    }
    let order = ["q", "k", "v", "o", "gate", "up", "down"];
    modules.sort_by_key(|m| order.iter().position(|o| o == m).unwrap_or(99));
    let variance = svds[0].1["variance"].as_f64().unwrap_or(0.9);
    let panels = modules
        .iter()
        .map(|m| Panel {
            title: format!("{m}_proj"),
            x_label: "layer".into(),
            y_label: format!("rank@{:.0}% of Delta", variance * 100.0),
            series: svds
                .iter()
                .filter_map(|(_, s, _)| {
                    let ranks = s["rank_delta_by_layer"][m].as_array()?;
                    let ft = s["finetuned"]["stage"].as_str().unwrap_or("?");
                    let label = match tokens.get(ft) {
                        Some(t) => format!("{ft} ({} tokens)", human(*t)),
                        None => ft.to_string(),
                    };
                    Some(Series::plain(
                        label,
                        ranks
                            .iter()
                            .enumerate()
                            .map(|(l, r)| (l as f64, r.as_f64().unwrap_or(f64::NAN)))
                            .collect(),
                        Some(vec![3.0; ranks.len()]),
                    ))
                })
                .collect(),
        })
        .collect();
    Figure {
        name: "rank_by_layer".into(),
        title: "Rank needed to explain the spectrum of the weight change, by layer".into(),
        cols: 4,
        panels,
    }
}

fn human(t: f64) -> String {
    if t >= 1e9 {
        format!("{:.1}B", t / 1e9)
    } else if t >= 1e6 {
        format!("{:.1}M", t / 1e6)
    } else if t >= 1e3 {
        format!("{:.0}k", t / 1e3)
    } else {
        format!("{t}")
    }
}

fn read_vector(st: &safetensors::SafeTensors, name: &str) -> Option<Vec<f64>> {
    let v = st.tensor(name).ok()?;
    let data = crate::model::weights::to_f32(v.dtype(), v.data()).ok()?;
    Some(data.into_iter().map(f64::from).collect())
}

/// Spectra of the chosen matrix (from the longest full-model change) and of the controls.
fn spectra(
    svds: &[(String, Value, &InputArtifact)],
    matrix: &str,
    tokens: &BTreeMap<&str, f64>,
) -> Result<Option<Figure>, StageError> {
    let pick = svds
        .iter()
        .filter(|(_, s, _)| s["finetuned"]["kind"] == "model")
        .max_by(|a, b| {
            let t = |x: &Value| {
                tokens
                    .get(x["finetuned"]["stage"].as_str().unwrap_or(""))
                    .copied()
                    .unwrap_or(0.0)
            };
            t(&a.1).total_cmp(&t(&b.1))
        })
        .or(svds.first());
    let Some((_, summary, a)) = pick else {
        return Ok(None);
    };
    let path = a.dir.join("spectra.safetensors");
    let bytes = std::fs::read(&path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
    let line = |label: String, v: Vec<f64>| {
        Series::plain(
            label,
            v.iter()
                .enumerate()
                .filter(|(_, s)| **s > 0.0)
                .map(|(i, s)| ((i + 1) as f64, s.log10()))
                .collect(),
            None,
        )
    };
    let mut weights = Vec::new();
    for (which, label) in [
        ("delta", "Delta = W_ft - W_base"),
        ("base", "W_base"),
        ("finetuned", "W_ft"),
    ] {
        if let Some(v) = read_vector(&st, &format!("{matrix}.{which}")) {
            weights.push(line(label.into(), v));
        }
    }
    if weights.is_empty() {
        return Err(StageError::Failed(format!(
            "{}: no spectra for matrix `{matrix}` (param `matrix`)",
            path.display()
        )));
    }
    let mut panels = vec![Panel {
        title: format!(
            "{matrix} ({})",
            summary["finetuned"]["stage"].as_str().unwrap_or("?")
        ),
        x_label: "index i".into(),
        y_label: "log10 singular value".into(),
        series: weights,
    }];
    if let Some(a_sv) = read_vector(&st, "control.A") {
        let mut control = vec![line("Gaussian A".into(), a_sv)];
        if let Some(cs) = summary["controls"]["c"].as_array() {
            // The c closest to 10^-1 shows a visible but small perturbation.
            let best = cs
                .iter()
                .filter_map(|c| c["log10_c"].as_f64())
                .min_by(|a, b| (a + 1.0).abs().total_cmp(&(b + 1.0).abs()));
            if let Some(e) = best {
                for (key, label) in [("A+cB", "A + cB"), ("cB", "cB")] {
                    if let Some(v) = read_vector(&st, &format!("control.{key}.{e}")) {
                        control.push(line(format!("{label} (c = 1e{e})"), v));
                    }
                }
            }
        }
        panels.push(Panel {
            title: "Gaussian control, same shape".into(),
            x_label: "index i".into(),
            y_label: "log10 singular value".into(),
            series: control,
        });
    }
    Ok(Some(Figure {
        name: "spectra".into(),
        title: String::new(),
        cols: 2,
        panels,
    }))
}

fn loss_curves(curves: &[Curve]) -> Figure {
    let series = |held: bool| -> Vec<Series> {
        curves
            .iter()
            .map(|c| {
                Series::plain(
                    c.stage.clone(),
                    c.rows
                        .iter()
                        .map(|r| (r.0, if held { r.3 } else { r.2 }))
                        .filter(|q| q.1.is_finite())
                        .collect(),
                    if held {
                        Some(vec![3.0; c.rows.len()])
                    } else {
                        None
                    },
                )
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let mut panels = vec![Panel {
        title: "Training loss".into(),
        x_label: "step".into(),
        y_label: "loss (nats/token)".into(),
        series: series(false),
    }];
    let held = series(true);
    if !held.is_empty() {
        panels.push(Panel {
            title: "Held-out loss".into(),
            x_label: "step".into(),
            y_label: "loss (nats/token)".into(),
            series: held,
        });
    }
    Figure {
        name: "loss_curves".into(),
        title: String::new(),
        cols: 2,
        panels,
    }
}

struct Summary {
    text: String,
    markdown: String,
}

fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "-".into()
    }
}

/// A mean with its interval: `0.080 [0.047, 0.120]`, or the mean alone when it has none.
fn fmt_ci(e: &Estimate) -> String {
    if e.has_interval() {
        format!("{} [{}, {}]", fmt(e.mean), fmt(e.lo), fmt(e.hi))
    } else {
        fmt(e.mean)
    }
}

fn sorted_points(points: &[Point]) -> Vec<&Point> {
    let mut rows: Vec<&Point> = points.iter().collect();
    rows.sort_by(|a, b| {
        a.method.cmp(&b.method).then(
            a.tokens
                .partial_cmp(&b.tokens)
                .unwrap_or(std::cmp::Ordering::Equal),
        )
    });
    rows
}

fn summary_table(points: &[Point], learning: &str, forgetting: &str) -> Summary {
    let rows = sorted_points(points);
    let l = format!("{learning} [95% CI]");
    let f = format!("{forgetting} [95% CI]");
    let header = ["method", "model", "seeds", "tokens", l.as_str(), f.as_str()];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|p| {
            [
                p.method.clone(),
                p.model.clone(),
                p.learning.seeds.to_string(),
                p.tokens.map_or("-".into(), human),
                fmt_ci(&p.learning),
                fmt_ci(&p.forgetting),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..6)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    let line = |cols: [&str; 6], out: &mut String| {
        let parts: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(header, &mut text);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]], &mut text);
    }
    let mut md = format!("| {} |\n|---|---|---|---|---|---|\n", header.join(" | "));
    for c in &cells {
        let _ = writeln!(md, "| {} |", c.join(" | "));
    }
    Summary { text, markdown: md }
}

/// `summary.csv`: one row per point and metric with the mean, the interval and its source.
fn summary_csv(points: &[Point], learning: &str, forgetting: &str) -> String {
    let mut s =
        String::from("method,model,tokens,seeds,metric,mean,ci_low,ci_high,interval_from,evals\n");
    let num = |v: f64| {
        if v.is_finite() {
            v.to_string()
        } else {
            String::new()
        }
    };
    for p in sorted_points(points) {
        for (name, e) in [(learning, &p.learning), (forgetting, &p.forgetting)] {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{}",
                quote(&p.method),
                quote(&p.model),
                p.tokens.map_or(String::new(), |t| t.to_string()),
                e.seeds,
                quote(name),
                num(e.mean),
                num(e.lo),
                num(e.hi),
                e.source.describe(),
                quote(&p.evals.join(" "))
            );
        }
    }
    s
}

fn markdown(
    title: &str,
    summary: &str,
    findings: &str,
    intervals: &[String],
    figs: &[(&Figure, String)],
    chosen: &str,
    table: &[(String, String, String, f64)],
) -> String {
    let mut s = format!("# {title}\n\n## Findings\n\n{findings}\n## Models\n\n{summary}\n");
    for n in intervals {
        let _ = writeln!(s, "- {n}");
    }
    s.push('\n');
    for (f, _) in figs {
        let _ = writeln!(
            s,
            "## {}\n\n![{0}](figures/{}.png)\n",
            f.name.replace('_', " "),
            f.name
        );
    }
    s += chosen;
    s += "## Every number\n\n| stage | model | metric | value |\n|---|---|---|---|\n";
    for (stage, model, k, v) in table {
        let _ = writeln!(s, "| {stage} | {model} | {k} | {v} |");
    }
    s
}

/// `&`, `<` and `>` as HTML entities.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[allow(clippy::too_many_arguments)]
fn html(
    title: &str,
    points: &[Point],
    learning: &str,
    forgetting: &str,
    findings: &str,
    intervals: &[String],
    figs: &[(&Figure, String)],
    chosen: &str,
    table: &[(String, String, String, f64)],
) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;}}table{{border-collapse:collapse;}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;}}svg{{max-width:100%;height:auto;}}</style></head><body>\n<h1>{t}</h1>\n<h2>Findings</h2>\n{findings}<h2>Models</h2>\n<table><tr><th>method</th><th>model</th><th>eval stages</th><th>seeds</th><th>tokens</th><th>{l} [95% CI]</th><th>{f} [95% CI]</th></tr>\n",
        t = escape(title),
        l = escape(learning),
        f = escape(forgetting)
    );
    for p in sorted_points(points) {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&p.method),
            escape(&p.model),
            escape(&p.evals.join(", ")),
            p.learning.seeds,
            p.tokens.map_or("-".into(), human),
            fmt_ci(&p.learning),
            fmt_ci(&p.forgetting)
        );
    }
    s += "</table>\n<ul>\n";
    for n in intervals {
        let _ = writeln!(s, "<li>{}</li>", escape(n));
    }
    s += "</ul>\n";
    for (f, svg) in figs {
        let _ = writeln!(s, "<h2>{}</h2>\n{svg}", escape(&f.name.replace('_', " ")));
    }
    s += chosen;
    s += "<h2>Every number</h2>\n<table><tr><th>stage</th><th>model</th><th>metric</th><th>value</th></tr>\n";
    for (stage, model, k, v) in table {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{v}</td></tr>",
            escape(stage),
            escape(model),
            escape(k)
        );
    }
    s += "</table>\n</body></html>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_drop_duration_coordinates() {
        let keys = vec!["steps".to_string(), "epochs".to_string()];
        assert_eq!(method_of("lora[rank=16,steps=100]", &keys), "lora[rank=16]");
        assert_eq!(method_of("full[steps=100]", &keys), "full");
        assert_eq!(method_of("full", &keys), "full");
        assert_eq!(
            method_of("reg[weight_decay=0.0001]", &keys),
            "reg[weight_decay=0.0001]"
        );
    }
}
