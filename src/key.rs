//! Cache keys: blake3 over a versioned canonical encoding of (kind, kind version, resolved
//! params, input artifact digests, salt).
//!
//! The encoding is hand-written rather than serde_json because the key must not depend on
//! how a value was typed: `1e-4` and `0.0001` are one float, an integer given for a float
//! param is that float, table keys are sorted, and strings and numbers can never collide.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::pipeline::value::format_float;

/// Bumped when the encoding below changes; every key changes with it.
pub const KEY_FORMAT: &str = "flow-key-v1";

/// A param value after validation: typed by the kind's schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Val>),
    Table(BTreeMap<String, Val>),
    /// Where a stage reference stood; its artifacts enter the key as digests (renaming a
    /// stage must not invalidate its dependents).
    Input(String),
    /// Files outside the cache (globs expanded) and URLs; local contents enter the key
    /// through [`KeyParts`] (see `exec::plan::key_parts`), not through this text.
    Files(Vec<FileRef>),
}

/// One external file or URL named by a [`Val::Files`] param.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRef {
    /// As matched, relative to the pipeline file (or the URL): what the key records, so
    /// moving a checkout does not change keys.
    pub shown: String,
    /// The absolute local path; None for URLs.
    pub local: Option<std::path::PathBuf>,
    /// For a URL a remote glob matched: the version the store listed (e-tag or content
    /// hash, and size), which enters the key. None for URLs named one by one.
    pub version: Option<String>,
}

impl Val {
    /// Canonical text (also what `flow explain` shows).
    pub fn canonical(&self) -> String {
        let mut s = String::new();
        self.write_canonical(&mut s);
        s
    }

    fn write_canonical(&self, out: &mut String) {
        match self {
            Val::Str(s) => out.push_str(&serde_json::to_string(s).expect("strings serialize")),
            Val::Int(i) => {
                let _ = write!(out, "i:{i}");
            }
            Val::Float(f) => {
                let f = if *f == 0.0 { 0.0 } else { *f };
                let _ = write!(out, "f:{}", format_float(f));
            }
            Val::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Val::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_canonical(out);
                }
                out.push(']');
            }
            Val::Table(t) => {
                out.push('{');
                for (i, (k, v)) in t.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("strings serialize"));
                    out.push(':');
                    v.write_canonical(out);
                }
                out.push('}');
            }
            Val::Input(path) => {
                let _ = write!(out, "@input({path})");
            }
            Val::Files(files) => {
                let shown: Vec<String> = files
                    .iter()
                    .map(|f| serde_json::to_string(&f.shown).expect("strings serialize"))
                    .collect();
                let _ = write!(out, "@files[{}]", shown.join(","));
            }
        }
    }

    /// The params a stage receives: JSON, references removed (they arrive as directories).
    /// Returns None for a value that is only references.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match self {
            Val::Str(s) => J::String(s.clone()),
            Val::Int(i) => J::from(*i),
            Val::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Val::Bool(b) => J::Bool(*b),
            Val::List(items) => {
                let v: Vec<J> = items.iter().filter_map(Val::to_json).collect();
                if v.is_empty() && !items.is_empty() {
                    return None;
                }
                J::Array(v)
            }
            Val::Table(t) => {
                let m: serde_json::Map<String, J> = t
                    .iter()
                    .filter_map(|(k, v)| v.to_json().map(|j| (k.clone(), j)))
                    .collect();
                if m.is_empty() && !t.is_empty() {
                    return None;
                }
                J::Object(m)
            }
            Val::Input(_) => return None,
            Val::Files(files) => J::Array(
                files
                    .iter()
                    .map(|f| match &f.local {
                        Some(p) => J::String(p.display().to_string()),
                        None => J::String(f.shown.clone()),
                    })
                    .collect(),
            ),
        })
    }
}

