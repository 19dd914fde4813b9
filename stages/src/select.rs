//! The `select` kind: picks one member of a sweep by a number in its outputs (the held-out
//! loss in a training curve's `summary.json`, an eval metric), lowest or highest, optionally
//! by a second number among the candidates close to the best ("the highest learning rate
//! whose loss is within 0.05 of the best": the paper's highest stable LR).
//!
//! The output `choice/choice.json` records the rule, every candidate's stage, digest and
//! values, and the chosen one (with its `lr` when its `summary.json` has one, which training
//! stages' `lr_from` reads). Keys stay sound without special casing: the choice's digest
//! covers the candidates' digests and values, so anything downstream reruns when a candidate
//! changes, and a changed candidate reruns the selection (its digest is an input).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "select"`.
pub static KIND: Kind = Kind {
    name: "select",
    version: 1,
    doc: "picks one member of a sweep by a number in its outputs (lowest held-out loss, best eval metric), optionally the one with the highest `prefer` value within `within` of the best; writes `choice.json` with every candidate's value, which training stages' `lr_from` reads",
    params: &[
        Param {
            name: "candidates",
            ty: ParamType::Inputs,
            default: Default::Required,
            doc: "the artifacts to choose among (`[\"lr_sweep.curve\"]` collects every member of the group)",
        },
        Param {
            name: "metric",
            ty: ParamType::Str,
            default: Default::Required,
            doc: "FILE:KEY, a JSON file in each candidate and a key path in it (dots for nesting): `summary.json:heldout_loss`, `metrics.json:tasks.gsm8k.strict_match`",
        },
        Param {
            name: "goal",
            ty: ParamType::Choice(&["min", "max"]),
            default: Default::Value("\"min\""),
            doc: "whether the lowest or the highest metric is best",
        },
        Param {
            name: "within",
            ty: ParamType::Float,
            default: Default::Optional,
            doc: "with `prefer`: every candidate whose metric is within this (absolute) of the best is eligible",
        },
        Param {
            name: "prefer",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "FILE:KEY that decides among the eligible candidates (`summary.json:lr`); ties go to the first in candidate order",
        },
        Param {
            name: "prefer_goal",
            ty: ParamType::Choice(&["max", "min"]),
            default: Default::Value("\"max\""),
            doc: "whether the highest or the lowest `prefer` value wins",
        },
    ],
    outputs: &["choice"],
    uses_device: false,
    unkeyed: &[],
    run,
};

/// The file the choice is written to, in the `choice` output.
pub const CHOICE_FILE: &str = "choice.json";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    metric: String,
    goal: String,
    within: Option<f64>,
    prefer: Option<String>,
    prefer_goal: String,
}

/// A `FILE:KEY` param: a JSON file inside each candidate and a dotted key path in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Locator {
    /// Relative path of the JSON file inside the artifact.
    pub file: String,
    /// Dotted key path (`tasks.gsm8k.strict_match`).
    pub key: String,
}

impl Locator {
    /// Parses `FILE:KEY`; `param` names the param in the error.
    pub fn parse(text: &str, param: &str) -> Result<Locator, StageError> {
        let bad = |why: &str| {
            StageError::Params(format!(
                "`{param}` = {text:?}: {why} (expected FILE:KEY, e.g. \"summary.json:heldout_loss\")"
            ))
        };
        let (file, key) = text.split_once(':').ok_or_else(|| bad("no `:`"))?;
        crate::relpath::checked_rel_path(file).map_err(|e| bad(&e))?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(bad("the key path is empty or has an empty part"));
        }
        Ok(Locator {
            file: file.to_string(),
            key: key.to_string(),
        })
    }
}

impl std::fmt::Display for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.key)
    }
}

/// The value at a dotted key path. A key that itself contains dots is found too: at each
/// level the longest prefix of the remaining path that is a key wins.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    if let Some(found) = obj.get(path) {
        return Some(found);
    }
    let cuts: Vec<usize> = path.match_indices('.').map(|(i, _)| i).collect();
    cuts.iter().rev().find_map(|&i| {
        obj.get(&path[..i])
            .and_then(|inner| lookup(inner, &path[i + 1..]))
    })
}

