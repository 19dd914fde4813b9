//! The local executor: walks the DAG, skips done keys, runs the rest as child processes of
//! this binary, up to `jobs` at a time.

pub mod child;
pub mod plan;
pub mod protocol;
mod schedule;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use flow_stages::ParamType;

use crate::pipeline::Pipeline;
use crate::remote::Remote;
use crate::store::Cache;
use crate::ui::Ui;
use protocol::{ChildEvent, ChildSpec, Outputs};

/// Scheduling options: none of them enters a cache key.
#[derive(Debug, Clone)]
pub struct RunOptions<'a> {
    /// Stages run at once.
    pub jobs: usize,
    /// Threads each stage may use.
    pub threads: Threads,
    /// A shared remote cache: done keys are pulled from it instead of recomputed, and every
    /// key done here is pushed to it.
    pub remote: Option<&'a Remote>,
    /// Run only this stage (a cluster job): its upstream stages must be done already, here
    /// or on the remote, and nothing else is looked at.
    pub only: Option<usize>,
    /// The device of stages that use one and name none (`--device`; default `auto`).
    pub device: Option<String>,
}

/// How many threads a stage gets.
#[derive(Debug, Clone, Copy)]
pub enum Threads {
    /// The same number for every stage (`--threads`, a cluster job's CPUs).
    PerStage(usize),
    /// This many cores, shared among the stages that hold cores (training, eval, svd,
    /// commands): those started together split the cores no running one holds, so the
    /// base model's pretraining, alone, gets all of them and two finetuning runs side by
    /// side get half each. Data stages use every core and hold none (they are short). A
    /// stage keeps its threads to the end (the CPU engine sizes its pool once), and thread
    /// counts never change results: the engine splits work over output blocks only.
    Share(usize),
}

/// Counts of a finished run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub ran: usize,
    pub cached: usize,
    pub failed: usize,
    pub blocked: usize,
    /// Some key could not be pushed to the remote (the run itself succeeded locally).
    pub push_failed: bool,
}

enum Msg {
    Event(usize, ChildEvent),
    Exit(usize, Result<i32, String>),
}

/// How often one artifact may be found damaged and recomputed in one run before giving up.
const MAX_HEALS: usize = 2;

/// Runs what is missing of `pipeline`. Failures do not stop independent stages.
pub fn run(
    pipeline: &Pipeline,
    cache: &Cache,
    opts: &RunOptions,
    ui: &mut Ui,
) -> anyhow::Result<Summary> {
    schedule::Scheduler::new(pipeline, cache, opts, ui).run()
}

/// Whether a stage of this kind holds its share of the cores while it runs: training, eval,
/// svd and commands (a user's own job) do; the data stages (generating, reading, tokenizing,
/// packing, importing, the report) take seconds in a study, use every core and hold none.
fn holds_cores(kind: &flow_stages::Kind) -> bool {
    kind.uses_device || matches!(kind.name, "command" | "svd")
}

/// Threads for each of `starting` stages, given the threads running stages hold.
fn thread_shares(policy: Threads, held: usize, starting: usize) -> Vec<usize> {
    match policy {
        Threads::PerStage(t) => vec![t.max(1); starting],
        Threads::Share(cores) => {
            let free = cores.saturating_sub(held).max(starting);
            (0..starting)
                .map(|j| (free / starting + usize::from(j < free % starting)).max(1))
                .collect()
        }
    }
}

/// The outputs of a done key, rebuilding views that are missing; None when the key must run
/// (no record, or its artifacts cannot be rebuilt, in which case the record is dropped).
/// One record read: `materialize` is a stat when the view is in place.
fn cached_outputs(
    cache: &Cache,
    key: &str,
    kind: &flow_stages::Kind,
) -> anyhow::Result<Option<Outputs>> {
    let Some(outputs) = cache.read_outputs(key)? else {
        return Ok(None);
    };
    if !has_every_output(&outputs, kind) {
        return Ok(None);
    }
    for digest in outputs.values() {
        if !cache.materialize(digest)? {
            cache.remove_record(key)?;
            return Ok(None);
        }
    }
    Ok(Some(outputs))
}

