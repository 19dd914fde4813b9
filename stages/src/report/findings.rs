//! The paper's four findings against this run: for each, the difference that tests it, its
//! 95% interval (paired over eval items, resampled over seeds: [`super::stats`]) and a
//! verdict: "supports" when the interval excludes 0 in the paper's direction, "contradicts"
//! when it excludes 0 the other way, "cannot tell" otherwise or when the inputs are absent.
//!
//! Which comparison decides, and why:
//! - Findings 1 and 2 (LoRA learns less, forgets less) compare plain full finetuning with
//!   the LoRA of the **largest rank** at the longest duration both were trained for (equal
//!   tokens). The largest rank is the LoRA closest to full finetuning, so it is the hardest
//!   test of both claims; every other rank is listed as its own row with its own verdict.
//! - Finding 3 (LoRA regularizes more than weight decay or dropout) needs every regularized
//!   run to forget more than that same LoRA at equal tokens: it supports only when every row
//!   does, contradicts when any row contradicts, and otherwise cannot tell.
//! - Finding 4 (full finetuning's changes are high rank) compares the mean rank@p of full
//!   finetuning's weight change (over layers and modules, bootstrapped over layers within each
//!   module and over seeds) with the largest LoRA rank in the study, at the checkpoint with
//!   the lowest rank (the paper: high already early in training).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::plots::human;
use super::points::{Family, Point, family_of, method_of};
use super::stats::{self, Difference, Estimate, Items, Replicate, Source, Verdict};
use super::tables::{escape, fmt};
use crate::kind::InputArtifact;

/// The findings as the paper states them (PAPER.md), in its order.
pub const STATEMENTS: [&str; 4] = [
    "LoRA learns less: in most settings it underperforms full finetuning on the target domain",
    "LoRA forgets less: it better keeps the base model's performance outside the target domain",
    "LoRA regularizes more strongly than weight decay or (attention) dropout, which learn and forget about as much as plain full finetuning",
    "Full finetuning learns weight perturbations of high rank: the rank needed to explain 90% of the variance of the change is 10-100x larger than typical LoRA ranks",
];

/// One difference behind a finding.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The side the paper says is larger.
    pub a: String,
    /// The other side.
    pub b: String,
    /// Tokens both were trained for (None: not a same-duration comparison).
    pub tokens: Option<f64>,
    /// a's estimate as shown (not oriented).
    pub a_est: (f64, f64, f64),
    /// b's estimate as shown.
    pub b_est: (f64, f64, f64),
    /// a - b, oriented so that positive is the paper's direction.
    pub diff: Difference,
}

/// One of the paper's findings, assessed.
#[derive(Debug, Clone)]
pub struct Finding {
    /// 1 to 4, the paper's order.
    pub id: usize,
    /// The paper's words.
    pub statement: &'static str,
    /// What is compared, in words.
    pub measure: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Every comparison; the one that decides is named in `basis`.
    pub comparisons: Vec<Comparison>,
    /// How the verdict follows from the comparisons, or which inputs are absent.
    pub basis: String,
}

/// The rank@p of full finetuning's change for one (method, duration), over its seeds.
#[derive(Debug, Clone)]
pub struct RankPoint {
    /// The finetuned model's method.
    pub method: String,
    /// Tokens trained, when a curve says.
    pub tokens: Option<f64>,
    /// What trained it.
    pub family: Family,
    /// Mean rank@p over layers and modules, with its interval.
    pub rank: Estimate,
}

/// Tokens, family and replicates of one (method, duration).
type Group = (Option<f64>, Family, Vec<Replicate>);

/// The svd summaries of finetuned models (not adapters) grouped by (method, duration), each
/// a stratified item set (strata = modules, items = layers' rank@p).
pub fn svd_points(
    svds: &[(String, Value, &InputArtifact)],
    tokens_of: &BTreeMap<&str, f64>,
    summaries: &BTreeMap<String, Value>,
    grouping: &[String],
    regularizers: &[String],
) -> Vec<RankPoint> {
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for (_, s, _) in svds {
        if s["finetuned"]["kind"] != "model" {
            continue;
        }
        let ft = s["finetuned"]["stage"].as_str().unwrap_or("?");
        let Some(by) = s["rank_delta_by_layer"].as_object() else {
            continue;
        };
        let strata: Vec<(String, Vec<f64>)> = by
            .iter()
            .map(|(m, v)| {
                let v = v.as_array().map_or(Vec::new(), |a| {
                    a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
                });
                (m.clone(), v)
            })
            .collect();
        let items = Items { strata };
        if !items.valid() {
            continue;
        }
        let tokens = tokens_of.get(ft).copied();
        let method = method_of(ft, grouping);
        let family = family_of(ft, &method, true, summaries, regularizers);
        let key = (method, tokens.map_or(String::new(), |t| format!("{t:>20}")));
        groups
            .entry(key)
            .or_insert((tokens, family, Vec::new()))
            .2
            .push(Replicate {
                value: items.statistic(),
                items: Some(items),
            });
    }
    groups
        .into_iter()
        .map(|((method, t), (tokens, family, reps))| RankPoint {
            rank: stats::estimate(
                &reps,
                &format!("rank/{method}@{t}"),
                stats::REPLICATES,
                stats::SEED,
            ),
            method,
            tokens,
            family,
        })
        .collect()
}

