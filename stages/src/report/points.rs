//! The study's points: each eval's learning and forgetting numbers (with their per-item
//! scores where `samples.jsonl` reproduces them), the training curves' durations, and what
//! trained each model, grouped into one point per method and duration with seed replicates
//! as a mean and an interval.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::stats::{self, Estimate, Items, Replicate};
use crate::kind::{InputArtifact, StageContext, StageError};

/// A JSON file an input stage wrote; an error names the file.
pub(super) fn read_json(path: &Path) -> Result<Value, StageError> {
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
pub(super) struct Curve {
    pub(super) stage: String,
    /// (step, tokens, loss, heldout loss or NaN)
    pub(super) rows: Vec<(f64, f64, f64, f64)>,
}

/// A training stage's `curve.csv`: step, tokens, loss and held-out loss per row; an error
/// names the file and line.
pub(super) fn read_curve(a: &InputArtifact) -> Result<Curve, StageError> {
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
pub(super) struct Run {
    pub(super) eval: String,
    pub(super) model: String,
    pub(super) learning: f64,
    pub(super) forgetting: f64,
    pub(super) learning_items: Option<Items>,
    pub(super) forgetting_items: Option<Items>,
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

/// The number at `TASK.METRIC` in an eval's `tasks`.
pub(super) fn metric(tasks: &Value, path: &str) -> Option<f64> {
    let (task, name) = path.split_once('.')?;
    tasks.get(task)?.get(name)?.as_f64()
}

/// The learning metric's path: `wanted`, or for `auto` GSM8K's strict match, else
/// HumanEval's pass@1, else the first perplexity input.
pub(super) fn learning_path(tasks: &Value, wanted: &str) -> Option<String> {
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

/// The loss of `perplexity.STAGE`, the perplexity input of that stage.
pub(super) fn perplexity_metric(tasks: &Value, path: &str) -> Option<f64> {
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
pub(super) fn read_samples(dir: &Path) -> Option<Vec<Value>> {
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
pub(super) fn checked_items(
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
pub(super) fn families(ctx: &StageContext) -> BTreeMap<String, Value> {
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

/// What trained `model`: nothing here (the base), LoRA (with its rank from its summary or
/// its name), full finetuning with a regularizer in its method's name, or plain full.
pub(super) fn family_of(
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
pub(super) fn group(
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
