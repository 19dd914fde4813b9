//! `flow push` and `flow pull`: move a pipeline's results (or, with `--all`, every
//! result) between the local cache and the remote one, and report what moved.

use std::process::ExitCode;

use anyhow::Context as _;
use flow::exec::plan::{resolve, resolve_with};
use flow::remote::Transfer;
use serde_json::json;

use super::{CmdResult, Context};
use crate::PipelineArgs;

impl Context {
    pub fn push(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let remote = self.require_remote(&pipeline)?;
        let mut total = Transfer::default();
        let mut pushed = 0;
        for (stage, state) in pipeline.stages.iter().zip(resolve(&pipeline, &cache)?) {
            if let Some(record) = state.record() {
                let t = remote
                    .push(&cache, record)
                    .with_context(|| format!("pushing `{}`", stage.name))?;
                total += t;
                pushed += 1;
                if json {
                    println!(
                        "{}",
                        json!({"event": "pushed", "stage": stage.name, "key": record.key, "transfer": t})
                    );
                }
            }
        }
        report_transfer(json, "pushed", pushed, total, remote.url());
        Ok(ExitCode::SUCCESS)
    }

    pub fn pull(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let remote = self.require_remote(&pipeline)?;
        let mut total = Transfer::default();
        let mut pulled = 0;
        let states = resolve_with(&pipeline, &cache, |stage, key| -> anyhow::Result<_> {
            let got = remote
                .pull(&cache, key)
                .with_context(|| format!("pulling `{}`", stage.name))?;
            Ok(got.map(|(record, t)| {
                total += t;
                pulled += 1;
                if json {
                    println!(
                        "{}",
                        json!({"event": "pulled", "stage": stage.name, "key": key, "transfer": t})
                    );
                }
                record
            }))
        })?;
        report_transfer(json, "pulled", pulled, total, remote.url());
        let missing = states.iter().filter(|s| s.record().is_none()).count();
        if !json && missing > 0 {
            println!("{missing} stage(s) are done neither here nor on the remote");
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn push_all(&self, json: bool) -> CmdResult {
        let cache = self.open_cache(None)?;
        let remote = self.global_remote()?;
        let mut total = Transfer::default();
        let mut count = 0;
        for key in cache.record_keys()? {
            if let Some(record) = cache.done(&key)? {
                total += remote
                    .push(&cache, &record)
                    .with_context(|| format!("pushing {key}"))?;
                count += 1;
            }
        }
        report_transfer(json, "pushed", count, total, remote.url());
        Ok(ExitCode::SUCCESS)
    }

    pub fn pull_all(&self, json: bool) -> CmdResult {
        let cache = self.open_cache(None)?;
        let remote = self.global_remote()?;
        let mut total = Transfer::default();
        let mut count = 0;
        for key in remote.record_keys()? {
            if cache.done(&key)?.is_some() {
                continue;
            }
            if let Some((_, t)) = remote
                .pull(&cache, &key)
                .with_context(|| format!("pulling {key}"))?
            {
                total += t;
                count += 1;
            }
        }
        report_transfer(json, "pulled", count, total, remote.url());
        Ok(ExitCode::SUCCESS)
    }
}

fn report_transfer(json: bool, verb: &str, stages: usize, t: Transfer, url: &str) {
    if json {
        println!(
            "{}",
            json!({"event": "summary", "stages": stages, "transfer": t, "remote": url})
        );
    } else {
        println!(
            "{verb} {stages} stage(s): {} file(s), {:.1} MiB ({} already there) with {url}",
            t.files,
            t.bytes as f64 / (1024.0 * 1024.0),
            t.skipped
        );
    }
}
