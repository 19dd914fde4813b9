//! `[template.NAME]` tables and `use = "NAME"` in a stage: shared params said once.
//!
//! A stage that uses a template is the template's table with the stage's own keys on top
//! (the stage wins). Resolution runs after profiles and `--set`, so a profile that sets
//! `template.eval.batch` changes every stage using `eval` that does not set `batch` itself,
//! and `stage.eval_base.batch` changes one. Values keep their origins: an error in a
//! template's param points at the template's line, and `flow show`/`explain` say which
//! params came from which template. Templates do not nest (one level is what the shipped
//! studies need, and a chain would make "where did this value come from" a search).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::value::{Table, Value, type_error};
use crate::diag::{Diagnostic, Diagnostics, names_or_none};

/// For each stage table that uses a template: the template's name and the params it gave.
pub type Uses = HashMap<String, (Arc<str>, BTreeSet<String>)>;

/// Removes `template` from the document and applies it to the stages that `use` one.
pub fn apply(root: &mut Table, diags: &mut Diagnostics) -> Uses {
    let templates = match root.shift_remove("template") {
        Some((_, node)) => match node.value {
            Value::Table(t) => t,
            _ => {
                diags.push(type_error(&node, "a table of templates", "`template`"));
                Table::new()
            }
        },
        None => Table::new(),
    };
    for (name, (_, node)) in &templates {
        match node.as_table() {
            None => diags.push(type_error(node, "a table", &format!("template `{name}`"))),
            Some(t) => {
                if let Some((origin, _)) = t.get("use") {
                    diags.push(Diagnostic::new(
                        origin,
                        format!("template `{name}` uses another template: templates do not nest"),
                    ));
                }
            }
        }
    }
    let mut uses = Uses::new();
    let Some((_, stages_node)) = root.get_mut("stage") else {
        return uses;
    };
    let Value::Table(stages) = &mut stages_node.value else {
        return uses; // reported with the stages
    };
    for (stage, (_, node)) in stages.iter_mut() {
        let Value::Table(table) = &mut node.value else {
            continue;
        };
        let Some((_, used)) = table.shift_remove("use") else {
            continue;
        };
        let Some(tname) = used.as_str() else {
            diags.push(type_error(&used, "a template name", "`use`"));
            continue;
        };
        let Some((_, tnode)) = templates.get(tname) else {
            let known: Vec<&str> = templates.keys().map(String::as_str).collect();
            diags.push(
                Diagnostic::new(
                    &used.origin,
                    format!(
                        "stage `{stage}` uses no template: there is no [template.{tname}] (templates: {})",
                        names_or_none(&known)
                    ),
                )
                .with_suggestion(tname, known.iter().copied()),
            );
            continue;
        };
        let Some(template) = tnode.as_table() else {
            continue; // reported above
        };
        let mut merged = template.clone();
        merged.shift_remove("use");
        let mut given: BTreeSet<String> = merged.keys().cloned().collect();
        for (key, entry) in table.drain(..) {
            given.remove(&key);
            merged.insert(key, entry);
        }
        *table = merged;
        uses.insert(stage.clone(), (Arc::from(tname), given));
    }
    uses
}