/// The estimate negated when lower is better, so that "more" is always the larger number.
fn oriented(e: &Estimate, higher: bool) -> Estimate {
    if higher {
        return e.clone();
    }
    Estimate {
        mean: -e.mean,
        lo: -e.hi,
        hi: -e.lo,
        draws: e.draws.iter().map(|x| -x).collect(),
        ..e.clone()
    }
}

fn triple(e: &Estimate) -> (f64, f64, f64) {
    (e.mean, e.lo, e.hi)
}

fn same_tokens(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
        _ => false,
    }
}

/// The plain full-finetuning method with the most points (ties: by name).
fn full_method(points: &[Point]) -> Option<&str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in points.iter().filter(|p| p.family == Family::Full) {
        *counts.entry(p.method.as_str()).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|c| c.1 == best).map(|c| c.0)
}

/// LoRA methods, largest rank first (unknown ranks last), then by name.
fn lora_methods(points: &[Point]) -> Vec<(&str, Option<f64>)> {
    let mut v: Vec<(&str, Option<f64>)> = Vec::new();
    for p in points {
        if let Family::Lora(r) = p.family
            && !v.iter().any(|x| x.0 == p.method)
        {
            v.push((p.method.as_str(), r));
        }
    }
    v.sort_by(|a, b| {
        b.1.unwrap_or(f64::NEG_INFINITY)
            .total_cmp(&a.1.unwrap_or(f64::NEG_INFINITY))
            .then(a.0.cmp(b.0))
    });
    v
}

/// The longest-trained pair (a of method `a`, b of method `b`) at equal tokens.
fn pair<'p>(points: &'p [Point], a: &str, b: &str) -> Option<(&'p Point, &'p Point)> {
    let mut best: Option<(&Point, &Point)> = None;
    for pa in points.iter().filter(|p| p.method == a) {
        for pb in points.iter().filter(|p| p.method == b) {
            if same_tokens(pa.tokens, pb.tokens) && best.is_none_or(|(x, _)| pa.tokens > x.tokens) {
                best = Some((pa, pb));
            }
        }
    }
    best
}

fn compare(a: &Point, b: &Point, get: fn(&Point) -> &Estimate, higher: bool) -> Comparison {
    Comparison {
        a: a.method.clone(),
        b: b.method.clone(),
        tokens: a.tokens,
        a_est: triple(get(a)),
        b_est: triple(get(b)),
        diff: stats::difference(&oriented(get(a), higher), &oriented(get(b), higher)),
    }
}

fn absent(id: usize, measure: String, why: String) -> Finding {
    Finding {
        id,
        statement: STATEMENTS[id - 1],
        measure,
        verdict: Verdict::CannotTell,
        comparisons: Vec::new(),
        basis: format!("cannot tell: {why}"),
    }
}

/// Findings 1 and 2: full finetuning against each LoRA method at equal tokens; the largest
/// rank decides.
fn full_vs_lora(
    id: usize,
    points: &[Point],
    measure: String,
    full_first: bool,
    get: fn(&Point) -> &Estimate,
    higher: bool,
) -> Finding {
    let Some(full) = full_method(points) else {
        return absent(
            id,
            measure,
            "no plain full-finetuning runs among the evals".into(),
        );
    };
    let loras = lora_methods(points);
    if loras.is_empty() {
        return absent(id, measure, "no LoRA runs among the evals".into());
    }
    if points
        .iter()
        .filter(|p| p.family != Family::Base)
        .all(|p| !get(p).mean.is_finite())
    {
        return absent(id, measure, "the metric is missing from the evals".into());
    }
    let mut comparisons = Vec::new();
    for (lora, _) in &loras {
        if let Some((f, l)) = pair(points, full, lora) {
            comparisons.push(if full_first {
                compare(f, l, get, higher)
            } else {
                compare(l, f, get, higher)
            });
        }
    }
    let Some(head) = comparisons.first() else {
        return absent(
            id,
            measure,
            format!("no LoRA run has a `{full}` run of the same training tokens"),
        );
    };
    let lora = if full_first { &head.b } else { &head.a };
    Finding {
        id,
        statement: STATEMENTS[id - 1],
        measure,
        verdict: head.diff.verdict,
        basis: format!(
            "{}: the largest-rank LoRA ({lora}) against {full} at {} tokens, the longest duration both have (every rank is a row)",
            head.diff.verdict.as_str(),
            head.tokens.map_or("-".into(), human)
        ),
        comparisons,
    }
}

