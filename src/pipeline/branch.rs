//! `branch = "cooldown"`: a training stage over one or more durations trains one trunk and a
//! cooldown branch per duration, as the paper did (each method trained once to the longest
//! duration; each shorter one re-ran only its last 20% from the checkpoint where that
//! cooldown starts).
//!
//! The sweep members keep their names, params and dependents; each gains a `resume` input
//! from a trunk stage `NAME-trunk[...]` (kind `train-full-trunk` or `train-lora-trunk`) that
//! trains up to its cooldown start. The trunks of one chain (the members that differ only
//! in duration) continue each other, shortest first, so every trunk is keyed by its
//! predecessor's checkpoint digest: a longer duration added later adds one trunk that
//! starts from the cached ones, and each branch is keyed by the digest of the checkpoint it
//! starts from. Why the branch ends in the from-scratch run's bits is in
//! `flow_stages::train::branch`.

use std::sync::Arc;

use flow_stages::Kind;
use flow_stages::train::branch::DURATION_PARAMS;
use indexmap::IndexMap;

use super::value::{Table, Value, type_error};
use super::{Binding, ParamOrigin, Source, Stage};
use crate::diag::{Diagnostic, Diagnostics, Origin};
use crate::key::Val;

/// The stage-table key.
pub const KEY: &str = "branch";

/// A checked `branch = "cooldown"`.
pub struct Branching {
    /// The kind the trunk stages have.
    trunk: &'static Kind,
    /// The swept duration param (`tokens`, `steps` or `epochs`).
    duration: String,
    /// Where `branch` is written, for errors about the generated stages.
    origin: Origin,
}

/// The name of the trunk group of a branched stage table.
pub fn trunk_group(name: &str) -> String {
    format!("{name}-trunk")
}

/// Reads and checks `branch` of a stage table: the kind must have a trunk, one duration
/// param must be swept, and the schedule must give every duration the same steps before
/// its cooldown (the trapezoid, warmup in steps).
pub fn read(
    table: &Table,
    kind: &Kind,
    sweep_names: &[String],
    diags: &mut Diagnostics,
) -> Option<Branching> {
    let (key_origin, node) = table.get(KEY)?;
    match node.as_str() {
        Some("cooldown") => {}
        Some(other) => {
            diags.push(Diagnostic::new(
                &node.origin,
                format!("`branch`: unknown protocol `{other}` (the one there is: \"cooldown\")"),
            ));
            return None;
        }
        None => {
            diags.push(type_error(node, "the string \"cooldown\"", "`branch`"));
            return None;
        }
    }
    let Some(trunk) = flow_stages::train::stage::trunk_kind(kind) else {
        diags.push(Diagnostic::new(
            key_origin,
            format!(
                "`branch`: kind `{}` has no cooldown branches (train-full and train-lora do)",
                kind.name
            ),
        ));
        return None;
    };
    // The duration the branches end at: swept (one branch per value) or fixed (one trunk
    // and branch now; a duration added later reuses the trunk).
    let set: Vec<&str> = DURATION_PARAMS
        .into_iter()
        .filter(|n| table.contains_key(*n))
        .collect();
    let duration = match set.as_slice() {
        [d] => *d,
        _ => {
            diags.push(Diagnostic::new(
                key_origin,
                format!(
                    "`branch = \"cooldown\"` needs one duration ({}), swept or not: where the branches end",
                    DURATION_PARAMS.join(", ")
                ),
            ));
            return None;
        }
    };
    let before = diags.0.len();
    if let Some((o, _)) = table.get("resume") {
        diags.push(Diagnostic::new(
            o,
            "`resume` is what `branch = \"cooldown\"` sets: give one of them",
        ));
    }
    let check = |diags: &mut Diagnostics, at: &Origin, schedule: &str, warmup: f64| {
        if let Err(e) = flow_stages::train::branch::check_schedule(schedule, warmup) {
            diags.push(Diagnostic::new(at, format!("`branch = \"cooldown\"`: {e}")));
        }
    };
    match table.get("schedule") {
        Some((_, n)) if sweep_names.iter().any(|s| s == "schedule") => diags.push(Diagnostic::new(
            &n.origin,
            "`branch = \"cooldown\"`: the schedule cannot be swept",
        )),
        Some((_, n)) => {
            if let Some(s) = n.as_str() {
                check(diags, &n.origin, s, 0.0);
            }
        }
        None => check(diags, key_origin, &default_of(kind, "schedule"), 0.0),
    }
    match table.get("warmup") {
        Some((_, n)) if sweep_names.iter().any(|s| s == "warmup") => diags.push(Diagnostic::new(
            &n.origin,
            "`branch = \"cooldown\"`: the warmup cannot be swept",
        )),
        Some((_, n)) => match n.value {
            Value::Int(i) => check(diags, &n.origin, "trapezoid", i as f64),
            Value::Float(f) => check(diags, &n.origin, "trapezoid", f),
            _ => {} // a type error, reported by the params check
        },
        None => {
            let w = default_of(kind, "warmup").parse().unwrap_or(0.0);
            check(diags, key_origin, "trapezoid", w);
        }
    }
    (diags.0.len() == before).then(|| Branching {
        trunk,
        duration: duration.to_string(),
        origin: key_origin.clone(),
    })
}

