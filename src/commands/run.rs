//! `flow run`: run what is missing and skip what is cached, on this machine or (with the
//! slurm executor) as cluster jobs; after a local run, point at the study's reports.

use std::process::ExitCode;

use anyhow::bail;
use flow::exec::plan::resolve;
use flow::exec::{self, RunOptions, Threads};
use flow::pipeline::{ExecutorKind, Pipeline};
use flow::slurm;
use flow::store::Cache;
use flow::ui::Ui;

use super::{CmdResult, Context, cores, exit_code};
use crate::{ExecutorArg, PipelineArgs, RunArgs};

impl Context {
    pub fn run(&self, p: &PipelineArgs, r: RunArgs) -> CmdResult {
        let RunArgs {
            jobs,
            threads,
            device,
            executor,
            wait,
            json,
        } = r;
        if let Some(d) = &device
            && !flow_stages::gpu::device::NAMES.contains(&d.as_str())
        {
            bail!(
                "--device {d}: unknown device (one of {})",
                flow_stages::gpu::device::NAMES.join(", ")
            );
        }
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let slurm = match executor {
            Some(ExecutorArg::Slurm) => true,
            Some(ExecutorArg::Local) => false,
            None => pipeline.executor.kind == ExecutorKind::Slurm,
        };
        if slurm {
            return self.run_slurm(&pipeline, &cache, wait, json);
        }
        if wait {
            bail!("--wait follows cluster jobs: use it with --executor slurm");
        }
        let jobs = jobs.or(pipeline.executor.jobs).unwrap_or(1).max(1);
        let remote = self.open_remote(&pipeline)?;
        let opts = RunOptions {
            jobs,
            threads: match threads {
                Some(t) => Threads::PerStage(t.max(1)),
                None => Threads::Share(cores()),
            },
            remote: remote.as_ref(),
            only: None,
            device,
        };
        let mut ui = Ui::new(json, self.verbose);
        let summary = exec::run(&pipeline, &cache, &opts, &mut ui)?;
        if summary.push_failed {
            eprintln!("error: some results could not be pushed to the remote (see above)");
        }
        if !json && summary.failed + summary.blocked == 0 {
            print_reports(&pipeline, &cache)?;
        }
        Ok(exit_code(
            summary.failed + summary.blocked == 0 && !summary.push_failed,
        ))
    }

    /// Submits the pipeline's missing stages as Slurm jobs (and with `wait`, follows them).
    fn run_slurm(&self, pipeline: &Pipeline, cache: &Cache, wait: bool, json: bool) -> CmdResult {
        let remote = self.open_remote(pipeline)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the slurm executor needs a remote cache the jobs share (an s3:// bucket or a \
                 file:// path on a shared filesystem): pass --remote URL, set FLOW_REMOTE or \
                 [pipeline] remote"
            )
        })?;
        let mut ui = Ui::new(json, self.verbose);
        let jobs = slurm::submit(pipeline, cache, &remote, &mut ui)?;
        if !wait {
            if jobs.iter().any(Option::is_some) {
                ui.note(&format!(
                    "follow with `flow status {}` (or rerun with --wait)",
                    pipeline.path.display()
                ));
            }
            return Ok(ExitCode::SUCCESS);
        }
        let poll = std::env::var("FLOW_SLURM_POLL_SECONDS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(2.0);
        let (_, failed, blocked) = slurm::wait(
            pipeline,
            cache,
            &remote,
            &jobs,
            std::time::Duration::from_secs_f64(poll.max(0.1)),
            &mut ui,
        )?;
        Ok(exit_code(failed + blocked == 0))
    }
}

/// After a run, where each `report` stage's report is, and its summary table: the study's
/// answer at a glance.
fn print_reports(pipeline: &Pipeline, cache: &Cache) -> anyhow::Result<()> {
    // Resolving keys again costs a pass over the pipeline: only when there is a report.
    if !pipeline.stages.iter().any(|s| s.kind.name == "report") {
        return Ok(());
    }
    let states = resolve(pipeline, cache)?;
    for (stage, state) in pipeline.stages.iter().zip(&states) {
        if stage.kind.name != "report" {
            continue;
        }
        let Some(digest) = state.record().and_then(|r| r.outputs.get("report")) else {
            continue;
        };
        let dir = cache.view_path(digest);
        println!("\n{}: {}", stage.name, dir.join("report.html").display());
        if let Ok(table) = std::fs::read_to_string(dir.join("summary.txt")) {
            print!("{table}");
        }
    }
    Ok(())
}
