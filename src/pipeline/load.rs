//! Reading a pipeline file and applying `[profile.NAME]` overlays and `--set` overrides.

use std::path::Path;
use std::sync::Arc;

use toml::de::DeTable;

use super::value::{Node, Table, Value, parse_arg_value, table_from_toml};
use crate::diag::{Diagnostic, Diagnostics, Origin, SourceFile};

/// What the command line changes in a pipeline before it is validated.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--profile NAME`, applied in order.
    pub profiles: Vec<String>,
    /// `--set dotted.key=value`, applied after the profiles, in order.
    pub sets: Vec<String>,
}

/// The pipeline file as a value tree, overlays applied.
pub struct Document {
    pub source: Arc<SourceFile>,
    pub root: Table,
}

const TOP_LEVEL: &[&str] = &["pipeline", "stage", "profile", "executor"];

/// Reads the pipeline file's text.
pub fn read(path: &Path) -> Result<String, Diagnostics> {
    std::fs::read_to_string(path).map_err(|e| {
        let origin = Origin::Arg(Arc::from(path.display().to_string()));
        Diagnostics(vec![Diagnostic::new(
            &origin,
            format!("cannot read the pipeline file: {e}"),
        )])
    })
}

/// Parses the text of the file at `path`, then applies the overrides. Parse errors and bad
/// overrides are all reported together.
pub fn parse(path: &Path, text: String, overrides: &Overrides) -> Result<Document, Diagnostics> {
    let mut diags = Diagnostics::default();
    let source = SourceFile::new(path.to_path_buf(), text);
    let (parsed, errors) = DeTable::parse_recoverable(&source.text);
    for e in &errors {
        let span = e.span().unwrap_or(0..0);
        diags.push(Diagnostic::new(
            &Origin::File(source.clone(), span),
            format!("invalid TOML: {}", e.message()),
        ));
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut root = table_from_toml(&source, parsed.get_ref());
    // The parser's tree is several times the text's size: gone before expansion builds
    // the stages.
    drop(parsed);

    for (key, (origin, _)) in &root {
        if !TOP_LEVEL.contains(&key.as_str()) {
            diags.push(
                Diagnostic::new(
                    origin,
                    format!(
                        "unknown top-level table `{key}` (expected pipeline, stage, executor or profile)"
                    ),
                )
                .with_suggestion(key, TOP_LEVEL.iter().copied()),
            );
        }
    }

    let profiles = root.shift_remove("profile").map(|(_, n)| n);
    for name in &overrides.profiles {
        let arg = Origin::Arg(Arc::from(format!("--profile {name}")));
        let available: Vec<&str> = profiles
            .as_ref()
            .and_then(Node::as_table)
            .map(|t| t.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let Some((_, overlay)) = profiles
            .as_ref()
            .and_then(Node::as_table)
            .and_then(|t| t.get(name))
        else {
            diags.push(Diagnostic::new(
                &arg,
                format!(
                    "no profile `{name}` in the pipeline (profiles: {})",
                    if available.is_empty() {
                        "none".to_string()
                    } else {
                        available.join(", ")
                    }
                ),
            ));
            continue;
        };
        let Some(table) = overlay.as_table() else {
            diags.push(Diagnostic::new(
                &overlay.origin,
                "a profile must be a table",
            ));
            continue;
        };
        let mut leaves = Vec::new();
        flatten(table, &mut Vec::new(), &mut leaves);
        for (path, node) in leaves {
            if let Err(d) = set_path(&mut root, &path, node) {
                diags.push(d);
            }
        }
    }

    for set in &overrides.sets {
        let origin = Origin::Arg(Arc::from(format!("--set {set}")));
        let Some((key, value)) = set.split_once('=') else {
            diags.push(Diagnostic::new(&origin, "expected --set dotted.key=value"));
            continue;
        };
        let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        let node = parse_arg_value(value.trim(), origin);
        if let Err(d) = set_path(&mut root, &path, node) {
            diags.push(d);
        }
    }

    if diags.is_empty() {
        Ok(Document { source, root })
    } else {
        Err(diags)
    }
}

/// Turns a profile table into (dotted path, leaf) pairs. Keys may themselves be dotted
/// strings (`"stage.base.source" = ...`) or nested tables; both mean the same path.
fn flatten(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Node)>) {
    for (key, (_, node)) in table {
        let depth = prefix.len();
        prefix.extend(key.split('.').map(str::to_string));
        match &node.value {
            Value::Table(inner) if !inner.is_empty() => flatten(inner, prefix, out),
            _ => out.push((prefix.clone(), node.clone())),
        }
        prefix.truncate(depth);
    }
}

/// Sets `root[path] = node`, creating tables on the way. Only `pipeline.*`, `executor.*` and
/// `stage.*` may be overridden: profiles cannot add profiles.
fn set_path(root: &mut Table, path: &[String], node: Node) -> Result<(), Diagnostic> {
    let origin = node.origin.clone();
    if path.len() < 2 || !matches!(path[0].as_str(), "pipeline" | "stage" | "executor") {
        return Err(Diagnostic::new(
            &origin,
            format!(
                "cannot override `{}`: paths start with `pipeline.`, `executor.` or `stage.NAME.`",
                path.join(".")
            ),
        ));
    }
    // `stage.NAME = false` removes a stage: a profile can swap a stage for another kind
    // (the paper profile replaces in-DAG pretraining by an imported model).
    if path.len() == 2 && path[0] == "stage" && matches!(node.value, Value::Bool(false)) {
        let removed = match root.get_mut("stage") {
            Some((
                _,
                Node {
                    value: Value::Table(stages),
                    ..
                },
            )) => stages.shift_remove(&path[1]).is_some(),
            _ => false,
        };
        if removed {
            return Ok(());
        }
        return Err(Diagnostic::new(
            &origin,
            format!("cannot remove stage `{}`: there is no such stage", path[1]),
        ));
    }
    let mut table = root;
    for (i, seg) in path[..path.len() - 1].iter().enumerate() {
        let entry = table.entry(seg.clone()).or_insert_with(|| {
            (
                origin.clone(),
                Node::new(Value::Table(Table::new()), origin.clone()),
            )
        });
        table = match &mut entry.1.value {
            Value::Table(t) => t,
            other => {
                return Err(Diagnostic::new(
                    &origin,
                    format!(
                        "cannot override `{}`: `{}` is {}, not a table",
                        path.join("."),
                        path[..=i].join("."),
                        other.type_name()
                    ),
                ));
            }
        };
    }
    let last = path.last().expect("path has at least two segments").clone();
    table.insert(last, (origin, node));
    Ok(())
}
