//! `include = ["common.toml"]`: a pipeline read from several files, merged into one value
//! tree before profiles, templates and expansion see it.
//!
//! Every value keeps the file and span it was read from, so a diagnostic about an included
//! stage points into the included file. Rules, as Snakemake's `include` and C's
//! `#pragma once` would suggest:
//! - paths are relative to the file that names them; includes nest;
//! - a file is read once per pipeline (diamonds are fine), a file that includes itself
//!   through a chain is a cycle error naming the chain;
//! - included content comes first, the including file's after it (stage order, and so the
//!   order independent stages run and print in, follows the text as if pasted at the top);
//! - a stage or template defined twice, or a profile setting given twice, is an error naming
//!   both places; `[pipeline]` settings other than `include` belong to the main file.
//!
//! What was read is kept as [`Sources`], so that a cluster job re-reads exactly the files
//! that were submitted, not whatever the shared filesystem holds later.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::de::DeTable;

use super::value::{Node, Table, Value, table_from_toml, type_error};
use crate::diag::{Diagnostic, Diagnostics, Origin, SourceFile};

/// The top-level tables a pipeline file may hold.
pub const TOP_LEVEL: &[&str] = &["pipeline", "stage", "template", "profile", "executor"];

/// Beyond this depth an include chain is surely a mistake (and a symlink loop cannot run away).
const MAX_DEPTH: usize = 32;

/// The text of every file a pipeline was read from, the main file first, then each included
/// file in the order met. Files are named relative to the main file's directory (the main
/// file by its file name), so a job that sees the pipeline under another absolute path still
/// finds them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sources {
    pub files: Vec<(PathBuf, String)>,
}

impl Sources {
    /// The main file alone (its includes are read from disk).
    pub fn single(path: &Path, text: String) -> Sources {
        Sources {
            files: vec![(main_key(path), text)],
        }
    }

    fn get(&self, path: &Path) -> Option<&str> {
        self.files
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| t.as_str())
    }
}

/// The merged document of a pipeline and everything it includes.
pub struct Merged {
    /// The main file (diagnostics about the pipeline as a whole point at it).
    pub main: Arc<SourceFile>,
    pub root: Table,
    /// Every file read, for [`Sources`]-based reruns.
    pub sources: Sources,
}

struct Reader<'a> {
    /// Texts given up front (a cluster job's submitted files); files not in it are read
    /// from disk only when `disk` is true.
    given: &'a Sources,
    disk: bool,
    read: Sources,
    seen: HashSet<PathBuf>,
    diags: Diagnostics,
}

/// Reads `path` and its includes. Texts in `given` are used instead of the disk; with
/// `disk = false` an include missing from `given` is an error (a job must not read files
/// that were not submitted).
pub fn read(path: &Path, given: &Sources, disk: bool) -> Result<Merged, Diagnostics> {
    let mut reader = Reader {
        given,
        disk,
        read: Sources::default(),
        seen: HashSet::new(),
        diags: Diagnostics::default(),
    };
    let key = main_key(path);
    reader.seen.insert(key.clone());
    let mut chain = vec![key.clone()];
    let loaded = reader.load(&key, path, None, &mut chain);
    if !reader.diags.is_empty() {
        return Err(reader.diags);
    }
    let (main, root) = loaded.expect("no diagnostics means the main file loaded");
    Ok(Merged {
        main,
        root,
        sources: reader.read,
    })
}

/// How [`Sources`] names the main file.
fn main_key(path: &Path) -> PathBuf {
    PathBuf::from(path.file_name().unwrap_or(path.as_os_str()))
}

