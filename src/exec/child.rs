//! The stage process: locks the key, checks its inputs, runs the kind's function into a
//! staging directory, ingests the outputs and commits the run record last.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flow_stages::{InputArtifact, InputSlot, Progress, StageContext};

use super::protocol::{ChildEvent, ChildSpec, EXIT_CORRUPT_INPUT};
use crate::remote::{LeaseAttempt, Remote, RemoteError};
use crate::store::{Cache, KeyLock, RunRecord};

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

/// The key's lease in the remote cache, renewed in the background while held and released
/// on drop. `FLOW_LEASE_SECONDS` (default 60) is how long a dead holder blocks others.
struct RemoteLease {
    remote: Arc<Remote>,
    key: String,
    holder: String,
    stop: Arc<AtomicBool>,
    /// Set when a renewal finds the lease taken over: another machine computes the key too,
    /// so this one stops publishing checkpoints over that machine's.
    lost: Arc<AtomicBool>,
    /// Renews until stopped; returns the generation it holds then (each renewal makes one).
    renewer: Option<std::thread::JoinHandle<u64>>,
}

impl RemoteLease {
    /// Takes the lease, waiting while another live holder computes the key. Returns None
    /// when the key got done elsewhere meanwhile (and was pulled here).
    fn acquire(
        remote: &Arc<Remote>,
        cache: &Cache,
        key: &str,
    ) -> anyhow::Result<Option<RemoteLease>> {
        let ttl = env_secs("FLOW_LEASE_SECONDS", 60).max(2);
        let me = holder();
        let mut announced = false;
        let taken = loop {
            match remote.pull(cache, key) {
                Ok(Some(_)) => {
                    tracing::info!("pulled from the remote: done elsewhere");
                    return Ok(None);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("pull failed, computing here: {e}"),
            }
            match remote.try_lease(key, &me, ttl)? {
                LeaseAttempt::Taken(generation) => break generation,
                LeaseAttempt::HeldBy(other) => {
                    if !announced {
                        emit(&ChildEvent::Waiting {
                            holder: format!("{other}, through {}", remote.url()),
                        });
                        announced = true;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (remote, key, me) = (remote.clone(), key.to_string(), me.clone());
            let (stop, lost) = (stop.clone(), lost.clone());
            std::thread::spawn(move || {
                let mut held = taken;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) && !lost.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    if last.elapsed().as_secs() >= ttl / 3 {
                        match remote.renew_lease(&key, &me, held, ttl) {
                            Ok(next) => held = next,
                            Err(e @ RemoteError::LeaseLost { .. }) => {
                                tracing::error!("{e}; this machine stops publishing checkpoints");
                                lost.store(true, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!("renewing the lease: {e}"),
                        }
                        last = Instant::now();
                    }
                }
                held
            })
        };
        Ok(Some(RemoteLease {
            remote: remote.clone(),
            key: key.to_string(),
            holder: me,
            stop,
            lost,
            renewer: Some(renewer),
        }))
    }
}

impl Drop for RemoteLease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let Some(Ok(generation)) = self.renewer.take().map(|t| t.join()) else {
            return;
        };
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self
            .remote
            .release_lease(&self.key, &self.holder, generation)
        {
            tracing::warn!("releasing the lease: {e}");
        }
    }
}

/// Uploads new or changed checkpoint files every `FLOW_CHECKPOINT_SECONDS` (default 30)
/// while the stage runs, and once more when it ends, so a run killed on one machine resumes
/// on another. Stages should write checkpoints atomically (temp file, then rename).
struct CheckpointSync {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl CheckpointSync {
    /// Starts the uploads; they stop for good once `lost` is set (the lease was taken over).
    fn start(
        remote: Arc<Remote>,
        key: String,
        dir: std::path::PathBuf,
        lost: Arc<AtomicBool>,
    ) -> CheckpointSync {
        let every = env_secs("FLOW_CHECKPOINT_SECONDS", 30).max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = std::collections::HashMap::new();
            let mut last = Instant::now();
            loop {
                let stopping = flag.load(Ordering::Relaxed);
                if lost.load(Ordering::Relaxed) {
                    return;
                }
                if stopping || last.elapsed().as_secs() >= every {
                    match remote.push_scratch(&key, &dir, &mut seen) {
                        Ok(t) if t.files > 0 => {
                            tracing::info!(files = t.files, "checkpoints pushed")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("pushing checkpoints: {e}"),
                    }
                    last = Instant::now();
                }
                if stopping {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        CheckpointSync { stop, thread }
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

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
    let remote = match &spec.remote {
        Some(url) => Some(Arc::new(Remote::open(url)?)),
        None => None,
    };
    let lease = match &remote {
        Some(r) => match RemoteLease::acquire(r, &cache, &spec.key)? {
            Some(lease) => Some(lease),
            None => {
                emit(&ChildEvent::Done { cached: true });
                return Ok(0);
            }
        },
        None => None,
    };
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
                digest: a.digest.clone(),
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
    if let Some(r) = &remote
        && std::fs::read_dir(&scratch)?.next().is_none()
    {
        let t = r.pull_scratch(&cache, &spec.key, &scratch)?;
        if t.files > 0 {
            tracing::info!(
                files = t.files,
                bytes = t.bytes,
                "resuming from remote checkpoints"
            );
        }
    }
    let sync = remote.as_ref().zip(lease.as_ref()).map(|(r, lease)| {
        CheckpointSync::start(
            r.clone(),
            spec.key.clone(),
            scratch.clone(),
            lease.lost.clone(),
        )
    });

    emit(&ChildEvent::Started);
    let started_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let clock = Instant::now();
    let progress = EventProgress {
        last: Mutex::new(None),
    };
    let live_logs = cache.live_log_dir(&spec.pipeline, &spec.stage);
    let ctx = StageContext {
        stage: &spec.stage,
        params: &spec.params,
        inputs: &inputs,
        outputs: &outputs,
        scratch: &scratch,
        log: &log_path,
        threads: spec.threads,
        device: spec.device.as_deref().unwrap_or("auto"),
        progress: &progress,
        live_logs: Some(&live_logs),
    };
    std::env::set_current_dir(&spec.workdir)
        .map_err(|e| anyhow::anyhow!("cannot enter {}: {e}", spec.workdir.display()))?;
    let result = (kind.run)(&ctx);
    if let Some(sync) = sync {
        // Last checkpoints up, so a failure here can be resumed elsewhere.
        sync.finish();
    }
    let outcome = result?;
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
    if let Some(r) = &remote {
        // Pushed before the lease is released, so a waiting machine finds the record.
        match r.push(&cache, &record) {
            Ok(t) => {
                tracing::info!(files = t.files, bytes = t.bytes, "pushed");
                let _ = r.delete_scratch(&spec.key);
            }
            Err(e) => tracing::error!("push failed: {e}"),
        }
    }
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
