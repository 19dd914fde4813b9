//! From stage tables to concrete stages: schema checks, the DAG of stage tables (cycles are
//! reported with their path), sweep expansion and fan-out over referenced groups.
//!
//! Fan-out is a natural join: a stage whose single-valued reference names a swept group runs
//! once per member and inherits the member's coordinates; when it references several groups,
//! only members that agree on shared coordinates are combined (`svd` of `full[steps=100]`
//! against `base` gives `svd[steps=100]`, and `eval` of `lora[rank=*]` on `data[size=*]` pairs
//! nothing unless both carry the coordinate).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use flow_stages::{Default as ParamDefault, Kind};
use indexmap::IndexMap;
use petgraph::graph::{DiGraph, NodeIndex};

use super::branch::{self, Branching};
use super::check::{RefExpr, STAGE_KEYS, check_value, check_value_in, is_stage_name, known_keys};
use super::per::{self, Per};
use super::template::Uses;
use super::value::{Node, Table, Value, type_error};
use super::{Binding, ParamOrigin, Source, Stage};
use crate::diag::{Diagnostic, Diagnostics, Origin};
use crate::key::Val;

/// A stage table after schema checks, before expansion.
struct Base {
    name: String,
    origin: Origin,
    kind: &'static Kind,
    /// `per = [...]`: one copy per value of these coordinates among the list references.
    per: Option<Per>,
    fixed: BTreeMap<String, Val>,
    fixed_refs: Vec<RefExpr>,
    sweeps: Vec<Sweep>,
    device: Option<String>,
    param_origins: Arc<[(&'static str, ParamOrigin)]>,
    /// `branch = "cooldown"`: trunk stages are added for the members.
    branching: Option<Branching>,
}

/// One swept param: its values, each with its display text and references.
struct Sweep {
    param: String,
    values: Vec<(Val, String, Vec<RefExpr>)>,
}

impl Base {
    fn all_refs(&self) -> impl Iterator<Item = &RefExpr> {
        self.fixed_refs.iter().chain(
            self.sweeps
                .iter()
                .flat_map(|s| s.values.iter().flat_map(|(_, _, r)| r.iter())),
        )
    }
}

/// Checks, orders and expands the `[stage.*]` tables.
///
/// The tables are consumed, and each base table is dropped once its stages exist: at
/// 100,000 stages the file's value tree, the checked tables and the stages would otherwise
/// all be alive at once.
pub fn expand(
    tables: Table,
    uses: &Uses,
    seed: i64,
    dir: &Path,
    diags: &mut Diagnostics,
) -> Vec<Stage> {
    // Stages whose own table was wrong: references to them are not reported again.
    let mut rejected: HashSet<String> = HashSet::new();
    let bases: Vec<Base> = tables
        .into_iter()
        .filter_map(|(name, (origin, node))| {
            let template = uses.get(&name);
            let base = check_stage(&name, &origin, &node, template, seed, dir, diags);
            if base.is_none() {
                rejected.insert(name);
            }
            base
        })
        .collect();
    let index: HashMap<&str, usize> = bases
        .iter()
        .enumerate()
        .map(|(i, b)| (b.name.as_str(), i))
        .collect();

    // The DAG of stage tables; an edge producer -> consumer per reference.
    let mut graph = DiGraph::<usize, Origin>::new();
    let nodes: Vec<NodeIndex> = (0..bases.len()).map(|i| graph.add_node(i)).collect();
    // A reference to a branched table's trunks (`full-trunk[steps=16]`) is an edge to it.
    let trunk_of: HashMap<String, usize> = bases
        .iter()
        .enumerate()
        .filter(|(_, b)| b.branching.is_some())
        .map(|(i, b)| (branch::trunk_group(&b.name), i))
        .collect();
    for (i, base) in bases.iter().enumerate() {
        for r in base.all_refs() {
            match index.get(r.base()).or_else(|| trunk_of.get(r.base())) {
                Some(&j) => {
                    graph.add_edge(nodes[j], nodes[i], r.origin.clone());
                }
                None if rejected.contains(r.base()) => {}
                None => {
                    diags.push(
                        Diagnostic::new(
                            &r.origin,
                            format!(
                                "`{}` references no stage: there is no [stage.{}]",
                                r.target,
                                r.base()
                            ),
                        )
                        .with_suggestion(r.base(), index.keys().copied()),
                    );
                }
            }
        }
    }
    branch::check_names(
        bases
            .iter()
            .filter_map(|b| b.branching.as_ref().map(|br| (b.name.as_str(), br))),
        |name| index.contains_key(name),
        diags,
    );
    report_cycles(&graph, &bases, diags);
    if !diags.is_empty() {
        return Vec::new();
    }

    let mut stages: Vec<Stage> = Vec::new();
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    let order = topological_order(&graph, &nodes);
    drop(graph);
    let mut bases: Vec<Option<Base>> = bases.into_iter().map(Some).collect();
    for i in order {
        let mut base = bases[i].take().expect("each base is expanded once");
        let name = base.name.clone();
        let branching = base.branching.take();
        let mut members = expand_base(base, &stages, &groups, diags);
        if let Some(b) = branching {
            let (trunks, branches) = branch::add_trunks(&b, &name, members, stages.len());
            let first = stages.len();
            stages.extend(trunks);
            groups.insert(branch::trunk_group(&name), (first..stages.len()).collect());
            members = branches;
        }
        let first = stages.len();
        stages.extend(members);
        groups.insert(name, (first..stages.len()).collect());
    }
    let mut seen: HashMap<&str, &Origin> = HashMap::new();
    for s in &stages {
        if seen.insert(s.name.as_str(), &s.origin).is_some() {
            diags.push(Diagnostic::new(
                &s.origin,
                format!(
                    "the sweep produces stage `{}` twice (a repeated value?)",
                    s.name
                ),
            ));
        }
    }
    stages
}

/// Schema checks of one `[stage.NAME]` table.
fn check_stage(
    name: &str,
    origin: &Origin,
    node: &Node,
    template: Option<&(Arc<str>, std::collections::BTreeSet<String>)>,
    seed: i64,
    dir: &Path,
    diags: &mut Diagnostics,
) -> Option<Base> {
    if !is_stage_name(name) {
        diags.push(Diagnostic::new(
            origin,
            format!("invalid stage name `{name}`: use letters, digits, `_` and `-`, starting with a letter"),
        ));
        return None;
    }
    let Some(table) = node.as_table() else {
        diags.push(type_error(node, "a table", &format!("stage `{name}`")));
        return None;
    };
    let Some((_, kind_node)) = table.get("kind") else {
        diags.push(
            Diagnostic::new(origin, format!("stage `{name}` has no `kind`"))
                .with_help(format!("known kinds: {}", kind_names().join(", "))),
        );
        return None;
    };
    let Some(kind_name) = kind_node.as_str() else {
        diags.push(type_error(kind_node, "a string", "`kind`"));
        return None;
    };
    let Some(kind) = flow_stages::find_kind(kind_name) else {
        let names = kind_names();
        diags.push(
            Diagnostic::new(
                &kind_node.origin,
                format!(
                    "unknown kind `{kind_name}` (known kinds: {})",
                    names.join(", ")
                ),
            )
            .with_suggestion(kind_name, names.iter().copied()),
        );
        return None;
    };

    let before = diags.0.len();
    let per = per::read(table, diags);
    let device = stage_device(table, kind, diags);
    let sweep_names = sweep_list(table, kind, diags);
    let branching = branch::read(table, kind, &sweep_names, diags);
    let mut fixed = BTreeMap::new();
    let mut fixed_refs = Vec::new();
    let mut sweeps = Vec::new();
    // Only params written somewhere: a default is described as such without an entry (at
    // 100,000 stages every byte per stage counts; see BENCHMARKS.md).
    let mut param_origins: Vec<(&'static str, ParamOrigin)> = Vec::new();
    for (key, (key_origin, value)) in table {
        if STAGE_KEYS.contains(&key.as_str()) {
            continue;
        }
        let Some(param) = kind.param(key) else {
            diags.push(
                Diagnostic::new(
                    key_origin,
                    format!(
                        "unknown param `{key}` for kind `{}` (expected one of: {})",
                        kind.name,
                        kind.params
                            .iter()
                            .map(|p| p.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .with_suggestion(key, known_keys(kind)),
            );
            continue;
        };
        param_origins.push((
            param.name,
            ParamOrigin {
                origin: value.origin.clone(),
                template: template
                    .filter(|(_, keys)| keys.contains(key))
                    .map(|(t, _)| t.clone()),
            },
        ));
        if sweep_names.contains(key) {
            let Value::List(items) = &value.value else {
                continue; // reported by sweep_list
            };
            let mut values = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let mut refs = Vec::new();
                if let Some(v) = check_value_in(
                    param.ty,
                    item,
                    &format!("{key}[{i}]"),
                    &mut refs,
                    diags,
                    dir,
                ) {
                    for r in &mut refs {
                        r.path = key.clone();
                    }
                    let v = relabel_inputs(v, key);
                    values.push((v, item.display(), refs));
                }
            }
            sweeps.push(Sweep {
                param: key.clone(),
                values,
            });
        } else if let Some(v) = check_value_in(param.ty, value, key, &mut fixed_refs, diags, dir) {
            fixed.insert(key.clone(), v);
        }
    }
    for param in kind.params {
        if table.contains_key(param.name) {
            continue;
        }
        match &param.default {
            ParamDefault::Required => diags.push(Diagnostic::new(
                origin,
                format!(
                    "stage `{name}` misses the required param `{}` ({})",
                    param.name, param.doc
                ),
            )),
            ParamDefault::Optional => {}
            ParamDefault::PipelineSeed => {
                fixed.insert(param.name.to_string(), Val::Int(seed));
            }
            ParamDefault::Value(text) => {
                let node = super::value::parse_arg_value(text, Origin::Default);
                let v = check_value(param.ty, &node, param.name, &mut Vec::new(), diags);
                fixed.insert(
                    param.name.to_string(),
                    v.expect("kind defaults match their types"),
                );
            }
        }
    }
    // Keep sweeps in the order the `sweep` list gives (it is the order of the name).
    sweeps.sort_by_key(|s| sweep_names.iter().position(|n| *n == s.param));
    (diags.0.len() == before).then(|| Base {
        name: name.to_string(),
        origin: origin.clone(),
        kind,
        per,
        fixed,
        fixed_refs,
        sweeps,
        device,
        branching,
        param_origins: {
            param_origins.sort_unstable_by_key(|(name, _)| *name);
            param_origins.into()
        },
    })
}

/// `device = "..."`: where a stage that uses a device runs (scheduling, not part of its key).
fn stage_device(table: &Table, kind: &Kind, diags: &mut Diagnostics) -> Option<String> {
    let (key_origin, node) = table.get("device")?;
    if !kind.uses_device {
        diags.push(Diagnostic::new(
            key_origin,
            format!("`device`: kind `{}` runs on no device", kind.name),
        ));
        return None;
    }
    let names = flow_stages::gpu::device::NAMES;
    match node.as_str() {
        Some(d) if names.contains(&d) => Some(d.to_string()),
        Some(d) => {
            diags.push(
                Diagnostic::new(
                    &node.origin,
                    format!("unknown device `{d}` (one of {})", names.join(", ")),
                )
                .with_suggestion(d, names.iter().copied()),
            );
            None
        }
        None => {
            diags.push(type_error(node, "a string", "`device`"));
            None
        }
    }
}

/// An element of a swept list was checked as `key[i]`; its inputs belong to `key`.
fn relabel_inputs(v: Val, key: &str) -> Val {
    match v {
        Val::Input(_) => Val::Input(key.to_string()),
        other => other,
    }
}

/// Reads `sweep = [...]`: names of params whose list values are to be expanded.
fn sweep_list(table: &Table, kind: &Kind, diags: &mut Diagnostics) -> Vec<String> {
    let Some((_, node)) = table.get("sweep") else {
        return Vec::new();
    };
    let Value::List(items) = &node.value else {
        diags.push(type_error(node, "a list of param names", "`sweep`"));
        return Vec::new();
    };
    let mut names = Vec::new();
    for item in items {
        let Some(name) = item.as_str() else {
            diags.push(type_error(item, "a param name", "an entry of `sweep`"));
            continue;
        };
        match table.get(name) {
            None if kind.param(name).is_some() => diags.push(Diagnostic::new(
                &item.origin,
                format!("`sweep` names `{name}`, which the stage does not set (give it a list of values)"),
            )),
            None => {
                diags.push(Diagnostic::new(
                    &item.origin,
                    format!("`sweep` names `{name}`, which is not a param of kind `{}`", kind.name),
                ).with_suggestion(name, kind.params.iter().map(|p| p.name)));
            }
            Some((_, value)) => match &value.value {
                Value::List(values) if values.is_empty() => diags.push(Diagnostic::new(
                    &value.origin,
                    format!("sweep over `{name}` has no values"),
                )),
                Value::List(_) => {
                    if names.contains(&name.to_string()) {
                        diags.push(Diagnostic::new(&item.origin, format!("`{name}` is swept twice")));
                    }
                    names.push(name.to_string());
                }
                other => diags.push(Diagnostic::new(
                    &value.origin,
                    format!("sweep over `{name}`, which is {}, not a list of values", other.type_name()),
                )),
            },
        }
    }
    names
}

fn kind_names() -> Vec<&'static str> {
    flow_stages::registry().iter().map(|k| k.name).collect()
}

/// Reports every dependency cycle with its path, at the reference that closes it.
fn report_cycles(graph: &DiGraph<usize, Origin>, bases: &[Base], diags: &mut Diagnostics) {
    for scc in petgraph::algo::tarjan_scc(graph) {
        let cyclic = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
        if !cyclic {
            continue;
        }
        // Walk consumer -> producer inside the component until a node repeats.
        let start = *scc.iter().min_by_key(|n| graph[**n]).expect("non-empty");
        let mut path = vec![start];
        let mut origin = None;
        loop {
            let here = *path.last().expect("non-empty");
            let edge = graph
                .edges_directed(here, petgraph::Direction::Incoming)
                .filter(|e| scc.contains(&petgraph::visit::EdgeRef::source(e)))
                .min_by_key(|e| graph[petgraph::visit::EdgeRef::source(e)])
                .expect("a node of a cycle has a producer in it");
            let next = petgraph::visit::EdgeRef::source(&edge);
            origin.get_or_insert_with(|| edge.weight().clone());
            if let Some(pos) = path.iter().position(|n| *n == next) {
                path.drain(..pos);
                path.push(next);
                break;
            }
            path.push(next);
        }
        let names: Vec<&str> = path
            .iter()
            .map(|n| bases[graph[*n]].name.as_str())
            .collect();
        diags.push(Diagnostic::new(
            &origin.expect("set on the first step"),
            format!(
                "dependency cycle: {} (each uses the next)",
                names.join(" -> ")
            ),
        ));
    }
}

/// Kahn's algorithm, taking the earliest stage in file order among the ready ones, so that
/// independent stages keep the order the user wrote.
fn topological_order(graph: &DiGraph<usize, Origin>, nodes: &[NodeIndex]) -> Vec<usize> {
    let mut missing: Vec<usize> = nodes
        .iter()
        .map(|n| {
            graph
                .neighbors_directed(*n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
        .filter(|i| missing[*i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for consumer in graph.neighbors_directed(nodes[i], petgraph::Direction::Outgoing) {
            let c = graph[consumer];
            missing[c] -= 1;
            if missing[c] == 0 {
                ready.push(Reverse(c));
            }
        }
    }
    order
}

/// One concrete combination while expanding a stage table.
#[derive(Clone)]
pub(super) struct Combo {
    pub(super) coords: Vec<(String, String)>,
    params: BTreeMap<String, Val>,
    pub(super) refs: Vec<RefExpr>,
    /// For each fanned-out reference (index into `refs`), the chosen member.
    chosen: HashMap<usize, usize>,
}

fn expand_base(
    mut base: Base,
    stages: &[Stage],
    groups: &HashMap<String, Vec<usize>>,
    diags: &mut Diagnostics,
) -> Vec<Stage> {
    let mut combos = vec![Combo {
        coords: Vec::new(),
        params: std::mem::take(&mut base.fixed),
        refs: std::mem::take(&mut base.fixed_refs),
        chosen: HashMap::new(),
    }];
    for sweep in &base.sweeps {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                sweep.values.iter().map(move |(v, shown, refs)| {
                    let mut c = c.clone();
                    c.coords.push((sweep.param.clone(), shown.clone()));
                    c.params.insert(sweep.param.clone(), v.clone());
                    c.refs.extend(refs.iter().cloned());
                    c
                })
            })
            .collect();
    }
    if let Some(p) = &base.per {
        let Some(copies) = per::split(p, &base.name, combos, stages, groups, diags) else {
            return Vec::new();
        };
        combos = copies;
    }

    // Resolve every reference to its members; single references to groups fan out.
    let mut out = Vec::new();
    for combo in combos {
        let mut partial = vec![combo];
        let nrefs = partial[0].refs.len();
        for ri in 0..nrefs {
            let r = partial[0].refs[ri].clone();
            let Some(members) = resolve(&r, stages, groups, diags) else {
                return Vec::new();
            };
            if r.in_list || members.len() == 1 {
                continue;
            }
            let before = partial.len();
            partial = partial
                .into_iter()
                .flat_map(|c| {
                    members
                        .iter()
                        .filter(|m| agrees(&c.coords, &stages[**m].coords))
                        .map(|m| {
                            let mut c = c.clone();
                            for kv in &stages[*m].coords {
                                if !c.coords.iter().any(|(k, _)| *k == kv.0) {
                                    c.coords.push(kv.clone());
                                }
                            }
                            c.chosen.insert(ri, *m);
                            c
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            if partial.is_empty() && before > 0 {
                diags.push(Diagnostic::new(
                    &r.origin,
                    format!(
                        "no member of `{}` agrees with the other coordinates of stage `{}`",
                        r.target, base.name
                    ),
                ));
                return Vec::new();
            }
        }
        out.extend(partial);
    }

    let mut expanded = Vec::new();
    for c in out {
        let mut bindings: IndexMap<String, Binding> = IndexMap::new();
        for (ri, r) in c.refs.iter().enumerate() {
            let members = match c.chosen.get(&ri) {
                Some(m) => vec![*m],
                None => resolve(r, stages, groups, diags).unwrap_or_default(),
            };
            let members = per::members(base.per.as_ref(), r.in_list, &c.coords, members, stages);
            let binding = bindings.entry(r.path.clone()).or_insert_with(|| Binding {
                path: r.path.clone(),
                list: r.in_list,
                sources: Vec::new(),
            });
            for m in members {
                let target = &stages[m];
                let output = match &r.output {
                    Some(o) if target.kind.outputs.contains(&o.as_str()) => o.clone(),
                    Some(o) => {
                        diags.push(Diagnostic::new(
                            &r.origin,
                            format!(
                                "stage `{}` (kind `{}`) has no output `{o}` (outputs: {})",
                                target.name,
                                target.kind.name,
                                target.kind.outputs.join(", ")
                            ),
                        ));
                        continue;
                    }
                    None => target.kind.outputs[0].to_string(),
                };
                binding.sources.push(Source { stage: m, output });
            }
        }
        let mut inputs: Vec<Binding> = bindings.into_values().collect();
        inputs.sort_by(|a, b| a.path.cmp(&b.path));
        let name = if c.coords.is_empty() {
            base.name.clone()
        } else {
            let inner: Vec<String> = c.coords.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}[{}]", base.name, inner.join(","))
        };
        expanded.push(Stage {
            name,
            group: base.name.clone(),
            kind: base.kind,
            params: c.params,
            inputs,
            coords: c.coords,
            origin: base.origin.clone(),
            param_origins: base.param_origins.clone(),
            device: base.device.clone(),
        });
    }
    expanded
}

/// The members a reference names: one member by exact name, or all of a group.
pub(super) fn resolve(
    r: &RefExpr,
    stages: &[Stage],
    groups: &HashMap<String, Vec<usize>>,
    diags: &mut Diagnostics,
) -> Option<Vec<usize>> {
    if r.target.contains('[') {
        // Only the group's own members can carry its name: no scan of every stage.
        let group = groups.get(r.base()).map_or(&[][..], Vec::as_slice);
        match group.iter().copied().find(|i| stages[*i].name == r.target) {
            Some(i) => Some(vec![i]),
            None => {
                let members: Vec<&str> = groups
                    .get(r.base())
                    .into_iter()
                    .flatten()
                    .map(|i| stages[*i].name.as_str())
                    .collect();
                diags.push(Diagnostic::new(
                    &r.origin,
                    format!(
                        "no sweep member `{}` (members: {})",
                        r.target,
                        members.join(", ")
                    ),
                ));
                None
            }
        }
    } else {
        // Validated by the DAG pass: every base name exists and was expanded before us.
        groups.get(&r.target).cloned()
    }
}

/// True when two coordinate lists give no key different values.
fn agrees(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.iter()
        .all(|(k, v)| b.iter().all(|(k2, v2)| k != k2 || v == v2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind default that does not match its own type would panic at validation time.
    #[test]
    fn every_kind_default_matches_its_type() {
        for kind in flow_stages::registry() {
            for param in kind.params {
                if let ParamDefault::Value(text) = param.default {
                    let node = crate::pipeline::value::parse_arg_value(text, Origin::Default);
                    let mut diags = Diagnostics::default();
                    let v = check_value(param.ty, &node, param.name, &mut Vec::new(), &mut diags);
                    assert!(
                        v.is_some() && diags.is_empty(),
                        "{}.{}: {diags}",
                        kind.name,
                        param.name
                    );
                }
            }
        }
    }

    #[test]
    fn coordinates_agree_only_when_shared_keys_match() {
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert!(agrees(
            &[kv("rank", "16")],
            &[kv("rank", "16"), kv("lr", "1")]
        ));
        assert!(agrees(&[kv("rank", "16")], &[kv("steps", "100")]));
        assert!(!agrees(&[kv("rank", "16")], &[kv("rank", "64")]));
    }
}
