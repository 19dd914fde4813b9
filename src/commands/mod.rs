//! The subcommands: thin glue between the CLI and the engine library, a module per
//! subcommand (or tight family of them), each adding its methods to [`Context`].
//!
//! This module holds what they share: the global options ([`Context`]), loading a
//! pipeline (`load`, `load_or_exit!`), opening the local and remote caches, and a few
//! small helpers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use flow::pipeline::{Overrides, Pipeline};
use flow::remote::Remote;
use flow::store::Cache;

use crate::PipelineArgs;

/// Invalid pipeline or usage.
const EXIT_INVALID: u8 = 2;

/// The global options every subcommand sees.
pub struct Context {
    pub cache: Option<PathBuf>,
    pub remote: Option<String>,
    pub verbose: bool,
}

type CmdResult = anyhow::Result<ExitCode>;

/// Loads and validates a pipeline, printing every problem (as JSON lines with `json`).
fn load(p: &PipelineArgs, json: bool) -> Result<Pipeline, ExitCode> {
    let overrides = Overrides {
        profiles: p.profiles.clone(),
        sets: p.sets.clone(),
    };
    match Pipeline::load(&p.pipeline, &overrides) {
        Ok(mut pipeline) => {
            if let Some(salt) = &p.salt {
                pipeline.salt = salt.clone();
            }
            Ok(pipeline)
        }
        Err(diags) => {
            if json {
                for d in &diags.0 {
                    println!("{}", d.to_json());
                }
            }
            eprintln!("{diags}");
            Err(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// The pipeline for the rest of the command, never dropped: a command runs once per
/// process, and freeing 100,000 expanded stages before exiting was 9% of `flow plan`.
macro_rules! load_or_exit {
    ($p:expr, $json:expr) => {
        match $crate::commands::load($p, $json) {
            Ok(p) => std::mem::ManuallyDrop::new(p),
            Err(code) => return Ok(code),
        }
    };
}

// After the macro, so that every subcommand's module can use it.
mod cancel;
mod dag;
mod explain;
mod gc;
mod job;
mod kinds;
mod plan;
mod run;
mod show;
mod status;
mod transfer;
mod verify;

pub use job::stage_child;
pub use kinds::kinds;

impl Context {
    fn open_cache(&self, pipeline: Option<&Pipeline>) -> anyhow::Result<Cache> {
        let root = self
            .cache
            .clone()
            .or_else(|| pipeline.and_then(|p| p.cache.clone()))
            .unwrap_or_else(|| PathBuf::from("cache"));
        Cache::open(&root).with_context(|| format!("opening the cache at {}", root.display()))
    }

    /// The remote cache named by --remote / FLOW_REMOTE, else by the pipeline, if any.
    fn open_remote(&self, pipeline: &Pipeline) -> anyhow::Result<Option<Remote>> {
        match self.remote.clone().or_else(|| pipeline.remote.clone()) {
            Some(url) => Ok(Some(Remote::open(&url)?)),
            None => Ok(None),
        }
    }

    fn require_remote(&self, pipeline: &Pipeline) -> anyhow::Result<Remote> {
        self.open_remote(pipeline)?.ok_or_else(|| {
            anyhow::anyhow!("no remote: pass --remote URL, set FLOW_REMOTE or [pipeline] remote")
        })
    }

    /// The remote named by --remote / FLOW_REMOTE (no pipeline to ask).
    fn global_remote(&self) -> anyhow::Result<Remote> {
        let url = self
            .remote
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no remote: pass --remote URL or set FLOW_REMOTE"))?;
        Ok(Remote::open(&url)?)
    }
}

/// Success, or failure: the exit status of a command whose outcome is a yes or no.
fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn find_stage(pipeline: &Pipeline, name: &str) -> anyhow::Result<usize> {
    pipeline.stage_index(name).ok_or_else(|| {
        let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        anyhow::anyhow!(
            "no stage `{name}` in {} (stages: {})",
            pipeline.path.display(),
            names.join(", ")
        )
    })
}
