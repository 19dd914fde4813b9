//! Checks each stage table against its kind's params schema and turns values into typed
//! [`Val`]s, collecting stage references for the DAG.

use std::collections::BTreeMap;
use std::path::Path;

use flow_stages::{Kind, ParamType};

use super::value::{Node, Value, type_error};
use crate::diag::{Diagnostic, Diagnostics, Origin};
use crate::key::{FileRef, Val};

/// A stage reference as written: `"stage"`, `"stage.output"`, `"lora[rank=64]"`, ...
#[derive(Debug, Clone)]
pub struct RefExpr {
    /// The param path it stands at (`model`, `inputs.text`).
    pub path: String,
    /// The stage, member or group name.
    pub target: String,
    pub output: Option<String>,
    /// True when it stands in a list: a group is collected, never fanned out.
    pub in_list: bool,
    pub origin: Origin,
}

impl RefExpr {
    /// The name of the base stage (before any `[...]`), which is the edge in the stage DAG.
    pub fn base(&self) -> &str {
        self.target.split('[').next().unwrap_or(&self.target)
    }
}

/// Checks one value against a param type. References are recorded in `refs` and stand in
/// the value as [`Val::Input`] placeholders.
pub fn check_value(
    ty: ParamType,
    node: &Node,
    what: &str,
    refs: &mut Vec<RefExpr>,
    diags: &mut Diagnostics,
) -> Option<Val> {
    check_value_in(ty, node, what, refs, diags, Path::new("."))
}

/// [`check_value`] with the pipeline file's directory, against which paths resolve.
pub fn check_value_in(
    ty: ParamType,
    node: &Node,
    what: &str,
    refs: &mut Vec<RefExpr>,
    diags: &mut Diagnostics,
    dir: &Path,
) -> Option<Val> {
    let bad = |diags: &mut Diagnostics| {
        diags.push(type_error(node, &ty.describe(), what));
        None
    };
    match (ty, &node.value) {
        (ParamType::Str, Value::Str(s)) => Some(Val::Str(s.clone())),
        (ParamType::NonEmptyStr, Value::Str(s)) if s.trim().is_empty() => {
            diags.push(Diagnostic::new(
                &node.origin,
                format!("{what} must be a non-empty string, found a blank one"),
            ));
            None
        }
        (ParamType::NonEmptyStr, Value::Str(s)) => Some(Val::Str(s.clone())),
        (ParamType::Int, Value::Int(i)) => Some(Val::Int(*i)),
        (ParamType::Float, Value::Int(i)) => Some(Val::Float(*i as f64)),
        // TOML has `inf` and `nan`; no param means them (a timeout of inf, a NaN
        // temperature), and they panic or poison whatever reads them.
        (ParamType::Float, Value::Float(f)) if !f.is_finite() => {
            diags.push(Diagnostic::new(
                &node.origin,
                format!("{what} must be a finite number, found {f}"),
            ));
            None
        }
        (ParamType::Float, Value::Float(f)) => Some(Val::Float(*f)),
        (ParamType::Bool, Value::Bool(b)) => Some(Val::Bool(*b)),
        (ParamType::Choice(options), Value::Str(s)) => {
            if options.contains(&s.as_str()) {
                Some(Val::Str(s.clone()))
            } else {
                diags.push(
                    Diagnostic::new(
                        &node.origin,
                        format!("{what} must be one of {}, found `{s}`", options.join(", ")),
                    )
                    .with_suggestion(s, options.iter().copied()),
                );
                None
            }
        }
        (ParamType::List(inner), Value::List(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(check_value_in(
                    *inner,
                    item,
                    &format!("{what}[{i}]"),
                    refs,
                    diags,
                    dir,
                )?);
            }
            Some(Val::List(out))
        }
        (ParamType::StrMap, Value::Table(t)) => {
            let mut out = BTreeMap::new();
            for (k, (_, v)) in t {
                let item = check_value(ParamType::Str, v, &format!("{what}.{k}"), refs, diags)?;
                out.insert(k.clone(), item);
            }
            Some(Val::Table(out))
        }
        (ParamType::Input, Value::Str(s)) => {
            let r = parse_ref(s, what, false, &node.origin, diags)?;
            refs.push(r);
            Some(Val::Input(what.to_string()))
        }
        (ParamType::Inputs, Value::List(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(s) = item.as_str() else {
                    return bad(diags);
                };
                let _ = i;
                let r = parse_ref(s, what, true, &item.origin, diags)?;
                refs.push(r);
            }
            Some(Val::Input(what.to_string()))
        }
        (ParamType::Files, Value::Str(_) | Value::List(_)) => {
            let items: Vec<&Node> = match &node.value {
                Value::List(items) => items.iter().collect(),
                _ => vec![node],
            };
            let mut files = Vec::new();
            for item in items {
                let Some(pattern) = item.as_str() else {
                    return bad(diags);
                };
                match expand_files(pattern, dir) {
                    Ok(found) => files.extend(found),
                    Err(message) => {
                        diags.push(Diagnostic::new(&item.origin, message));
                        return None;
                    }
                }
            }
            Some(Val::Files(files))
        }
        (ParamType::InputMap, Value::Table(t)) => {
            let mut out = BTreeMap::new();
            for (k, (key_origin, v)) in t {
                if !is_identifier(k) {
                    diags.push(Diagnostic::new(
                        key_origin,
                        format!("input name `{k}` must be letters, digits and _ (it becomes FLOW_IN_{})", k.to_uppercase()),
                    ));
                    continue;
                }
                let path = format!("{what}.{k}");
                let ty = if matches!(v.value, Value::List(_)) {
                    ParamType::Inputs
                } else {
                    ParamType::Input
                };
                out.insert(k.clone(), check_value(ty, v, &path, refs, diags)?);
            }
            Some(Val::Table(out))
        }
        _ => bad(diags),
    }
}

