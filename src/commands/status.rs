//! `flow status`: per stage, done / remote / running / missing (with the Slurm job's state
//! where one was submitted), and the output paths of what is done.

use std::io::Write;
use std::process::ExitCode;

use flow::exec::plan::{KeyState, resolve};
use flow::slurm::{self, ledger::Ledger};
use flow::store::KeyLock;
use serde_json::json;

use super::{CmdResult, Context};
use crate::PipelineArgs;

impl Context {
    pub fn status(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        // One write per 64 KiB, not per line, as in `plan`.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        let remote = self.open_remote(&pipeline)?;
        let states = match &remote {
            Some(r) => slurm::resolve_remote(&pipeline, &cache, r)?,
            None => resolve(&pipeline, &cache)?,
        };
        let ledger = Ledger::load(&cache, &pipeline.name);
        let views = if ledger.jobs.is_empty() || states.iter().all(|s| s.record().is_some()) {
            vec![None; pipeline.stages.len()]
        } else {
            let jobs = slurm::scheduler::jobs().unwrap_or_else(|e| {
                eprintln!("warning: cannot ask Slurm about the pipeline's jobs: {e}");
                Default::default()
            });
            slurm::job_views(&pipeline, &ledger, &jobs)
        };
        for ((stage, state), view) in pipeline.stages.iter().zip(&states).zip(&views) {
            let mut detail = String::new();
            let (status, outputs) = match state {
                KeyState::Known {
                    key,
                    record: Some(r),
                    ..
                } if cache.done(key)?.is_some() => (
                    "done",
                    r.outputs
                        .iter()
                        .map(|(n, d)| (n.clone(), cache.view_path(d).display().to_string()))
                        .collect(),
                ),
                KeyState::Known {
                    record: Some(_), ..
                } => {
                    detail = "on the remote (`flow pull` fetches it)".into();
                    ("remote", vec![])
                }
                KeyState::Known { key, .. } if KeyLock::is_held(&cache, key) => ("running", vec![]),
                _ => match view {
                    Some(v) => {
                        detail = format!("job {} {} {}; log: {}", v.job, v.state, v.detail, v.log);
                        (
                            if v.status == "finished" {
                                "missing"
                            } else {
                                v.status
                            },
                            vec![],
                        )
                    }
                    None => ("missing", vec![]),
                },
            };
            if json {
                let outs: serde_json::Map<_, _> =
                    outputs.iter().map(|(n, d)| (n.clone(), json!(d))).collect();
                let job = view.as_ref().map(|v| {
                    json!({"id": v.job, "state": v.state, "status": v.status, "detail": v.detail, "log": v.log})
                });
                writeln!(
                    out,
                    "{}",
                    json!({"stage": stage.name, "status": status, "key": state.key(), "outputs": outs, "job": job})
                )?;
            } else {
                let paths: Vec<String> = outputs.iter().map(|(n, d)| format!("{n}={d}")).collect();
                writeln!(
                    out,
                    "{status:>8}  {}  {}{detail}",
                    stage.name,
                    paths.join(" ")
                )?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
