//! The report's tables and pages: the points as text, Markdown and CSV, and the Markdown
//! and HTML reports around the figures, findings and every number.

use std::fmt::Write as _;

use super::figures::Figure;
use super::plots::human;
use super::points::Point;
use super::quote;
use super::stats::Estimate;

/// The points' table, as plain text (`summary.txt`) and as Markdown (the report's).
pub(super) struct Summary {
    pub(super) text: String,
    pub(super) markdown: String,
}

/// A number to three decimals, `-` where it is not finite.
pub(super) fn fmt(v: f64) -> String {
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

/// Every point's method, model, seeds, tokens and its two metrics with their intervals.
pub(super) fn summary_table(points: &[Point], learning: &str, forgetting: &str) -> Summary {
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
pub(super) fn summary_csv(points: &[Point], learning: &str, forgetting: &str) -> String {
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

/// `report.md`: findings, the points' table, how intervals were made, the figures, the
/// selections and every number.
pub(super) fn markdown(
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

/// `report.html`: what `report.md` has, the figures inline as SVG.
#[allow(clippy::too_many_arguments)]
pub(super) fn html(
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