impl Reader<'_> {
    fn text(&mut self, key: &Path, path: &Path, via: Option<&Origin>) -> Option<String> {
        if let Some(t) = self.given.get(key) {
            return Some(t.to_string());
        }
        let origin = via
            .cloned()
            .unwrap_or_else(|| Origin::Arg(Arc::from(path.display().to_string())));
        if !self.disk {
            self.diags.push(Diagnostic::new(
                &origin,
                format!("`{}` was not among the submitted files", path.display()),
            ));
            return None;
        }
        match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                let what = if via.is_some() {
                    "cannot read the included file"
                } else {
                    "cannot read the pipeline file"
                };
                self.diags.push(Diagnostic::new(
                    &origin,
                    format!("{what} `{}`: {e}", path.display()),
                ));
                None
            }
        }
    }

    /// Loads one file (`key`: its name relative to the main file's directory; `path`: where
    /// it is read and what diagnostics show) and, depth first, what it includes.
    fn load(
        &mut self,
        key: &Path,
        path: &Path,
        via: Option<&Origin>,
        chain: &mut Vec<PathBuf>,
    ) -> Option<(Arc<SourceFile>, Table)> {
        let text = self.text(key, path, via)?;
        self.read.files.push((key.to_path_buf(), text.clone()));
        let source = SourceFile::new(path.to_path_buf(), text);
        let (parsed, errors) = DeTable::parse_recoverable(&source.text);
        if !errors.is_empty() {
            for e in &errors {
                let span = e.span().unwrap_or(0..0);
                self.diags.push(Diagnostic::new(
                    &Origin::File(source.clone(), span),
                    format!("invalid TOML: {}", e.message()),
                ));
            }
            return None;
        }
        let mut root = table_from_toml(&source, parsed.get_ref());
        // The parser's tree is several times the text's size: gone before the next file.
        drop(parsed);
        for (key, (origin, _)) in &root {
            if !TOP_LEVEL.contains(&key.as_str()) {
                self.diags.push(
                    Diagnostic::new(
                        origin,
                        format!(
                            "unknown top-level table `{key}` (expected pipeline, stage, template, executor or profile)"
                        ),
                    )
                    .with_suggestion(key, TOP_LEVEL.iter().copied()),
                );
            }
        }
        let includes = self.take_includes(&mut root, via.is_none());
        let key_dir = key.parent().unwrap_or(Path::new(""));
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut merged = Table::new();
        for (rel, origin) in includes {
            let target = normalize(&key_dir.join(&rel));
            let target_path = normalize(&dir.join(&rel));
            if let Some(pos) = chain.iter().position(|p| *p == target) {
                let names: Vec<String> = chain[pos..]
                    .iter()
                    .chain(std::iter::once(&target))
                    .map(|p| p.display().to_string())
                    .collect();
                self.diags.push(Diagnostic::new(
                    &origin,
                    format!("include cycle: {}", names.join(" -> ")),
                ));
                continue;
            }
            if chain.len() >= MAX_DEPTH {
                self.diags.push(Diagnostic::new(
                    &origin,
                    format!("includes nest deeper than {MAX_DEPTH} files"),
                ));
                continue;
            }
            if !self.seen.insert(target.clone()) {
                continue; // read once per pipeline
            }
            chain.push(target.clone());
            if let Some((_, table)) = self.load(&target, &target_path, Some(&origin), chain) {
                merge(&mut merged, table, &mut self.diags);
            }
            chain.pop();
        }
        merge(&mut merged, root, &mut self.diags);
        Some((source, merged))
    }

    /// Removes `[pipeline] include` and returns its paths; an included file's `[pipeline]`
    /// may hold nothing else.
    fn take_includes(&mut self, root: &mut Table, main: bool) -> Vec<(String, Origin)> {
        let Some((_, node)) = root.get_mut("pipeline") else {
            return Vec::new();
        };
        let Value::Table(table) = &mut node.value else {
            return Vec::new(); // reported with the settings
        };
        let mut out = Vec::new();
        if let Some((_, list)) = table.shift_remove("include") {
            match &list.value {
                Value::List(items) => {
                    for item in items {
                        match item.as_str() {
                            Some(s) if !s.trim().is_empty() => {
                                out.push((s.to_string(), item.origin.clone()))
                            }
                            _ => self.diags.push(type_error(
                                item,
                                "a non-empty path",
                                "an entry of `pipeline.include`",
                            )),
                        }
                    }
                }
                _ => self
                    .diags
                    .push(type_error(&list, "a list of paths", "`pipeline.include`")),
            }
        }
        if !main {
            for (key, (origin, _)) in table.iter() {
                self.diags.push(Diagnostic::new(
                    origin,
                    format!(
                        "`pipeline.{key}` in an included file: [pipeline] settings belong to the main file (an included file may only `include`)"
                    ),
                ));
            }
            root.shift_remove("pipeline");
        }
        out
    }
}