/// The kind's default of a param, as its TOML text without quotes.
fn default_of(kind: &Kind, param: &str) -> String {
    match kind.param(param).map(|p| &p.default) {
        Some(flow_stages::Default::Value(text)) => text.trim_matches('"').to_string(),
        _ => String::new(),
    }
}

/// Reports a stage table that has the name a branched table's trunks take.
pub fn check_names<'a>(
    branched: impl Iterator<Item = (&'a str, &'a Branching)>,
    exists: impl Fn(&str) -> bool,
    diags: &mut Diagnostics,
) {
    for (name, b) in branched {
        let trunk = trunk_group(name);
        if exists(&trunk) {
            diags.push(Diagnostic::new(
                &b.origin,
                format!(
                    "`branch = \"cooldown\"` names its trunk stages `{trunk}`, and [stage.{trunk}] exists: rename it"
                ),
            ));
        }
    }
}

/// Adds the trunks of a branched table's members. `first` is the index the first trunk
/// takes in the pipeline's stages; the trunks come first (in chain order, each after the
/// one it continues), then the members, each reading its trunk's checkpoint.
pub fn add_trunks(
    branching: &Branching,
    group: &str,
    mut members: Vec<Stage>,
    first: usize,
) -> (Vec<Stage>, Vec<Stage>) {
    // Chains: members that agree on every coordinate but the duration, shortest first.
    let mut chains: IndexMap<Vec<(String, String)>, Vec<usize>> = IndexMap::new();
    for (i, m) in members.iter().enumerate() {
        let others: Vec<(String, String)> = m
            .coords
            .iter()
            .filter(|(k, _)| *k != branching.duration)
            .cloned()
            .collect();
        chains.entry(others).or_default().push(i);
    }
    let duration = |m: &Stage| match m.params.get(&branching.duration) {
        Some(Val::Int(i)) => *i as f64,
        Some(Val::Float(f)) => *f,
        _ => f64::NAN,
    };
    let trunk_group = trunk_group(group);
    // `flow explain` says `resume` comes from the `branch` line (the members share one list).
    let origins: Option<Arc<[(&'static str, ParamOrigin)]>> = members.first().map(|m| {
        let mut v = m.param_origins.to_vec();
        v.push((
            "resume",
            ParamOrigin {
                origin: branching.origin.clone(),
                template: None,
            },
        ));
        v.sort_unstable_by_key(|(name, _)| *name);
        v.into()
    });
    let mut trunks: Vec<Stage> = Vec::with_capacity(members.len());
    for (_, mut chain) in chains {
        chain.sort_by(|a, b| duration(&members[*a]).total_cmp(&duration(&members[*b])));
        let mut previous: Option<usize> = None;
        for i in chain {
            let m = &mut members[i];
            let mut trunk = Stage {
                name: format!("{trunk_group}{}", &m.name[group.len()..]),
                group: trunk_group.clone(),
                kind: branching.trunk,
                params: m.params.clone(),
                inputs: m.inputs.clone(),
                coords: m.coords.clone(),
                origin: m.origin.clone(),
                param_origins: origins
                    .clone()
                    .unwrap_or_else(|| Arc::clone(&m.param_origins)),
                device: m.device.clone(),
            };
            if let Some(p) = previous {
                resume_from(&mut trunk, p);
            }
            let index = first + trunks.len();
            trunks.push(trunk);
            resume_from(m, index);
            if let Some(o) = &origins {
                m.param_origins = Arc::clone(o);
            }
            previous = Some(index);
        }
    }
    (trunks, members)
}

/// Makes `stage` start from the checkpoint of the trunk at `trunk` (a pipeline index).
fn resume_from(stage: &mut Stage, trunk: usize) {
    stage
        .params
        .insert("resume".to_string(), Val::Input("resume".to_string()));
    stage.inputs.push(Binding {
        path: "resume".to_string(),
        list: false,
        sources: vec![Source {
            stage: trunk,
            output: "checkpoint".to_string(),
        }],
    });
    stage.inputs.sort_by(|a, b| a.path.cmp(&b.path));
}