/// Whether a record names every output its kind makes: one that lacks some (written by
/// hand, or pulled from a remote someone else writes) means the key is not done, rather
/// than a consumer that finds its input missing.
pub(crate) fn has_every_output(outputs: &Outputs, kind: &flow_stages::Kind) -> bool {
    kind.outputs.iter().all(|o| outputs.contains_key(*o))
}

/// Makes sure the remote has a done key (pushing it if not); false after a failure, which is
/// reported: the local result stands, but the team would not see it. A key the remote has a
/// record of costs one request here; `flow push` is what checks and repairs such keys.
fn sync_push(remote: &Remote, cache: &Cache, key: &str, stage: &str, ui: &Ui) -> bool {
    let result = match cache.read_record(key) {
        Ok(Some(record)) => match remote.has_record(key) {
            Ok(true) => Ok(()),
            Ok(false) => remote.push(cache, &record).map(|_| ()),
            Err(e) => Err(e),
        },
        Ok(None) => return true,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            ui.warn(&format!("  push failed  {stage}: {e}"));
            false
        }
    }
}

/// Pulls a key the remote has done; None (with a warning on errors) means it must run here.
fn pull(
    remote: &Remote,
    cache: &Cache,
    key: &str,
    stage: &crate::pipeline::Stage,
    ui: &Ui,
) -> Option<Outputs> {
    let stage_name = &stage.name;
    match remote.pull(cache, key) {
        Ok(Some((record, _))) if has_every_output(&record.outputs, stage.kind) => {
            Some(record.outputs)
        }
        Ok(Some(_)) => {
            ui.warn(&format!(
                "  pull failed  {stage_name}: the remote's record of {key} lacks outputs of \
                 kind `{}`; computing it here",
                stage.kind.name
            ));
            let _ = cache.remove_record(key);
            None
        }
        Ok(None) => None,
        Err(e) => {
            ui.warn(&format!(
                "  pull failed  {stage_name}: {e}; computing it here"
            ));
            None
        }
    }
}

/// The params a stage receives (references removed).
pub fn params_json(stage: &crate::pipeline::Stage) -> serde_json::Value {
    serde_json::Value::Object(
        stage
            .params
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    stage.kind.param(k).map(|p| p.ty),
                    Some(ParamType::Input | ParamType::Inputs | ParamType::InputMap)
                )
            })
            .filter_map(|(k, v)| v.to_json().map(|j| (k.clone(), j)))
            .collect(),
    )
}

/// Starts `flow __stage` on a worker thread that relays its events and waits for it. The
/// child dies with this process (kill_with_parent), and the thread lives as long as it.
fn spawn_stage(i: usize, spec: ChildSpec, log: std::path::PathBuf, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let result = (|| -> Result<i32, String> {
            let exe = own_binary()?;
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
            let mut cmd = Command::new(exe);
            cmd.arg("__stage")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(stderr);
            flow_stages::process::kill_with_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start the stage process: {e}"))?;
            {
                let mut stdin = child.stdin.take().expect("piped");
                serde_json::to_writer(&mut stdin, &spec).map_err(|e| e.to_string())?;
                stdin.flush().map_err(|e| e.to_string())?;
            }
            let stdout = child.stdout.take().expect("piped");
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(event) = serde_json::from_str::<ChildEvent>(&line) {
                    let _ = tx.send(Msg::Event(i, event));
                }
            }
            let status = child.wait().map_err(|e| e.to_string())?;
            Ok(status.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
            }))
        })();
        let _ = tx.send(Msg::Exit(i, result));
    });
}

/// The binary this process runs, to start stage processes with. On Linux that is
/// `/proc/self/exe`, the running image itself: a rebuild or upgrade that replaces the file
/// during a long run must not make every later stage fail to start (it did, with "No such
/// file or directory", while cargo relinked the binary under a 20,000-stage run).
fn own_binary() -> Result<std::path::PathBuf, String> {
    let proc = std::path::Path::new("/proc/self/exe");
    if proc.exists() {
        return Ok(proc.to_path_buf());
    }
    std::env::current_exe().map_err(|e| format!("cannot find flow's binary: {e}"))
}

/// The last lines of a log file, for failure reports.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
