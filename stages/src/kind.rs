//! The contract between the engine and a stage kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A stage kind: its name in pipeline files, the version that enters every cache key (bump
/// it whenever the kind's outputs change for the same params and inputs), its params schema,
/// its named outputs and the function that produces them.
pub struct Kind {
    /// The value of `kind = "..."` in a pipeline file.
    pub name: &'static str,
    /// Part of every cache key of this kind: bumping it invalidates all cached results.
    pub version: u32,
    /// One line for `--help`-style listings and the README reference.
    pub doc: &'static str,
    /// The params this kind accepts; anything else in a stage table is an error.
    pub params: &'static [Param],
    /// Names of the output artifacts; the first is what a bare `"stage"` reference means.
    pub outputs: &'static [&'static str],
    /// Runs on an accelerator when one is there (training, evaluation): a cluster executor
    /// asks GPUs for these stages only, and a local run gives each its own device.
    pub uses_device: bool,
    /// Params that change how the stage runs, not what it makes (memory against time):
    /// `flow explain` shows them, the cache key leaves them out, so changing one reuses a
    /// result. A kind lists only params whose every value computes the same math (results
    /// equal up to float rounding, as on another device, which is not keyed either).
    pub unkeyed: &'static [&'static str],
    /// Produces the outputs. Must be deterministic in (params, inputs) for the cache to be
    /// meaningful; it may use `scratch` to resume after an interruption.
    pub run: fn(&StageContext) -> Result<StageOutcome, StageError>,
}

impl Kind {
    /// The declared param of that name, if any.
    pub fn param(&self, name: &str) -> Option<&'static Param> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// One param of a kind's schema.
pub struct Param {
    /// Key in the stage table.
    pub name: &'static str,
    /// What values are accepted; the engine checks this before anything runs.
    pub ty: ParamType,
    /// What happens when the stage table leaves the param out.
    pub default: Default,
    /// One line for the README reference and error hints.
    pub doc: &'static str,
}

/// The value a param takes when a stage leaves it out.
pub enum Default {
    /// The stage must set it.
    Required,
    /// Absent from the params the kind receives (and from the cache key).
    Optional,
    /// This TOML value, written as TOML text (e.g. `"{}"`, `"0.9"`).
    Value(&'static str),
    /// The pipeline's `[pipeline] seed`, so that one seed reseeds a whole study.
    PipelineSeed,
}

/// Types of param values.
///
/// Reference types name other stages' outputs: they are the DAG's edges, and the engine
/// replaces them by input artifacts; the kind never sees stage names in its params.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Str,
    /// A string that must not be empty or blank (a shell command: `sh -c ""` succeeds
    /// doing nothing, which is never what a stage meant).
    NonEmptyStr,
    Int,
    /// Accepts integers too (`lr = 1` is `lr = 1.0`).
    Float,
    Bool,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    /// A list of values of one type.
    List(&'static ParamType),
    /// A table of string values (environment variables, say).
    StrMap,
    /// One stage reference `"stage"` or `"stage.output"`. Naming a sweep group makes the
    /// referencing stage fan out into one stage per group member.
    Input,
    /// A list of stage references; a group contributes all its members, in order.
    Inputs,
    /// A table from names to [`ParamType::Input`] or [`ParamType::Inputs`] values.
    InputMap,
    /// Data outside the cache: a path or glob relative to the pipeline file, or a URL, or a
    /// list of them. Local files enter the cache key by content (blake3), so editing a file
    /// reruns what reads it; URLs enter it as written (pin versions in them). The kind
    /// receives absolute paths and URLs, sorted, globs expanded.
    Files,
}

impl ParamType {
    /// How the type is named in error messages.
    pub fn describe(&self) -> String {
        match self {
            ParamType::Str => "a string".into(),
            ParamType::NonEmptyStr => "a non-empty string".into(),
            ParamType::Int => "an integer".into(),
            ParamType::Float => "a number".into(),
            ParamType::Bool => "a boolean".into(),
            ParamType::Choice(options) => format!("one of {}", options.join(", ")),
            ParamType::List(t) => format!("a list of {}", t.describe_plural()),
            ParamType::StrMap => "a table of strings".into(),
            ParamType::Input => "a stage reference (\"stage\" or \"stage.output\")".into(),
            ParamType::Inputs => "a list of stage references".into(),
            ParamType::InputMap => "a table of stage references".into(),
            ParamType::Files => "a path, glob or URL, or a list of them".into(),
        }
    }

