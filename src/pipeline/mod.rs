//! Pipelines: the TOML file, validated against the stage kinds, expanded into a DAG of
//! concrete stages (sweeps and fan-outs unrolled) before anything runs.

mod branch;
pub mod check;
pub mod executor;
mod expand;
pub mod include;
pub mod load;
mod per;
mod remote_glob;
pub mod template;
pub mod value;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flow_stages::Kind;

pub use executor::{ExecutorKind, ExecutorSettings, JobResources};
pub use include::Sources;
pub use load::Overrides;

use crate::diag::{Diagnostic, Diagnostics, Origin};
use crate::key::Val;
use value::{Node, Value, type_error};

/// A validated pipeline: settings and concrete stages in a topological order that follows
/// the file's order where the DAG allows.
pub struct Pipeline {
    /// The file as given on the command line.
    pub path: PathBuf,
    /// Directory of the file: where commands run and relative paths resolve.
    pub dir: PathBuf,
    pub name: String,
    pub seed: i64,
    /// Mixed into every key of this pipeline (`[pipeline] cache_salt`, `--salt`).
    pub salt: String,
    /// `[pipeline] cache`, resolved against `dir`.
    pub cache: Option<PathBuf>,
    /// `[pipeline] remote`: an object store URL shared with other machines.
    pub remote: Option<String>,
    /// `[executor]`: where the stages run (never part of a key).
    pub executor: ExecutorSettings,
    pub stages: Vec<Stage>,
    /// The text of the file and of every file it includes, as read, so that a cluster job
    /// runs exactly what was submitted.
    pub sources: Sources,
    /// The overrides applied to the text.
    pub overrides: Overrides,
}