/// Finding 3: the largest-rank LoRA against every regularized full finetuning, forgetting.
fn regularizers(points: &[Point], forgetting: &str) -> Finding {
    let measure = format!(
        "{forgetting}: LoRA minus each weight-decay/dropout full finetuning at equal tokens (> 0: LoRA forgets less)"
    );
    let regs: Vec<&str> = {
        let mut v: Vec<&str> = points
            .iter()
            .filter(|p| p.family == Family::Regularized)
            .map(|p| p.method.as_str())
            .collect();
        v.dedup();
        v
    };
    if regs.is_empty() {
        return absent(
            3,
            measure,
            "no weight-decay or dropout runs among the evals (param `regularizers`)".into(),
        );
    }
    let Some(&(lora, _)) = lora_methods(points).first() else {
        return absent(3, measure, "no LoRA runs among the evals".into());
    };
    let comparisons: Vec<Comparison> = regs
        .iter()
        .filter_map(|r| pair(points, lora, r))
        .map(|(l, r)| compare(l, r, |p| &p.forgetting, true))
        .collect();
    if comparisons.is_empty() {
        return absent(
            3,
            measure,
            format!("no regularized run has a `{lora}` run of the same training tokens"),
        );
    }
    let verdict = if comparisons
        .iter()
        .any(|c| c.diff.verdict == Verdict::Contradicts)
    {
        Verdict::Contradicts
    } else if comparisons
        .iter()
        .all(|c| c.diff.verdict == Verdict::Supports)
    {
        Verdict::Supports
    } else {
        Verdict::CannotTell
    };
    Finding {
        id: 3,
        statement: STATEMENTS[2],
        measure,
        verdict,
        basis: format!(
            "{}: {lora} (the largest LoRA rank) against every regularized run; supports only if it forgets less than each",
            verdict.as_str()
        ),
        comparisons,
    }
}

/// Finding 4: full finetuning's mean rank@p against the largest LoRA rank.
fn high_rank(points: &[Point], ranks: &[RankPoint]) -> Finding {
    let measure =
        "mean rank@p of full finetuning's weight change minus the largest LoRA rank (> 0: higher rank)"
            .to_string();
    let full: Vec<&RankPoint> = ranks.iter().filter(|r| r.family == Family::Full).collect();
    if full.is_empty() {
        return absent(
            4,
            measure,
            "no svd of a full-finetuning model among the inputs (`svd`)".into(),
        );
    }
    let lora_rank = points
        .iter()
        .filter_map(|p| match p.family {
            Family::Lora(r) => r,
            _ => None,
        })
        .fold(f64::NAN, f64::max);
    if !lora_rank.is_finite() {
        return absent(
            4,
            measure,
            "no LoRA run with a known rank to compare with".into(),
        );
    }
    let constant = Estimate {
        mean: lora_rank,
        lo: lora_rank,
        hi: lora_rank,
        seeds: 1,
        source: Source::Items,
        draws: vec![lora_rank; stats::REPLICATES],
    };
    let mut comparisons: Vec<Comparison> = full
        .iter()
        .map(|r| Comparison {
            a: r.method.clone(),
            b: format!("LoRA r={lora_rank}"),
            tokens: r.tokens,
            a_est: triple(&r.rank),
            b_est: triple(&constant),
            diff: stats::difference(&r.rank, &constant),
        })
        .collect();
    comparisons.sort_by(|a, b| a.a_est.0.total_cmp(&b.a_est.0));
    let head = &comparisons[0];
    Finding {
        id: 4,
        statement: STATEMENTS[3],
        measure,
        verdict: head.diff.verdict,
        basis: format!(
            "{}: the full-finetuning checkpoint of lowest rank ({} at {} tokens: {:.1}, {:.1}x r={lora_rank})",
            head.diff.verdict.as_str(),
            head.a,
            head.tokens.map_or("-".into(), human),
            head.a_est.0,
            head.a_est.0 / lora_rank
        ),
        comparisons,
    }
}