/// "path:line:col" of an origin, for messages that name a second place.
pub fn place(origin: &Origin) -> String {
    match origin {
        Origin::File(src, span) => {
            let (line, col) = src.line_col(span.start);
            format!("{}:{line}:{col}", src.path.display())
        }
        Origin::Arg(arg) => arg.to_string(),
        Origin::Default => "a kind default".to_string(),
    }
}

/// Merges one file's tables into what was read before it.
fn merge(into: &mut Table, from: Table, diags: &mut Diagnostics) {
    for (key, (origin, node)) in from {
        match key.as_str() {
            "stage" | "template" | "pipeline" | "executor" => {
                merge_named(into, key, origin, node, diags);
            }
            "profile" => {
                let profiles = match node.value {
                    Value::Table(t) => t,
                    other => {
                        into.insert(key, (origin, Node::new(other, node.origin)));
                        continue;
                    }
                };
                let slot = table_slot(into, "profile", &origin);
                for (name, (p_origin, p_node)) in profiles {
                    let mut leaves = Vec::new();
                    match &p_node.value {
                        Value::Table(settings) => flatten(settings, &mut Vec::new(), &mut leaves),
                        _ => {
                            slot.insert(name, (p_origin, p_node)); // reported when applied
                            continue;
                        }
                    }
                    let entry = table_slot(slot, &name, &p_origin);
                    for (path, leaf) in leaves {
                        let dotted = path.join(".");
                        if let Some((_, first)) = entry.get(&dotted) {
                            diags.push(
                                Diagnostic::new(
                                    &leaf.origin,
                                    format!("profile `{name}` sets `{dotted}` twice"),
                                )
                                .with_help(format!("first set at {}", place(&first.origin))),
                            );
                            continue;
                        }
                        entry.insert(dotted, (leaf.origin.clone(), leaf));
                    }
                }
            }
            _ => {} // reported as an unknown table
        }
    }
}

/// Merges the entries of table `key` (`stage`, `template`, `pipeline`, `executor`), each
/// name once.
fn merge_named(into: &mut Table, key: String, origin: Origin, node: Node, diags: &mut Diagnostics) {
    let describe = |name: &str| match key.as_str() {
        "stage" | "template" => format!("{key} `{name}`"),
        _ => format!("setting {key}.{name}"),
    };
    let entries = match node.value {
        Value::Table(t) => t,
        other => {
            let node = Node::new(other, node.origin);
            if into.contains_key(&key) {
                diags.push(type_error(&node, "a table", &format!("`{key}`")));
            } else {
                into.insert(key, (origin, node));
            }
            return;
        }
    };
    let slot = table_slot(into, &key, &origin);
    for (name, (e_origin, e_node)) in entries {
        if let Some((first, _)) = slot.get(&name) {
            diags.push(
                Diagnostic::new(&e_origin, format!("{} is defined twice", describe(&name)))
                    .with_help(format!("first defined at {}", place(first))),
            );
            continue;
        }
        slot.insert(name, (e_origin, e_node));
    }
}

