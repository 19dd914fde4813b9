//! `flow gc`: delete the local cache entries (or, with `--remote-cache`, the remote objects)
//! that no kept pipeline references.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use flow::exec::plan::{KeyState, resolve, resolve_with};
use flow::store::Cache;
use serde_json::json;

use super::{CmdResult, Context};
use crate::PipelineArgs;

impl Context {
    pub fn gc(
        &self,
        keep: &[PathBuf],
        profiles: &[String],
        dry_run: bool,
        json: bool,
    ) -> CmdResult {
        let mut live = BTreeSet::new();
        let mut scratch = BTreeSet::new();
        let mut cache: Option<Cache> = None;
        for path in keep {
            let pipeline = load_or_exit!(&kept(path, profiles), json);
            let c = self.open_cache(Some(&pipeline))?;
            if let Some(prev) = &cache
                && prev.root() != c.root()
            {
                bail!(
                    "kept pipelines use different caches ({} and {})",
                    prev.root().display(),
                    c.root().display()
                );
            }
            for state in resolve(&pipeline, &c)? {
                match state {
                    KeyState::Known {
                        key,
                        record: Some(_),
                        ..
                    } => {
                        live.insert(key);
                    }
                    KeyState::Known { key, .. } => {
                        scratch.insert(key);
                    }
                    KeyState::Waiting { .. } => {}
                }
            }
            cache = Some(c);
        }
        let cache = cache.expect("clap requires at least one --keep");
        let report = cache.gc(&live, &scratch, dry_run)?;
        if json {
            println!(
                "{}",
                json!({"dry_run": dry_run, "kept_keys": live.len(), "removed": report})
            );
        } else {
            println!(
                "{} {} records, {} manifests, {} objects, {} views, {} scratch dirs, {} logs, {} temp entries ({:.1} MiB); kept {} keys",
                if dry_run { "would remove" } else { "removed" },
                report.records,
                report.manifests,
                report.objects,
                report.views,
                report.scratch,
                report.logs,
                report.tmp,
                report.bytes as f64 / (1024.0 * 1024.0),
                live.len()
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn gc_remote(
        &self,
        keep: &[PathBuf],
        profiles: &[String],
        grace_seconds: u64,
        dry_run: bool,
        json: bool,
    ) -> CmdResult {
        let remote = self.global_remote()?;
        let mut live = BTreeSet::new();
        for path in keep {
            let pipeline = load_or_exit!(&kept(path, profiles), json);
            let cache = self.open_cache(Some(&pipeline))?;
            // Keys as far as either cache knows them.
            let states = resolve_with(&pipeline, &cache, |_, key| -> anyhow::Result<_> {
                Ok(remote.done_record(key)?)
            })?;
            live.extend(
                states
                    .iter()
                    .filter(|s| s.record().is_some())
                    .filter_map(|s| s.key().map(str::to_string)),
            );
        }
        let (objects, bytes) = remote.gc(&live, grace_seconds, dry_run)?;
        if json {
            println!(
                "{}",
                json!({"dry_run": dry_run, "kept_keys": live.len(), "removed_objects": objects, "bytes": bytes})
            );
        } else {
            println!(
                "{} {objects} remote objects ({:.1} MiB); kept {} keys{}",
                if dry_run { "would remove" } else { "removed" },
                bytes as f64 / (1024.0 * 1024.0),
                live.len(),
                if dry_run {
                    " (dry run: add --delete)"
                } else {
                    ""
                }
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// A kept pipeline, as `--keep PATH` and the `--profile`s name it.
fn kept(path: &Path, profiles: &[String]) -> PipelineArgs {
    PipelineArgs {
        pipeline: path.to_path_buf(),
        sets: vec![],
        profiles: profiles.to_vec(),
        salt: None,
    }
}
