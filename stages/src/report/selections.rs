//! The report's selection tables: for each `select` stage given as `selections`, its rule
//! and every candidate with its value (and prefer value), the chosen one marked.

use std::fmt::Write as _;

use serde_json::Value;

use super::tables::escape;
use crate::kind::{InputArtifact, StageError};
use crate::select::CHOICE_FILE;

/// One selection as its `choice.json` records it.
pub struct Selection {
    /// The `select` stage's name.
    pub stage: String,
    /// The rule in words: "summary.json:heldout_loss, lowest; ...".
    pub rule: String,
    /// Candidates in order: stage, value, prefer value, eligible, chosen.
    pub rows: Vec<Row>,
}

/// One candidate of a selection.
pub struct Row {
    /// The candidate's stage.
    pub stage: String,
    /// Its metric.
    pub value: f64,
    /// Its prefer value, when the rule has one.
    pub prefer: Option<f64>,
    /// Whether it was close enough to the best to be chosen.
    pub eligible: bool,
    /// Whether it was chosen.
    pub chosen: bool,
}

/// Reads every `selections` artifact's `choice.json`; a file that is not a choice is an error
/// naming the stage.
pub fn read(artifacts: &[InputArtifact]) -> Result<Vec<Selection>, StageError> {
    artifacts.iter().map(read_one).collect()
}

fn read_one(a: &InputArtifact) -> Result<Selection, StageError> {
    let bad = |why: String| {
        StageError::Failed(format!(
            "selections: `{}` is not a `select` stage's choice: {why}",
            a.stage
        ))
    };
    let text = std::fs::read_to_string(a.dir.join(CHOICE_FILE))
        .map_err(|e| bad(format!("{CHOICE_FILE}: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("{CHOICE_FILE}: {e}")))?;
    let chosen = v["chosen"]["stage"]
        .as_str()
        .ok_or_else(|| bad("no chosen stage".into()))?;
    let list = v["candidates"]
        .as_array()
        .ok_or_else(|| bad("no candidate list".into()))?;
    let mut rows = Vec::with_capacity(list.len());
    for c in list {
        let stage = c["stage"]
            .as_str()
            .ok_or_else(|| bad("a candidate without a stage".into()))?;
        rows.push(Row {
            stage: stage.to_string(),
            value: c["value"].as_f64().unwrap_or(f64::NAN),
            prefer: c["prefer_value"].as_f64(),
            eligible: c["eligible"].as_bool().unwrap_or(false),
            chosen: stage == chosen,
        });
    }
    let text_of = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    let mut rule = format!(
        "`{}`, {} is best",
        text_of("metric"),
        if v["goal"] == "max" {
            "highest"
        } else {
            "lowest"
        }
    );
    if let Some(prefer) = v["prefer"].as_str() {
        let within = v["within"].as_f64().unwrap_or(0.0);
        let _ = write!(
            rule,
            "; among the candidates within {within} of the best, the {} `{prefer}` wins",
            if v["prefer_goal"] == "min" {
                "lowest"
            } else {
                "highest"
            }
        );
    }
    Ok(Selection {
        stage: a.stage.clone(),
        rule,
        rows,
    })
}

/// Four decimals: selections compare values that differ in the third.
fn fmt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        "-".into()
    }
}

fn prefer_cell(r: &Row) -> String {
    r.prefer.map_or("-".into(), |p| format!("{p}"))
}

/// The Markdown section ("" without selections).
pub fn markdown(selections: &[Selection]) -> String {
    let mut s = String::new();
    for sel in selections {
        let _ = writeln!(
            s,
            "## Selection `{}`\n\n{}.\n\n| candidate | value | prefer value | eligible | chosen |\n|---|---|---|---|---|",
            sel.stage, sel.rule
        );
        for r in &sel.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                if r.chosen {
                    format!("**{}**", r.stage)
                } else {
                    r.stage.clone()
                },
                fmt(r.value),
                prefer_cell(r),
                if r.eligible { "yes" } else { "no" },
                if r.chosen { "**chosen**" } else { "" }
            );
        }
        s.push('\n');
    }
    s
}

/// The HTML section ("" without selections).
pub fn html(selections: &[Selection]) -> String {
    let mut s = String::new();
    for sel in selections {
        let _ = writeln!(
            s,
            "<h2>Selection {}</h2>\n<p>{}.</p>\n<table><tr><th>candidate</th><th>value</th><th>prefer value</th><th>eligible</th><th>chosen</th></tr>",
            escape(&sel.stage),
            escape(&sel.rule.replace('`', ""))
        );
        for r in &sel.rows {
            let _ = writeln!(
                s,
                "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if r.chosen {
                    " style=\"font-weight:bold\""
                } else {
                    ""
                },
                escape(&r.stage),
                fmt(r.value),
                prefer_cell(r),
                if r.eligible { "yes" } else { "no" },
                if r.chosen { "chosen" } else { "" }
            );
        }
        s += "</table>\n";
    }
    s
}