/// The table under `key`, created when absent (a non-table there was reported already).
fn table_slot<'t>(into: &'t mut Table, key: &str, origin: &Origin) -> &'t mut Table {
    let entry = into.entry(key.to_string()).or_insert_with(|| {
        (
            origin.clone(),
            Node::new(Value::Table(Table::new()), origin.clone()),
        )
    });
    if !matches!(entry.1.value, Value::Table(_)) {
        entry.1.value = Value::Table(Table::new());
    }
    match &mut entry.1.value {
        Value::Table(t) => t,
        _ => unreachable!("made a table above"),
    }
}

/// Turns a profile table into (dotted path, leaf) pairs. Keys may themselves be dotted
/// strings (`"stage.base.source" = ...`) or nested tables; both mean the same path.
///
/// A whole stage definition (a table with `kind` or `use` at `stage.NAME`) stays one leaf:
/// set by a profile it replaces the stage instead of merging into it, which is how a profile
/// drops parameters the default sets (the paper profile's training at fixed learning rates
/// has no `lr_from`).
pub fn flatten(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Node)>) {
    for (key, (_, node)) in table {
        let depth = prefix.len();
        prefix.extend(key.split('.').map(str::to_string));
        match &node.value {
            Value::Table(inner) if !inner.is_empty() && !is_stage_definition(prefix, inner) => {
                flatten(inner, prefix, out)
            }
            _ => out.push((prefix.clone(), node.clone())),
        }
        prefix.truncate(depth);
    }
}

/// Whether `table` at `path` defines a whole stage (`stage.NAME` with `kind` or `use`).
fn is_stage_definition(path: &[String], table: &Table) -> bool {
    path.len() == 2
        && path[0] == "stage"
        && (table.contains_key("kind") || table.contains_key("use"))
}

/// `a/./b/../c` as `a/c`, without touching the disk: the identity of an included file for
/// cycle checks, and the path its diagnostics show.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Sources, normalize, read};
    use std::path::{Path, PathBuf};

    /// A cluster job reads exactly the submitted files: a job given the texts finds them by
    /// their names relative to the main file, under another absolute path, and never reads
    /// the disk for one that was not submitted.
    #[test]
    fn submitted_sources_are_read_back_without_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("study.toml");
        std::fs::create_dir_all(dir.path().join("lib")).unwrap();
        std::fs::write(&main, "[pipeline]\ninclude = [\"lib/common.toml\"]\n").unwrap();
        std::fs::write(
            dir.path().join("lib/common.toml"),
            "[stage.a]\nkind = \"command\"\nrun = \"true\"\n",
        )
        .unwrap();
        let submitted = read(&main, &Sources::default(), true).unwrap().sources;
        let names: Vec<&PathBuf> = submitted.files.iter().map(|(p, _)| p).collect();
        assert_eq!(
            names,
            [Path::new("study.toml"), Path::new("lib/common.toml")]
        );
        // The files change (or vanish) after submission; the job still sees the stage.
        std::fs::remove_file(dir.path().join("lib/common.toml")).unwrap();
        let elsewhere = Path::new("/nonexistent/node/path/study.toml");
        let merged = read(elsewhere, &submitted, false).unwrap();
        let stages = merged.root.get("stage").unwrap().1.as_table().unwrap();
        assert!(stages.contains_key("a"));
        // Without the include among the texts it is an error, not a read from disk.
        let only_main = Sources {
            files: submitted.files[..1].to_vec(),
        };
        let err = read(&main, &only_main, false).err().unwrap().to_string();
        assert!(err.contains("was not among the submitted files"), "{err}");
    }

    #[test]
    fn normalize_drops_dots_but_keeps_leading_parents() {
        assert_eq!(
            normalize(Path::new("a/./b/../c.toml")),
            Path::new("a/c.toml")
        );
        assert_eq!(
            normalize(Path::new("../x/./y.toml")),
            Path::new("../x/y.toml")
        );
        assert_eq!(normalize(Path::new("./p.toml")), Path::new("p.toml"));
    }
}
