//! The hidden subcommands flow starts itself: `__job` runs one stage of a pipeline as a
//! cluster job, `__stage` is the engine's child process for one stage.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context as _;
use flow::exec::protocol::{ChildSpec, JobSpec};
use flow::exec::{self, RunOptions, Threads};
use flow::pipeline::{Overrides, Pipeline};
use flow::remote::Remote;
use flow::ui::Ui;

use super::{CmdResult, Context, EXIT_INVALID, cores, exit_code, find_stage};

impl Context {
    /// The hidden `__job` subcommand: one stage of a pipeline, as a cluster job.
    pub fn job(&self) -> CmdResult {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading the job spec")?;
        let spec: JobSpec = serde_json::from_str(&input).context("invalid job spec")?;
        let overrides = Overrides {
            profiles: spec.profiles.clone(),
            sets: spec.sets.clone(),
        };
        let remote = Remote::open(&spec.remote)?;
        let text = remote
            .get_text(&spec.text_blake3)
            .context("reading the submitted pipeline text from the remote")?;
        let sources: flow::pipeline::Sources =
            serde_json::from_str(&text).context("the submitted pipeline files are not valid")?;
        let mut pipeline = match Pipeline::from_sources(&spec.pipeline, &sources, &overrides) {
            Ok(p) => p,
            Err(diags) => {
                eprintln!("{diags}");
                return Ok(ExitCode::from(EXIT_INVALID));
            }
        };
        pipeline.salt = spec.salt;
        let target = find_stage(&pipeline, &spec.stage)?;
        let cache = self.open_cache(Some(&pipeline))?;
        let threads = std::env::var("SLURM_CPUS_PER_TASK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(cores);
        eprintln!(
            "flow job: stage `{}` of {} (cache {}, remote {})",
            spec.stage,
            spec.pipeline.display(),
            cache.root().display(),
            remote.url()
        );
        let opts = RunOptions {
            jobs: 1,
            threads: Threads::PerStage(threads),
            remote: Some(&remote),
            only: Some(target),
            device: None,
        };
        let mut ui = Ui::new(false, true);
        let summary = exec::run(&pipeline, &cache, &opts, &mut ui)?;
        Ok(exit_code(
            summary.failed + summary.blocked == 0 && !summary.push_failed,
        ))
    }
}

/// The hidden `__stage` subcommand: one stage, spec on stdin.
pub fn stage_child() -> i32 {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: reading the stage spec: {e}");
        return 1;
    }
    match serde_json::from_str::<ChildSpec>(&input) {
        Ok(spec) => exec::child::run(spec),
        Err(e) => {
            eprintln!("error: invalid stage spec: {e}");
            1
        }
    }
}