/// Reads one number from a candidate's JSON file; every way it can be absent or unusable
/// is an error naming the candidate, the file and the key.
fn read_number(
    stage: &str,
    dir: &Path,
    at: &Locator,
    files: &mut BTreeMap<String, Value>,
) -> Result<f64, StageError> {
    if !files.contains_key(&at.file) {
        let path = dir.join(&at.file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            StageError::Failed(format!(
                "candidate `{stage}` has no readable `{}` ({e}); does the metric name a file of that output?",
                at.file
            ))
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            StageError::Failed(format!(
                "candidate `{stage}`: `{}` is not JSON: {e}",
                at.file
            ))
        })?;
        files.insert(at.file.clone(), v);
    }
    let v = &files[&at.file];
    let found = lookup(v, &at.key).ok_or_else(|| {
        let keys = v
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        StageError::Failed(format!(
            "candidate `{stage}`: `{}` has no key `{}` (its top-level keys: {keys})",
            at.file, at.key
        ))
    })?;
    match found.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(StageError::Failed(format!(
            "candidate `{stage}`: `{}` key `{}` is {found}, not a finite number",
            at.file, at.key
        ))),
    }
}

/// How the best candidate is found.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Higher metric is better.
    pub maximize: bool,
    /// With a prefer value: the margin from the best within which a candidate is eligible.
    pub within: Option<f64>,
    /// Higher prefer value wins among the eligible.
    pub prefer_max: bool,
}

/// The chosen index and which candidates were eligible, from each candidate's metric and
/// prefer value (when `prefer` is given, every candidate has one). The best metric is the
/// lowest (or highest); without prefer values the first candidate at the best wins. With
/// them, every candidate whose metric is at most `within` from the best (0 when absent) is
/// eligible, and the highest (or lowest) prefer value wins; ties go to the first.
pub fn choose(values: &[(f64, Option<f64>)], rule: Rule) -> Option<(usize, Vec<bool>)> {
    let better = |a: f64, b: f64| if rule.maximize { a > b } else { a < b };
    let mut best = 0;
    for (i, (v, _)) in values.iter().enumerate() {
        if better(*v, values[best].0) {
            best = i;
        }
    }
    let top = values.get(best)?.0;
    let margin = rule.within.unwrap_or(0.0);
    let eligible: Vec<bool> = values
        .iter()
        .map(|(v, _)| {
            if rule.maximize {
                *v >= top - margin
            } else {
                *v <= top + margin
            }
        })
        .collect();
    let mut chosen = best;
    for (i, (_, pv)) in values.iter().enumerate() {
        let (Some(pv), Some(cur)) = (pv, values[chosen].1) else {
            continue;
        };
        let wins = if rule.prefer_max {
            *pv > cur
        } else {
            *pv < cur
        };
        if eligible[i] && (wins || (*pv == cur && i < chosen)) {
            chosen = i;
        }
    }
    Some((chosen, eligible))
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    let metric = Locator::parse(&p.metric, "metric")?;
    let prefer = p
        .prefer
        .as_deref()
        .map(|t| Locator::parse(t, "prefer"))
        .transpose()?;
    if p.within.is_some() && prefer.is_none() {
        return Err(StageError::Params(
            "`within` needs `prefer` (the value that decides among the candidates within it of the best)".into(),
        ));
    }
    if let Some(w) = p.within
        && (w < 0.0 || !w.is_finite())
    {
        return Err(StageError::Params(format!(
            "`within` must be a finite number >= 0 (got {w})"
        )));
    }
    let candidates = ctx.artifacts("candidates");
    if candidates.is_empty() {
        return Err(StageError::Params(
            "`candidates` names no artifact: nothing to choose from".into(),
        ));
    }
    let mut values = Vec::with_capacity(candidates.len());
    let mut lrs = Vec::with_capacity(candidates.len());
    for a in candidates {
        let mut files = BTreeMap::new();
        let v = read_number(&a.stage, &a.dir, &metric, &mut files)?;
        let pv = match &prefer {
            Some(at) => Some(read_number(&a.stage, &a.dir, at, &mut files)?),
            None => None,
        };
        values.push((v, pv));
        lrs.push(summary_lr(&a.dir));
    }
    let rule = Rule {
        maximize: p.goal == "max",
        within: p.within,
        prefer_max: p.prefer_goal == "max",
    };
    let (chosen, eligible) = choose(&values, rule).expect("at least one candidate");
    let best = values
        .iter()
        .map(|(v, _)| *v)
        .reduce(|a, b| if rule.maximize { a.max(b) } else { a.min(b) })
        .expect("at least one candidate");
    let listed: Vec<Value> = candidates
        .iter()
        .zip(&values)
        .zip(&eligible)
        .map(|((a, (v, pv)), e)| {
            json!({"stage": a.stage, "digest": a.digest, "value": v, "prefer_value": pv,
                   "eligible": e})
        })
        .collect();
    let c = &candidates[chosen];
    let mut picked = json!({"stage": c.stage, "digest": c.digest, "value": values[chosen].0,
                            "prefer_value": values[chosen].1});
    if let Some(lr) = lrs[chosen] {
        picked["lr"] = json!(lr);
    }
    let doc = json!({
        "metric": p.metric,
        "goal": p.goal,
        "within": p.within,
        "prefer": p.prefer,
        "prefer_goal": p.prefer.as_ref().map(|_| &p.prefer_goal),
        "best": best,
        "chosen": picked,
        "candidates": listed,
    });
    let out = ctx.output("choice")?;
    std::fs::write(
        out.join(CHOICE_FILE),
        serde_json::to_string_pretty(&doc).expect("JSON") + "\n",
    )
    .map_err(|e| StageError::io(format!("writing {CHOICE_FILE}"), e))?;

    let mut outcome = StageOutcome::default();
    let m = &mut outcome.metrics;
    m.insert("chosen".into(), json!(c.stage));
    m.insert("value".into(), json!(values[chosen].0));
    if let Some(pv) = values[chosen].1 {
        m.insert("prefer_value".into(), json!(pv));
    }
    if let Some(lr) = lrs[chosen] {
        m.insert("lr".into(), json!(lr));
    }
    m.insert("best".into(), json!(best));
    for (a, (v, _)) in candidates.iter().zip(&values) {
        m.insert(format!("candidate/{}", a.stage), json!(v));
    }
    Ok(outcome)
}