    fn describe_plural(&self) -> String {
        match self {
            ParamType::Str => "strings".into(),
            ParamType::Int => "integers".into(),
            ParamType::Float => "numbers".into(),
            ParamType::Bool => "booleans".into(),
            other => other.describe(),
        }
    }
}

/// The artifacts bound to one reference param.
#[derive(Debug, Clone)]
pub struct InputSlot {
    /// True when the param held a list (or a group was collected into one): the stage gets
    /// all members; false when it named one artifact.
    pub list: bool,
    /// The artifacts, in the order the pipeline lists them.
    pub artifacts: Vec<InputArtifact>,
}

/// One artifact given to a stage as input: a read-only directory and the stage that made it.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    /// The producing stage's name (e.g. `lora[rank=64]`), for messages and directory names.
    pub stage: String,
    /// The artifact's files. Never write here: it shares storage with the cache.
    pub dir: PathBuf,
    /// The artifact's content digest, for results that must say exactly what they measured.
    pub digest: String,
}

/// Receives progress from a running stage; the engine draws it as a progress bar.
pub trait Progress: Sync {
    /// Sets the total amount of work (steps, items), once known.
    fn set_length(&self, len: u64);
    /// Sets how much of the work is done.
    fn set_position(&self, pos: u64);
    /// A short status message (current loss, say).
    fn set_message(&self, msg: &str);
}

/// Everything a stage run may read or write.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline, for messages.
    pub stage: &'a str,
    /// Resolved params as a JSON object, defaults filled in, references removed.
    pub params: &'a serde_json::Value,
    /// Input artifacts by param path (`model`, `inputs.text`), in declaration order.
    pub inputs: &'a BTreeMap<String, InputSlot>,
    /// One empty directory per declared output; what the stage leaves there is the artifact.
    pub outputs: &'a BTreeMap<String, PathBuf>,
    /// Survives failures and kills of this same cache key: put checkpoints here to resume.
    pub scratch: &'a Path,
    /// The stage's log file (append); the engine shows its tail when the stage fails.
    pub log: &'a Path,
    /// How many threads the stage may use (scheduling only, never part of the key).
    pub threads: usize,
    /// The device for kinds that use one (`auto`, `cpu`, `wgpu`, `cuda`, ...): scheduling
    /// only, never part of the key.
    pub device: &'a str,
    /// Where to report progress.
    pub progress: &'a dyn Progress,
    /// A directory for logs meant to be watched while the stage runs (training's TensorBoard
    /// event files), or None when the engine keeps none. It is named by pipeline and stage,
    /// not by key, and it outlives the run, so a tool watching it (`tensorboard --logdir`)
    /// shows a study's runs by name: a stage only ever adds new files there and never reads
    /// them back, and nothing in it may change the outputs (it is not part of the key).
    pub live_logs: Option<&'a Path>,
}

impl StageContext<'_> {
    /// Deserializes the params into the kind's typed params struct.
    pub fn typed_params<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.params.clone())
            .map_err(|e| StageError::Params(format!("stage `{}`: {e}", self.stage)))
    }

    /// The artifacts bound to an input param, in order (empty when the param is not given):
    /// one lookup for every kind instead of each reaching into `inputs`.
    pub fn artifacts(&self, name: &str) -> &[InputArtifact] {
        self.inputs
            .get(name)
            .map_or(&[][..], |s| s.artifacts.as_slice())
    }

    /// The artifact of a single-valued input param (the first of a list).
    pub fn artifact(&self, name: &str) -> Option<&InputArtifact> {
        self.artifacts(name).first()
    }

    /// The directory of the named output.
    pub fn output(&self, name: &str) -> Result<&Path, StageError> {
        self.outputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::Params(format!("no output named `{name}`")))
    }
}

/// What a finished stage reports besides its files.
#[derive(Debug, Default)]
pub struct StageOutcome {
    /// Numbers worth showing (`flow show`) and comparing; stored in the run record.
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("invalid params: {0}")]
    Params(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// Wraps an I/O error with what was being done, so the log names the file.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }
}
