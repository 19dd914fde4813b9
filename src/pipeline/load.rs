//! Reading a pipeline file and applying `[profile.NAME]` overlays and `--set` overrides.

use std::path::Path;
use std::sync::Arc;

use super::include::{self, Sources, flatten};
use super::value::{Node, Table, Value, parse_arg_value};
use crate::diag::{Diagnostic, Diagnostics, Origin, SourceFile, names_or_none};

/// What the command line changes in a pipeline before it is validated.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--profile NAME`, applied in order.
    pub profiles: Vec<String>,
    /// `--set dotted.key=value`, applied after the profiles, in order.
    pub sets: Vec<String>,
}

/// The pipeline file and its includes as one value tree, overlays applied.
pub struct Document {
    /// The main file.
    pub source: Arc<SourceFile>,
    pub root: Table,
    /// Every file read (the main one first).
    pub sources: Sources,
}

/// Reads the pipeline at `path` and its includes (texts in `given` take the place of the
/// disk's; with `disk = false` nothing else is read), then applies the overrides. Parse errors
/// and bad overrides are all reported together.
pub fn parse(
    path: &Path,
    given: &Sources,
    disk: bool,
    overrides: &Overrides,
) -> Result<Document, Diagnostics> {
    let merged = include::read(path, given, disk)?;
    let source = merged.main;
    let mut root = merged.root;
    let mut diags = Diagnostics::default();

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
                    names_or_none(&available)
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
        Ok(Document {
            source,
            root,
            sources: merged.sources,
        })
    } else {
        Err(diags)
    }
}

/// Sets `root[path] = node`, creating tables on the way. Only `pipeline.*`, `executor.*`,
/// `stage.*` and `template.*` may be overridden: profiles cannot add profiles.
fn set_path(root: &mut Table, path: &[String], node: Node) -> Result<(), Diagnostic> {
    let origin = node.origin.clone();
    if path.len() < 2
        || !matches!(
            path[0].as_str(),
            "pipeline" | "stage" | "template" | "executor"
        )
    {
        return Err(Diagnostic::new(
            &origin,
            format!(
                "cannot override `{}`: paths start with `pipeline.`, `executor.`, `stage.NAME.` or `template.NAME.`",
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
