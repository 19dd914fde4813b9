//! The stage process: locks the key, checks its inputs, runs the kind's function into a
//! staging directory, ingests the outputs and commits the run record last.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flow_stages::{InputArtifact, InputSlot, Progress, StageContext};

use super::protocol::{ChildEvent, ChildSpec, EXIT_CORRUPT_INPUT};
use crate::store::{Cache, KeyLock, RunRecord};

/// Prints one event line for the parent; stdout is the protocol channel and nothing else
/// writes there.
fn emit(event: &ChildEvent) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, event);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Forwards progress to the parent, at most every 100 ms.
struct EventProgress {
    last: Mutex<Option<Instant>>,
}

impl EventProgress {
    fn send(&self, len: Option<u64>, pos: Option<u64>, msg: Option<String>, force: bool) {
        let mut last = self.last.lock().expect("progress lock");
        if !force && last.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        *last = Some(Instant::now());
        emit(&ChildEvent::Progress { len, pos, msg });
    }
}

impl Progress for EventProgress {
    fn set_length(&self, len: u64) {
        self.send(Some(len), None, None, true);
    }
    fn set_position(&self, pos: u64) {
        self.send(None, Some(pos), None, false);
    }
    fn set_message(&self, msg: &str) {
        self.send(None, None, Some(msg.to_string()), false);
    }
}

/// Runs one stage as described by `spec`; returns the process exit code.
pub fn run(spec: ChildSpec) -> i32 {
    match run_inner(&spec) {
        Ok(code) => code,
        Err(e) => {
            let error = format!("{e:#}");
            tracing::error!("{error}");
            emit(&ChildEvent::Failed { error });
            1
        }
    }
}

fn run_inner(spec: &ChildSpec) -> anyhow::Result<i32> {
    let cache = Cache::open(&spec.cache)?;
    let log_path = cache.log_path(&spec.key);
    init_log(&log_path)?;
    let _lock = KeyLock::acquire(&cache, &spec.key, |holder| {
        emit(&ChildEvent::Waiting {
            holder: holder.to_string(),
        })
    })?;
    if cache.done(&spec.key)?.is_some() {
        tracing::info!("done by another process meanwhile");
        emit(&ChildEvent::Done { cached: true });
        return Ok(0);
    }
    let kind = flow_stages::find_kind(&spec.kind)
        .ok_or_else(|| anyhow::anyhow!("this flow build has no stage kind `{}`", spec.kind))?;
    tracing::info!(stage = %spec.stage, key = %spec.key, kind = kind.name, "starting");

    // Inputs: verified before use, never trusted blindly.
    let mut inputs = BTreeMap::new();
    for input in &spec.inputs {
        let mut artifacts = Vec::new();
        for a in &input.artifacts {
            if !cache.materialize(&a.digest)? {
                return corrupt(&a.digest, vec!["(missing objects)".into()]);
            }
            let bad = cache.check_artifact(&a.digest)?;
            if !bad.is_empty() {
                cache.evict_artifact(&a.digest, &bad)?;
                return corrupt(&a.digest, bad.into_iter().map(|b| b.path).collect());
            }
            artifacts.push(InputArtifact {
                stage: a.stage.clone(),
                dir: cache.view_path(&a.digest),
            });
        }
        inputs.insert(
            input.path.clone(),
            InputSlot {
                list: input.list,
                artifacts,
            },
        );
    }

    // Staging: anything left by an earlier, killed attempt of this key is garbage (we hold
    // the lock, so no one else is writing there).
    let tmp = cache.tmp_dir();
    for entry in std::fs::read_dir(&tmp)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{}.", spec.key))
        {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    let staging = tmp.join(format!("{}.{}", spec.key, std::process::id()));
    let mut outputs = BTreeMap::new();
    for name in kind.outputs {
        let dir = staging.join(name);
        std::fs::create_dir_all(&dir)?;
        outputs.insert(name.to_string(), dir);
    }
    let scratch = cache.scratch_path(&spec.key);
    std::fs::create_dir_all(&scratch)?;

    emit(&ChildEvent::Started);
    let started_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let clock = Instant::now();
    let progress = EventProgress {
        last: Mutex::new(None),
    };
    let ctx = StageContext {
        stage: &spec.stage,
        params: &spec.params,
        inputs: &inputs,
        outputs: &outputs,
        scratch: &scratch,
        log: &log_path,
        threads: spec.threads,
        progress: &progress,
    };
    std::env::set_current_dir(&spec.workdir)
        .map_err(|e| anyhow::anyhow!("cannot enter {}: {e}", spec.workdir.display()))?;
    let outcome = (kind.run)(&ctx)?;
    let duration_s = clock.elapsed().as_secs_f64();

    let mut digests = BTreeMap::new();
    for (name, dir) in &outputs {
        let digest = cache.ingest(dir)?;
        tracing::info!(output = %name, digest = %digest, "ingested");
        digests.insert(name.clone(), digest);
    }
    let record = RunRecord {
        format: crate::store::RECORD_FORMAT.to_string(),
        key: spec.key.clone(),
        parts: spec.parts.clone(),
        pipeline: spec.pipeline.clone(),
        stage: spec.stage.clone(),
        input_stages: spec
            .inputs
            .iter()
            .map(|i| {
                (
                    i.path.clone(),
                    i.artifacts.iter().map(|a| a.stage.clone()).collect(),
                )
            })
            .collect(),
        outputs: digests,
        metrics: outcome.metrics,
        started_at,
        duration_s,
        flow_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    cache.write_record(&record)?;
    tracing::info!(seconds = duration_s, "done");
    // Only after the commit: a kill before this line keeps the checkpoints for a resume.
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_dir_all(&staging);
    emit(&ChildEvent::Done { cached: false });
    Ok(0)
}

fn corrupt(digest: &str, files: Vec<String>) -> anyhow::Result<i32> {
    tracing::error!(digest, ?files, "damaged input artifact evicted");
    emit(&ChildEvent::Corrupt {
        digest: digest.to_string(),
        files,
    });
    Ok(EXIT_CORRUPT_INPUT)
}

/// The stage's log: tracing lines and the stage's own output, appended per attempt.
fn init_log(path: &PathBuf) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open log {}: {e}", path.display()))?;
    let _ = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}