/// One concrete stage (a sweep member counts as one).
pub struct Stage {
    /// `name` or `name[k=v,...]` for sweep and fan-out members.
    pub name: String,
    /// The `[stage.NAME]` it came from; later stages may reference the whole group.
    pub group: String,
    pub kind: &'static Kind,
    /// Resolved params, defaults filled in, references as [`Val::Input`].
    pub params: BTreeMap<String, Val>,
    /// Input artifacts by param path, sorted by path.
    pub inputs: Vec<Binding>,
    /// Sweep coordinates (own and inherited through fan-out), as displayed in the name.
    pub coords: Vec<(String, String)>,
    /// Where the stage is declared.
    pub origin: Origin,
    /// Where each param's value was written (shared by the members of a sweep), for
    /// `flow show` and `flow explain`.
    /// Sorted by name; params left to their default have no entry.
    pub param_origins: std::sync::Arc<[(&'static str, ParamOrigin)]>,
    /// `device = "..."` of the stage table (scheduling only: not part of the key).
    pub device: Option<String>,
}

/// Where a param's value came from.
#[derive(Debug, Clone)]
pub struct ParamOrigin {
    /// The value's text (a file and span, a `--set`, or the kind's default).
    pub origin: Origin,
    /// The template that supplied it, when the stage did not set it itself.
    pub template: Option<std::sync::Arc<str>>,
}

impl ParamOrigin {
    /// "pipelines/common.toml:40:9 (template `eval`)", "--set ...", "default".
    pub fn describe(&self) -> String {
        let place = match &self.origin {
            Origin::Default => "default".to_string(),
            other => include::place(other),
        };
        match &self.template {
            Some(t) => format!("{place} (template `{t}`)"),
            None => place,
        }
    }
}

/// The artifacts bound to one reference param.
#[derive(Debug, Clone)]
pub struct Binding {
    pub path: String,
    /// True for list params: the stage gets a list even of one artifact.
    pub list: bool,
    pub sources: Vec<Source>,
}

/// One input artifact: an output of an earlier stage.
#[derive(Debug, Clone)]
pub struct Source {
    /// Index into [`Pipeline::stages`].
    pub stage: usize,
    pub output: String,
}

impl Stage {
    /// The resolved params with where each was written, for `flow show` and `explain`:
    /// (name, canonical value, origin such as `pipelines/common.toml:40:9 (template `eval`)`).
    pub fn described_params(&self) -> Vec<(String, String, String)> {
        self.params
            .iter()
            .map(|(k, v)| {
                let origin = self
                    .param_origins
                    .binary_search_by_key(&k.as_str(), |(name, _)| name)
                    .map_or_else(
                        |_| "default".to_string(),
                        |i| self.param_origins[i].1.describe(),
                    );
                (k.clone(), v.canonical(), origin)
            })
            .collect()
    }
}

impl Pipeline {
    /// Loads, overlays, validates and expands a pipeline file and its includes; all
    /// problems at once.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Pipeline, Diagnostics> {
        Pipeline::read(path, &Sources::default(), true, overrides)
    }

    /// Like [`Pipeline::load`], for the text of the file at `path` as read earlier (relative
    /// paths in it still resolve against `path`'s directory; its includes are read from disk).
    pub fn from_text(
        path: &Path,
        text: String,
        overrides: &Overrides,
    ) -> Result<Pipeline, Diagnostics> {
        Pipeline::read(path, &Sources::single(path, text), true, overrides)
    }

    /// Like [`Pipeline::load`], from exactly the files a submission read (a cluster job):
    /// nothing is read from disk.
    pub fn from_sources(
        path: &Path,
        sources: &Sources,
        overrides: &Overrides,
    ) -> Result<Pipeline, Diagnostics> {
        Pipeline::read(path, sources, false, overrides)
    }

    fn read(
        path: &Path,
        given: &Sources,
        disk: bool,
        overrides: &Overrides,
    ) -> Result<Pipeline, Diagnostics> {
        let mut doc = load::parse(path, given, disk, overrides)?;
        let mut diags = Diagnostics::default();
        let uses = template::apply(&mut doc.root, &mut diags);
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let settings = read_settings(&doc.root, path, &dir, &mut diags);
        // Taken out of the document: expansion consumes the tables as it goes.
        let stages = match doc.root.shift_remove("stage") {
            Some((_, node)) => match node.value {
                Value::Table(t) => expand::expand(t, &uses, settings.seed, &dir, &mut diags),
                _ => {
                    diags.push(type_error(&node, "a table of stages", "`stage`"));
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let executor = executor::read(doc.root.get("executor").map(|(_, n)| n), &mut diags);
        executor::check_stage_names(
            &executor,
            stages
                .iter()
                .flat_map(|s| [s.name.as_str(), s.group.as_str()]),
            &mut diags,
        );
        if diags.is_empty() && stages.is_empty() {
            let origin = Origin::File(doc.source.clone(), 0..0);
            diags.push(Diagnostic::new(
                &origin,
                "the pipeline has no stages (add a [stage.NAME] table)",
            ));
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(Pipeline {
            path: path.to_path_buf(),
            dir,
            name: settings.name,
            seed: settings.seed,
            salt: settings.salt,
            cache: settings.cache,
            remote: settings.remote,
            executor,
            stages,
            sources: doc.sources,
            overrides: overrides.clone(),
        })
    }

    /// Finds a stage by exact name.
    pub fn stage_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Marks `target` and every stage it transitively consumes.
    pub fn upstream_of(&self, target: usize) -> Vec<bool> {
        let mut marked = vec![false; self.stages.len()];
        let mut todo = vec![target];
        while let Some(i) = todo.pop() {
            if !std::mem::replace(&mut marked[i], true) {
                todo.extend(
                    self.stages[i]
                        .inputs
                        .iter()
                        .flat_map(|b| b.sources.iter().map(|s| s.stage)),
                );
            }
        }
        marked
    }

    /// The distinct stages a stage reads, ascending.
    pub fn producers(&self, index: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.stages[index]
            .inputs
            .iter()
            .flat_map(|b| b.sources.iter().map(|s| s.stage))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// For every stage, the distinct stages that read it, ascending: the reverse edges,
    /// built in one pass so that a scheduler never scans all stages to find dependents.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.stages.len()];
        for i in 0..self.stages.len() {
            for p in self.producers(i) {
                out[p].push(i);
            }
        }
        out
    }
}

struct Settings {
    name: String,
    seed: i64,
    salt: String,
    cache: Option<PathBuf>,
    remote: Option<String>,
}

const PIPELINE_KEYS: &[&str] = &[
    "name",
    "seed",
    "cache_salt",
    "cache",
    "remote",
    "description",
];

fn read_settings(
    root: &value::Table,
    path: &Path,
    dir: &Path,
    diags: &mut Diagnostics,
) -> Settings {
    let mut settings = Settings {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into()),
        seed: 0,
        salt: String::new(),
        cache: None,
        remote: None,
    };
    let Some((_, node)) = root.get("pipeline") else {
        return settings;
    };
    let Some(table) = node.as_table() else {
        diags.push(type_error(node, "a table", "`pipeline`"));
        return settings;
    };
    let string = |n: &Node, what: &str, diags: &mut Diagnostics| match n.as_str() {
        Some(s) => Some(s.to_string()),
        None => {
            diags.push(type_error(n, "a string", what));
            None
        }
    };
    for (key, (key_origin, n)) in table {
        match key.as_str() {
            "name" => {
                if let Some(s) = string(n, "pipeline.name", diags) {
                    settings.name = s;
                }
            }
            "seed" => match n.value {
                Value::Int(i) => settings.seed = i,
                _ => diags.push(type_error(n, "an integer", "pipeline.seed")),
            },
            "cache_salt" => {
                if let Some(s) = string(n, "pipeline.cache_salt", diags) {
                    settings.salt = s;
                }
            }
            "cache" => {
                if let Some(s) = string(n, "pipeline.cache", diags) {
                    settings.cache = Some(dir.join(s));
                }
            }
            "remote" => {
                if let Some(s) = string(n, "pipeline.remote", diags) {
                    if ["s3://", "gs://", "az://", "file://"]
                        .iter()
                        .any(|p| s.starts_with(p))
                    {
                        settings.remote = Some(s);
                    } else {
                        diags.push(Diagnostic::new(
                            &n.origin,
                            "pipeline.remote must be an s3://, gs://, az:// or file:// URL",
                        ));
                    }
                }
            }
            "description" => {
                string(n, "pipeline.description", diags);
            }
            other => {
                diags.push(
                    Diagnostic::new(
                        key_origin,
                        format!(
                            "unknown setting `{other}` in [pipeline] (expected one of: {})",
                            PIPELINE_KEYS.join(", ")
                        ),
                    )
                    .with_suggestion(other, PIPELINE_KEYS.iter().copied()),
                );
            }
        }
    }
    settings
}