/// Everything that determines a stage's outputs, kept in the run record for `flow explain`
/// and for `flow plan`'s "what changed" answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyParts {
    pub format: String,
    pub kind: String,
    pub kind_version: u32,
    /// Param name → canonical text, sorted by name.
    pub params: BTreeMap<String, String>,
    /// Param path → digests of its input artifacts, in the pipeline's order.
    pub inputs: BTreeMap<String, Vec<String>>,
    pub salt: String,
}

impl KeyParts {
    /// The key: blake3 of the parts' canonical encoding, in hex.
    pub fn key(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "{}", self.format);
        let _ = writeln!(
            text,
            "kind={}",
            serde_json::to_string(&self.kind).expect("str")
        );
        let _ = writeln!(text, "version={}", self.kind_version);
        for (name, value) in &self.params {
            let _ = writeln!(
                text,
                "param {}={value}",
                serde_json::to_string(name).expect("str")
            );
        }
        for (path, digests) in &self.inputs {
            let _ = writeln!(
                text,
                "input {}={}",
                serde_json::to_string(path).expect("str"),
                digests.join(",")
            );
        }
        let _ = writeln!(
            text,
            "salt={}",
            serde_json::to_string(&self.salt).expect("str")
        );
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }

    /// What differs between an earlier key's parts and these, for `flow plan`.
    pub fn differences(&self, old: &KeyParts) -> Vec<String> {
        let mut out = Vec::new();
        if self.format != old.format {
            out.push(format!("key format {} -> {}", old.format, self.format));
        }
        if self.kind != old.kind || self.kind_version != old.kind_version {
            out.push(format!(
                "kind {} v{} -> {} v{}",
                old.kind, old.kind_version, self.kind, self.kind_version
            ));
        }
        diff_maps("param", &old.params, &self.params, &mut out, |v| v.clone());
        diff_maps("input", &old.inputs, &self.inputs, &mut out, |d| {
            d.iter()
                .map(|x| match x.split_once('@') {
                    Some((digest, stage)) => format!("{}@{stage}", short(digest)),
                    None => short(x).to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        });
        if self.salt != old.salt {
            out.push(format!("salt {:?} -> {:?}", old.salt, self.salt));
        }
        out
    }
}

fn diff_maps<V: PartialEq>(
    what: &str,
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    out: &mut Vec<String>,
    show: impl Fn(&V) -> String,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{what} {k} added ({})", show(v))),
            Some(o) if o != v => out.push(format!("{what} {k}: {} -> {}", show(o), show(v))),
            _ => {}
        }
    }
    for (k, v) in old {
        if !new.contains_key(k) {
            out.push(format!("{what} {k} removed (was {})", show(v)));
        }
    }
}

/// The first 12 hex digits: enough to tell keys and digests apart in messages.
pub fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(lr: Val) -> KeyParts {
        KeyParts {
            format: KEY_FORMAT.into(),
            kind: "command".into(),
            kind_version: 1,
            params: [("lr".to_string(), lr.canonical())].into(),
            inputs: BTreeMap::new(),
            salt: String::new(),
        }
    }

    #[test]
    fn spellings_of_one_float_give_one_key() {
        let a: f64 = "1e-4".parse().unwrap();
        let b: f64 = "0.0001".parse().unwrap();
        assert_eq!(parts(Val::Float(a)).key(), parts(Val::Float(b)).key());
        assert_ne!(parts(Val::Float(a)).key(), parts(Val::Float(2e-4)).key());
    }

    #[test]
    fn strings_never_collide_with_numbers() {
        assert_ne!(
            parts(Val::Str("i:1".into())).key(),
            parts(Val::Int(1)).key()
        );
        assert_ne!(parts(Val::Int(1)).key(), parts(Val::Float(1.0)).key());
    }

    #[test]
    fn negative_zero_is_zero() {
        assert_eq!(parts(Val::Float(-0.0)).key(), parts(Val::Float(0.0)).key());
    }

    #[test]
    fn differences_name_the_changed_param() {
        let d = parts(Val::Float(3e-4)).differences(&parts(Val::Float(1e-4)));
        assert_eq!(d, vec!["param lr: f:1e-4 -> f:3e-4".to_string()]);
    }
}
