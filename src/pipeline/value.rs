//! The pipeline document as a tree of values that remember where they came from, so that
//! every later check (types, references, cycles) can point at the offending text.

use std::sync::Arc;

use indexmap::IndexMap;
use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostic, Origin, SourceFile};

/// A TOML value with its origin.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub origin: Origin,
}

/// TOML's value types; tables keep the file's order (stages run and print in that order).
#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Kept as its TOML text: flow has no use for dates beyond hashing them.
    Datetime(String),
    List(Vec<Node>),
    Table(Table),
}

/// A table: key → (origin of the key, value).
pub type Table = IndexMap<String, (Origin, Node)>;

impl Value {
    /// Names the type in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::List(_) => "a list",
            Value::Table(_) => "a table",
        }
    }
}

impl Node {
    pub fn new(value: Value, origin: Origin) -> Self {
        Node { value, origin }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_table(&self) -> Option<&Table> {
        match &self.value {
            Value::Table(t) => Some(t),
            _ => None,
        }
    }

    /// Compact TOML-like text, used in sweep member names (`lora[rank=64]`) and messages.
    pub fn display(&self) -> String {
        match &self.value {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format_float(*f),
            Value::Bool(b) => b.to_string(),
            Value::Datetime(d) => d.clone(),
            Value::List(items) => {
                let inner: Vec<String> = items.iter().map(Node::display).collect();
                format!("[{}]", inner.join(","))
            }
            Value::Table(t) => {
                let inner: Vec<String> = t
                    .iter()
                    .map(|(k, (_, v))| format!("{k}={}", v.display()))
                    .collect();
                format!("{{{}}}", inner.join(","))
            }
        }
    }
}

/// Shortest text that reads back as the same f64 (`0.0001` prints as `1e-4`).
pub fn format_float(f: f64) -> String {
    if f.is_finite() && f == f.trunc() && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        let plain = format!("{f}");
        let sci = format!("{f:e}");
        if sci.len() < plain.len() { sci } else { plain }
    }
}

/// Converts toml's spanned parse tree into [`Node`]s.
pub fn from_toml(src: &Arc<SourceFile>, value: &toml::Spanned<DeValue<'_>>) -> Node {
    let origin = Origin::File(src.clone(), value.span());
    let v = match value.get_ref() {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
            Ok(n) => Value::Int(n),
            // toml only hands out integers it can read; this keeps huge ones as text.
            Err(_) => Value::Str(i.as_str().to_string()),
        },
        DeValue::Float(f) => Value::Float(parse_toml_float(f.as_str())),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::List(items.iter().map(|i| from_toml(src, i)).collect()),
        DeValue::Table(t) => Value::Table(table_from_toml(src, t)),
    };
    Node::new(v, origin)
}

/// Converts a parsed TOML table, keeping key and value origins.
pub fn table_from_toml(src: &Arc<SourceFile>, table: &DeTable<'_>) -> Table {
    table
        .iter()
        .map(|(k, v)| {
            (
                k.get_ref().to_string(),
                (Origin::File(src.clone(), k.span()), from_toml(src, v)),
            )
        })
        .collect()
}

fn parse_toml_float(text: &str) -> f64 {
    let t = text.replace('_', "");
    match t.as_str() {
        "inf" | "+inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        "nan" | "+nan" | "-nan" => f64::NAN,
        _ => t.parse().unwrap_or(f64::NAN),
    }
}

/// Parses a `--set` value as TOML; text that is not a TOML value is taken as a string, so
/// `--set stage.a.run='echo hi'` works without nested quotes.
pub fn parse_arg_value(text: &str, origin: Origin) -> Node {
    let src = SourceFile::new("<arg>".into(), text.to_string());
    match DeValue::parse(&src.text) {
        Ok(v) => relocate(from_toml(&src, &v), &origin),
        Err(_) => Node::new(Value::Str(text.to_string()), origin),
    }
}

/// Gives every node of a tree the same origin (values from the command line).
fn relocate(mut node: Node, origin: &Origin) -> Node {
    node.origin = origin.clone();
    node.value = match node.value {
        Value::List(items) => Value::List(items.into_iter().map(|n| relocate(n, origin)).collect()),
        Value::Table(t) => Value::Table(
            t.into_iter()
                .map(|(k, (_, v))| (k, (origin.clone(), relocate(v, origin))))
                .collect(),
        ),
        other => other,
    };
    node
}

/// Checks that `Diagnostic`-producing code can name a node's type in one place.
pub fn type_error(node: &Node, expected: &str, what: &str) -> Diagnostic {
    Diagnostic::new(
        &node.origin,
        format!(
            "{what} must be {expected}, found {}",
            node.value.type_name()
        ),
    )
}