/// The four findings, in the paper's order.
pub fn assess(
    points: &[Point],
    ranks: &[RankPoint],
    learning: &str,
    forgetting: &str,
    learning_higher: bool,
) -> Vec<Finding> {
    vec![
        full_vs_lora(
            1,
            points,
            format!(
                "{learning}: full finetuning minus LoRA at equal tokens (> 0: full learns more{})",
                if learning_higher {
                    ""
                } else {
                    "; a loss, so the difference is LoRA's loss minus full's"
                }
            ),
            true,
            |p| &p.learning,
            learning_higher,
        ),
        full_vs_lora(
            2,
            points,
            format!(
                "{forgetting}: LoRA minus full finetuning at equal tokens (> 0: LoRA forgets less)"
            ),
            false,
            |p| &p.forgetting,
            true,
        ),
        regularizers(points, forgetting),
        high_rank(points, ranks),
    ]
}

fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// `findings.json`.
pub fn to_json(found: &[Finding], replicate_keys: &[String]) -> Value {
    json!({
        "confidence": 0.95,
        "resamples": stats::REPLICATES,
        "replicate_keys": replicate_keys,
        "rule": "supports: the 95% interval of the difference excludes 0 in the paper's direction; contradicts: it excludes 0 the other way; cannot tell: otherwise, or inputs absent",
        "findings": found.iter().map(|f| json!({
            "id": f.id,
            "finding": f.statement,
            "measure": f.measure,
            "verdict": f.verdict.as_str(),
            "basis": f.basis,
            "comparisons": f.comparisons.iter().map(|c| json!({
                "a": c.a,
                "b": c.b,
                "tokens": c.tokens,
                "a_mean": num(c.a_est.0), "a_ci": [num(c.a_est.1), num(c.a_est.2)],
                "b_mean": num(c.b_est.0), "b_ci": [num(c.b_est.1), num(c.b_est.2)],
                "difference": num(c.diff.value),
                "ci": [num(c.diff.lo), num(c.diff.hi)],
                "verdict": c.diff.verdict.as_str(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn ci(lo: f64, hi: f64) -> String {
    if lo.is_finite() && hi.is_finite() {
        format!("[{}, {}]", fmt(lo), fmt(hi))
    } else {
        "no interval".into()
    }
}

fn rows(f: &Finding) -> Vec<String> {
    f.comparisons
        .iter()
        .map(|c| {
            format!(
                "{} ({}) vs {} ({}) at {} tokens: difference {} {} → {}",
                c.a,
                fmt(c.a_est.0),
                c.b,
                fmt(c.b_est.0),
                c.tokens.map_or("-".into(), human),
                fmt(c.diff.value),
                ci(c.diff.lo, c.diff.hi),
                c.diff.verdict.as_str()
            )
        })
        .collect()
}

/// The findings table in Markdown.
pub fn markdown(found: &[Finding]) -> String {
    let mut s = String::from(
        "| # | finding (the paper) | verdict | difference [95% CI] | measure |\n|---|---|---|---|---|\n",
    );
    for f in found {
        let head = f.comparisons.first().map_or("-".into(), |c| {
            format!("{} {}", fmt(c.diff.value), ci(c.diff.lo, c.diff.hi))
        });
        let _ = writeln!(
            s,
            "| {} | {} | **{}** | {} | {} |",
            f.id,
            f.statement,
            f.verdict.as_str(),
            head,
            f.measure
        );
    }
    s.push('\n');
    for f in found {
        let _ = writeln!(s, "- Finding {}: {}", f.id, f.basis);
        for r in rows(f) {
            let _ = writeln!(s, "  - {r}");
        }
    }
    s
}

/// The findings table in HTML.
pub fn html(found: &[Finding]) -> String {
    let mut s = String::from(
        "<table><tr><th>#</th><th>finding (the paper)</th><th>verdict</th><th>measure</th><th>basis and comparisons</th></tr>\n",
    );
    for f in found {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td><b>{}</b></td><td>{}</td><td>{}",
            f.id,
            escape(f.statement),
            f.verdict.as_str(),
            escape(&f.measure),
            escape(&f.basis)
        );
        for r in rows(f) {
            let _ = write!(s, "<br>{}", escape(&r));
        }
        s += "</td></tr>\n";
    }
    s += "</table>\n";
    s
}