/// URL schemes a Files param accepts.
pub const URL_SCHEMES: &[&str] = &["s3", "http", "https", "hf"];

/// Expands one path, glob or URL of a Files param, sorted; a pattern that matches nothing is
/// an error (a typo must not silently mean "no data").
fn expand_files(pattern: &str, dir: &Path) -> Result<Vec<FileRef>, String> {
    if let Some((scheme, _)) = pattern.split_once("://") {
        if !URL_SCHEMES.contains(&scheme) {
            return Err(format!(
                "unsupported URL scheme `{scheme}://` (supported: {})",
                URL_SCHEMES.join(", ")
            ));
        }
        if super::remote_glob::is_glob(pattern) {
            return super::remote_glob::expand(pattern);
        }
        return Ok(vec![FileRef {
            shown: pattern.to_string(),
            local: None,
            version: None,
        }]);
    }
    let full = dir.join(pattern);
    let paths = glob::glob(&full.to_string_lossy())
        .map_err(|e| format!("invalid glob `{pattern}`: {e}"))?;
    let mut found = Vec::new();
    for p in paths {
        let p = p.map_err(|e| format!("reading `{pattern}`: {e}"))?;
        if p.is_file() {
            let shown = p
                .strip_prefix(dir)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            let local = p.canonicalize().unwrap_or(p);
            found.push(FileRef {
                shown,
                local: Some(local),
                version: None,
            });
        }
    }
    if found.is_empty() {
        return Err(format!(
            "no file matches `{pattern}` (relative to {})",
            dir.display()
        ));
    }
    found.sort_by(|a, b| a.shown.cmp(&b.shown));
    Ok(found)
}

/// Parses `name`, `name.output`, `name[k=v,...]` or `name[k=v].output`.
fn parse_ref(
    text: &str,
    path: &str,
    in_list: bool,
    origin: &Origin,
    diags: &mut Diagnostics,
) -> Option<RefExpr> {
    let (target, output) = match text.rfind(']') {
        Some(close) => match &text[close + 1..] {
            "" => (text, None),
            rest => match rest.strip_prefix('.') {
                Some(out) => (&text[..=close], Some(out)),
                None => ("", None),
            },
        },
        None => match text.split_once('.') {
            Some((t, o)) => (t, Some(o)),
            None => (text, None),
        },
    };
    let base = target.split('[').next().unwrap_or("");
    if !is_stage_name(base) || output.is_some_and(|o| !is_identifier(o)) {
        diags.push(Diagnostic::new(
            origin,
            format!("`{text}` is not a stage reference (expected \"stage\" or \"stage.output\")"),
        ));
        return None;
    }
    Some(RefExpr {
        path: path.to_string(),
        target: target.to_string(),
        output: output.map(str::to_string),
        in_list,
        origin: origin.clone(),
    })
}

/// Stage names: letters, digits, `_` and `-`, starting with a letter or `_`.
pub fn is_stage_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The names a stage table may hold besides its kind's params.
pub const STAGE_KEYS: &[&str] = &["kind", "sweep", "doc", "device", "branch", "per"];

/// Params of a kind plus the generic stage keys, for "did you mean" hints.
pub fn known_keys(kind: &Kind) -> Vec<&'static str> {
    STAGE_KEYS
        .iter()
        .copied()
        .chain(kind.params.iter().map(|p| p.name))
        .collect()
}