/// The `lr` of a training curve's `summary.json`, when the candidate is one.
fn summary_lr(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("summary.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["lr"].as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Rule = Rule {
        maximize: false,
        within: None,
        prefer_max: true,
    };

    #[test]
    fn the_lowest_wins_and_ties_go_to_the_first() {
        let v = [(3.0, None), (1.0, None), (2.0, None), (1.0, None)];
        let (i, eligible) = choose(&v, MIN).unwrap();
        assert_eq!(i, 1);
        assert_eq!(eligible, [false, true, false, true]);
        let max = Rule {
            maximize: true,
            ..MIN
        };
        assert_eq!(choose(&v, max).unwrap().0, 0);
        assert!(choose(&[], MIN).is_none());
    }

    #[test]
    fn within_takes_the_highest_prefer_value_close_to_the_best() {
        // (loss, lr): the best loss is 2.0 at lr 0.01; 2.04 at lr 0.03 is within 0.05.
        let v = [
            (2.5, Some(0.001)),
            (2.0, Some(0.01)),
            (2.04, Some(0.03)),
            (2.3, Some(0.1)),
        ];
        let rule = Rule {
            within: Some(0.05),
            ..MIN
        };
        let (i, eligible) = choose(&v, rule).unwrap();
        assert_eq!(i, 2);
        assert_eq!(eligible, [false, true, true, false]);
        let lowest = Rule {
            prefer_max: false,
            ..rule
        };
        assert_eq!(choose(&v, lowest).unwrap().0, 1);
        let wide = Rule {
            within: Some(1.0),
            ..MIN
        };
        assert_eq!(choose(&v, wide).unwrap().0, 3);
    }

    #[test]
    fn key_paths_nest_and_may_contain_dots() {
        let v = json!({"tasks": {"gsm8k": {"strict_match": 0.25}, "a.b": {"c": 1}}});
        assert_eq!(lookup(&v, "tasks.gsm8k.strict_match"), Some(&json!(0.25)));
        assert_eq!(lookup(&v, "tasks.a.b.c"), Some(&json!(1)));
        assert_eq!(lookup(&v, "tasks.missing"), None);
        assert_eq!(lookup(&v, "tasks.gsm8k.strict_match.deeper"), None);
    }

    #[test]
    fn locators_need_a_file_inside_and_a_key() {
        let l = Locator::parse("summary.json:heldout_loss", "metric").unwrap();
        assert_eq!(
            (l.file.as_str(), l.key.as_str()),
            ("summary.json", "heldout_loss")
        );
        for bad in [
            "summary.json",
            "../x.json:a",
            "s.json:",
            "s.json:a..b",
            "/abs.json:a",
        ] {
            let e = Locator::parse(bad, "metric").unwrap_err().to_string();
            assert!(e.contains("FILE:KEY"), "{bad}: {e}");
        }
    }
}
