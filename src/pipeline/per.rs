//! `per = ["rank"]`: one copy of a stage per distinct value of some sweep coordinates among
//! the members its list references collect, each copy collecting only the members that agree
//! with its values.
//!
//! A `select` whose `candidates = ["lora_lr.curve"]` collects a rank x lr sweep gives, with
//! `per = ["rank"]`, one selection per rank (`pick[rank=4]` chooses among
//! `lora_lr[rank=4,lr=*]`), and a later stage swept over `rank` that references `pick` pairs
//! `lora[rank=4]` with `pick[rank=4]` by the usual agreement of coordinates. Copies come in
//! the order their values are first seen among the members. A member that lacks one of the
//! coordinates agrees with every copy, as in any fan-out.

use std::collections::HashMap;

use super::Stage;
use super::expand::{Combo, resolve};
use super::value::{Table, Value, type_error};
use crate::diag::{Diagnostic, Diagnostics, Origin};

/// A stage table's `per` list: coordinate names, each with where it is written.
pub(super) struct Per {
    names: Vec<(String, Origin)>,
}

/// Reads `per = [...]` of a stage table (None when absent or wrong, which is reported).
pub(super) fn read(table: &Table, diags: &mut Diagnostics) -> Option<Per> {
    let (key_origin, node) = table.get("per")?;
    let Value::List(items) = &node.value else {
        diags.push(type_error(node, "a list of coordinate names", "`per`"));
        return None;
    };
    if items.is_empty() {
        diags.push(Diagnostic::new(
            key_origin,
            "`per` names no coordinate (give e.g. `per = [\"rank\"]`, or leave it out)",
        ));
        return None;
    }
    let mut names: Vec<(String, Origin)> = Vec::new();
    for item in items {
        let Some(name) = item.as_str() else {
            diags.push(type_error(item, "a coordinate name", "an entry of `per`"));
            return None;
        };
        if names.iter().any(|(n, _)| n == name) {
            diags.push(Diagnostic::new(
                &item.origin,
                format!("`per` names `{name}` twice"),
            ));
            return None;
        }
        names.push((name.to_string(), item.origin.clone()));
    }
    Some(Per { names })
}

/// Splits every combination of a stage's own sweeps into one copy per distinct value of the
/// `per` coordinates among the members of its list references. None (with diagnostics) when
/// a name is a coordinate of the stage's own sweep, when the stage has no list reference, or
/// when no member carries a name.
pub(super) fn split(
    per: &Per,
    stage: &str,
    combos: Vec<Combo>,
    stages: &[Stage],
    groups: &HashMap<String, Vec<usize>>,
    diags: &mut Diagnostics,
) -> Option<Vec<Combo>> {
    let mut out = Vec::new();
    for combo in combos {
        if let Some((name, origin)) = per
            .names
            .iter()
            .find(|(n, _)| combo.coords.iter().any(|(k, _)| k == n))
        {
            diags.push(Diagnostic::new(
                origin,
                format!("`per` names `{name}`, which stage `{stage}` sweeps itself: each of its members has one value already"),
            ));
            return None;
        }
        let lists: Vec<_> = combo.refs.iter().filter(|r| r.in_list).collect();
        if lists.is_empty() {
            diags.push(Diagnostic::new(
                &per.names[0].1,
                format!("`per` needs a list reference in stage `{stage}` (such as `candidates = [\"group\"]`) whose members carry the coordinates"),
            ));
            return None;
        }
        // Bad references are reported where the stage's inputs are bound, once.
        let members: Vec<&[(String, String)]> = lists
            .iter()
            .flat_map(|r| {
                resolve(r, stages, groups, &mut Diagnostics::default()).unwrap_or_default()
            })
            .map(|m| stages[m].coords.as_slice())
            .collect();
        for (name, origin) in &per.names {
            if !members.iter().any(|c| c.iter().any(|(k, _)| k == name)) {
                let mut known: Vec<&str> = members
                    .iter()
                    .flat_map(|c| c.iter().map(|(k, _)| k.as_str()))
                    .collect();
                known.sort_unstable();
                known.dedup();
                let targets: Vec<&str> = lists.iter().map(|r| r.target.as_str()).collect();
                diags.push(
                    Diagnostic::new(
                        origin,
                        format!(
                            "`per` names `{name}`, a coordinate no member of {} carries (their coordinates: {})",
                            targets.join(", "),
                            crate::diag::names_or_none(&known)
                        ),
                    )
                    .with_suggestion(name, known.iter().copied()),
                );
                return None;
            }
        }
        let mut seen: Vec<Vec<(String, String)>> = Vec::new();
        for coords in &members {
            let values: Option<Vec<(String, String)>> = per
                .names
                .iter()
                .map(|(n, _)| coords.iter().find(|(k, _)| k == n).cloned())
                .collect();
            if let Some(values) = values
                && !seen.contains(&values)
            {
                seen.push(values);
            }
        }
        if seen.is_empty() {
            let names: Vec<&str> = per.names.iter().map(|(n, _)| n.as_str()).collect();
            diags.push(Diagnostic::new(
                &per.names[0].1,
                format!(
                    "`per`: no member of the list references of stage `{stage}` carries all of {}",
                    names.join(", ")
                ),
            ));
            return None;
        }
        for values in seen {
            let mut c = combo.clone();
            c.coords.extend(values);
            out.push(c);
        }
    }
    Some(out)
}

/// The members a copy's list reference collects: those that agree with the copy on the
/// `per` coordinates (all of them for a stage without `per`, or a single-valued reference).
pub(super) fn members(
    per: Option<&Per>,
    in_list: bool,
    copy: &[(String, String)],
    members: Vec<usize>,
    stages: &[Stage],
) -> Vec<usize> {
    let Some(per) = per.filter(|_| in_list) else {
        return members;
    };
    let fixed: Vec<&(String, String)> = copy
        .iter()
        .filter(|(k, _)| per.names.iter().any(|(n, _)| n == k))
        .collect();
    members
        .into_iter()
        .filter(|m| {
            fixed
                .iter()
                .all(|(k, v)| stages[*m].coords.iter().all(|(k2, v2)| k2 != k || v2 == v))
        })
        .collect()
}
