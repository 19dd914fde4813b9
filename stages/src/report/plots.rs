//! The report's figures, from its points, curves and spectra: learning vs forgetting, both
//! against training duration, rank@p by layer, spectra against the Gaussian control, loss
//! curves.

use std::collections::BTreeMap;

use serde_json::Value;

use super::figures::{Figure, Panel, Series};
use super::points::{Curve, Point};
use super::stats::Estimate;
use crate::kind::{InputArtifact, StageError};

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

/// The paper's Figures 3-4: each point's learning against its forgetting, a line per
/// method through its durations, the base model as a reference, 95% intervals as whiskers.
pub(super) fn learning_vs_forgetting(points: &[Point], learning: &str, forgetting: &str) -> Figure {
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

/// Learning and forgetting against tokens trained, a line per method.
pub(super) fn by_duration(points: &[Point], learning: &str, forgetting: &str) -> Figure {
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

/// The paper's Figure 6: rank@p of each module's weight change by layer, a line per
/// finetuned model.
pub(super) fn rank_by_layer(
    svds: &[(String, Value, &InputArtifact)],
    tokens: &BTreeMap<&str, f64>,
) -> Figure {
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

/// A token count for people: `1.2B`, `3.4M`, `56k`.
pub(super) fn human(t: f64) -> String {
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
pub(super) fn spectra(
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

/// Training loss (and held-out loss where measured) against the step, a line per stage.
pub(super) fn loss_curves(curves: &[Curve]) -> Figure {
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
