//! The local executor: walks the DAG, skips done keys, runs the rest as child processes of
//! this binary, up to `jobs` at a time.

pub mod child;
pub mod plan;
pub mod protocol;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use flow_stages::ParamType;

use crate::pipeline::Pipeline;
use crate::remote::Remote;
use crate::store::{Cache, FileHashes};
use crate::ui::{Status, Ui};
use plan::key_parts;
use protocol::{ChildEvent, ChildSpec, EXIT_CORRUPT_INPUT, Outputs, SpecArtifact, SpecInput};

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

#[derive(Debug, Clone)]
enum State {
    Pending,
    Running,
    Done(Outputs),
    Failed,
    Blocked,
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
    let clock = Instant::now();
    let n = pipeline.stages.len();
    let mut state = vec![State::Pending; n];
    let mut keys: Vec<Option<String>> = vec![None; n];
    let mut corrupt: Vec<Option<String>> = vec![None; n];
    let mut reused = vec![false; n];
    let mut heals = vec![0usize; n];
    let mut started: Vec<Option<Instant>> = vec![None; n];
    let mut outcome: Vec<Option<Status>> = vec![None; n];
    let mut push_failed = false;
    let mut running = 0usize;
    // Threads each running stage holds, and the stages to start once this pass has found
    // them all (so that the free cores are split among them).
    let mut threads = vec![0usize; n];
    let mut starting: Vec<(usize, ChildSpec)> = Vec::new();
    let (tx, rx) = mpsc::channel::<Msg>();
    let files = FileHashes::load(cache);
    let wanted = match opts.only {
        Some(target) => pipeline.upstream_of(target),
        None => vec![true; n],
    };

    loop {
        for i in 0..n {
            if !wanted[i] || !matches!(state[i], State::Pending) {
                continue;
            }
            let stage = &pipeline.stages[i];
            let sources = stage
                .inputs
                .iter()
                .flat_map(|b| b.sources.iter().map(|s| s.stage));
            let mut ready = true;
            for s in sources {
                match state[s] {
                    State::Done(_) => {}
                    State::Failed | State::Blocked => {
                        state[i] = State::Blocked;
                        ready = false;
                        break;
                    }
                    State::Pending | State::Running => ready = false,
                }
            }
            if matches!(state[i], State::Blocked) {
                outcome[i] = Some(Status::Blocked);
                ui.stage(
                    &stage.name,
                    Status::Blocked,
                    None,
                    "(an upstream stage failed)",
                );
                continue;
            }
            if !ready {
                continue;
            }
            let lookup = |j: usize| match &state[j] {
                State::Done(o) => Some(o.clone()),
                _ => None,
            };
            let parts = key_parts(pipeline, stage, &lookup, &files)?.expect("all inputs are done");
            let key = parts.key();
            keys[i] = Some(key.clone());
            if let Some(outputs) = cached_outputs(cache, &key)? {
                if let Some(remote) = opts.remote {
                    push_failed |= !sync_push(remote, cache, &key, &stage.name, ui);
                }
                outcome[i] = Some(Status::Cached);
                ui.stage(&stage.name, Status::Cached, Some(&key), "");
                state[i] = State::Done(outputs);
                continue;
            }
            if let Some(remote) = opts.remote
                && let Some(outputs) = pull(remote, cache, &key, &stage.name, ui)
            {
                outcome[i] = Some(Status::Cached);
                ui.stage(
                    &stage.name,
                    Status::Cached,
                    Some(&key),
                    "(pulled from the remote)",
                );
                state[i] = State::Done(outputs);
                continue;
            }
            if opts.only.is_some_and(|target| target != i) {
                outcome[i] = Some(Status::Failed);
                ui.stage(
                    &stage.name,
                    Status::Failed,
                    Some(&key),
                    "not done here nor on the remote: its own job must finish first",
                );
                state[i] = State::Failed;
                continue;
            }
            if running + starting.len() >= opts.jobs {
                continue;
            }
            let spec = ChildSpec {
                cache: cache.root().to_path_buf(),
                key: key.clone(),
                parts,
                pipeline: pipeline.name.clone(),
                stage: stage.name.clone(),
                kind: stage.kind.name.to_string(),
                params: params_json(stage),
                inputs: stage
                    .inputs
                    .iter()
                    .map(|b| SpecInput {
                        path: b.path.clone(),
                        list: b.list,
                        artifacts: b
                            .sources
                            .iter()
                            .map(|s| SpecArtifact {
                                stage: pipeline.stages[s.stage].name.clone(),
                                digest: match &state[s.stage] {
                                    State::Done(o) => o[&s.output].clone(),
                                    _ => unreachable!("inputs are done"),
                                },
                            })
                            .collect(),
                    })
                    .collect(),
                workdir: pipeline
                    .dir
                    .canonicalize()
                    .unwrap_or_else(|_| pipeline.dir.clone()),
                threads: 1,
                remote: opts.remote.map(|r| r.url().to_string()),
                device: stage.device.clone().or_else(|| opts.device.clone()),
            };
            state[i] = State::Running;
            starting.push((i, spec));
        }
        let heavy = |i: usize| holds_cores(pipeline.stages[i].kind);
        let heavy_starting = starting.iter().filter(|(i, _)| heavy(*i)).count();
        let mut shares =
            thread_shares(opts.threads, threads.iter().sum(), heavy_starting).into_iter();
        for (i, mut spec) in starting.drain(..) {
            // Data stages (tokenize, pack, ...) are short next to training and eval:
            // they use every core for their moment and hold none, so that a training run
            // started beside one is not left on a thread for its whole length.
            let share = match (opts.threads, heavy(i)) {
                (_, true) => shares.next().expect("one share per heavy stage"),
                (Threads::PerStage(t), false) => t.max(1),
                (Threads::Share(cores), false) => cores.max(1),
            };
            spec.threads = share;
            threads[i] = if heavy(i) { share } else { 0 };
            let log = cache.log_path(&spec.key);
            spawn_stage(i, spec, log, tx.clone());
            started[i] = Some(Instant::now());
            running += 1;
            ui.started(&pipeline.stages[i].name);
        }
        if running == 0 {
            break;
        }
        match rx.recv().expect("workers hold a sender while running") {
            Msg::Event(i, event) => match event {
                ChildEvent::Waiting { holder } => ui.waiting(&pipeline.stages[i].name, &holder),
                ChildEvent::Progress { len, pos, msg } => {
                    ui.progress(&pipeline.stages[i].name, len, pos, msg.as_deref())
                }
                ChildEvent::Corrupt { digest, files } => {
                    ui.warn(&format!(
                        "  damaged  input {} of {} ({}): evicted, recomputing its producer",
                        crate::key::short(&digest),
                        pipeline.stages[i].name,
                        files.join(", ")
                    ));
                    corrupt[i] = Some(digest);
                }
                ChildEvent::Done { cached } => reused[i] = cached,
                ChildEvent::Started | ChildEvent::Failed { .. } => {}
            },
            Msg::Exit(i, code) => {
                running -= 1;
                threads[i] = 0;
                let name = pipeline.stages[i].name.clone();
                let key = keys[i].clone().expect("running stages have keys");
                let secs = started[i].map_or(0.0, |t| t.elapsed().as_secs_f64());
                match code {
                    Ok(0) => match cache.read_record(&key)? {
                        Some(record) if reused[i] => {
                            outcome[i] = Some(Status::Cached);
                            ui.stage(
                                &name,
                                Status::Cached,
                                Some(&key),
                                "(run by another flow process)",
                            );
                            state[i] = State::Done(record.outputs);
                        }
                        Some(record) => {
                            if let Some(remote) = opts.remote {
                                push_failed |= !sync_push(remote, cache, &key, &name, ui);
                            }
                            outcome[i] = Some(Status::Ran);
                            ui.stage(&name, Status::Ran, Some(&key), &format!("{secs:.1}s"));
                            state[i] = State::Done(record.outputs);
                        }
                        None => {
                            outcome[i] = Some(Status::Failed);
                            ui.stage(
                                &name,
                                Status::Failed,
                                Some(&key),
                                "exited without committing",
                            );
                            state[i] = State::Failed;
                        }
                    },
                    Ok(EXIT_CORRUPT_INPUT) if corrupt[i].is_some() => {
                        let digest = corrupt[i].take().expect("checked");
                        let producers = producers_of(pipeline, i, &digest, &state);
                        let mut healed = false;
                        for p in producers {
                            heals[p] += 1;
                            if heals[p] > MAX_HEALS {
                                continue;
                            }
                            if let Some(k) = &keys[p] {
                                cache.remove_record(k)?;
                            }
                            state[p] = State::Pending;
                            healed = true;
                        }
                        if healed {
                            state[i] = State::Pending;
                        } else {
                            outcome[i] = Some(Status::Failed);
                            ui.stage(
                                &name,
                                Status::Failed,
                                Some(&key),
                                "input damaged again after recomputing",
                            );
                            state[i] = State::Failed;
                        }
                    }
                    other => {
                        outcome[i] = Some(Status::Failed);
                        let why = match other {
                            Ok(c) => format!("exit status {c}"),
                            Err(e) => e,
                        };
                        ui.stage(&name, Status::Failed, Some(&key), &why);
                        let log = cache.log_path(&key);
                        ui.warn(&format!(
                            "--- last lines of {} ---\n{}",
                            log.display(),
                            tail(&log, 20)
                        ));
                        state[i] = State::Failed;
                    }
                }
            }
        }
    }

    let known: BTreeMap<String, String> = pipeline
        .stages
        .iter()
        .zip(&keys)
        .filter_map(|(s, k)| k.clone().map(|k| (s.name.clone(), k)))
        .collect();
    files.save()?;
    let count = |s: Status| outcome.iter().filter(|o| **o == Some(s)).count();
    let summary = Summary {
        ran: count(Status::Ran),
        cached: count(Status::Cached),
        failed: count(Status::Failed),
        blocked: count(Status::Blocked),
        push_failed,
    };
    if summary.ran > 0 {
        cache.write_index(&pipeline.name, &known)?;
    }
    ui.summary(
        summary.ran,
        summary.cached,
        summary.failed,
        summary.blocked,
        clock.elapsed().as_secs_f64(),
    );
    Ok(summary)
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
fn cached_outputs(cache: &Cache, key: &str) -> anyhow::Result<Option<Outputs>> {
    if let Some(record) = cache.done(key)? {
        return Ok(Some(record.outputs));
    }
    let Some(record) = cache.read_record(key)? else {
        return Ok(None);
    };
    for digest in record.outputs.values() {
        if !cache.materialize(digest)? {
            cache.remove_record(key)?;
            return Ok(None);
        }
    }
    Ok(Some(record.outputs))
}

/// Makes sure the remote has a done key (pushing it if not); false after a failure, which is
/// reported: the local result stands, but the team would not see it.
fn sync_push(remote: &Remote, cache: &Cache, key: &str, stage: &str, ui: &Ui) -> bool {
    let result = match cache.read_record(key) {
        Ok(Some(record)) => remote.push(cache, &record).map(|_| ()),
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
fn pull(remote: &Remote, cache: &Cache, key: &str, stage: &str, ui: &Ui) -> Option<Outputs> {
    match remote.pull(cache, key) {
        Ok(Some((record, _))) => Some(record.outputs),
        Ok(None) => None,
        Err(e) => {
            ui.warn(&format!("  pull failed  {stage}: {e}; computing it here"));
            None
        }
    }
}

/// The stages whose output `digest` stage `i` consumed.
fn producers_of(pipeline: &Pipeline, i: usize, digest: &str, state: &[State]) -> Vec<usize> {
    let mut out: Vec<usize> = pipeline.stages[i]
        .inputs
        .iter()
        .flat_map(|b| b.sources.iter())
        .filter(|s| matches!(&state[s.stage], State::Done(o) if o.get(&s.output).is_some_and(|d| d == digest)))
        .map(|s| s.stage)
        .collect();
    out.sort();
    out.dedup();
    out
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
            let exe =
                std::env::current_exe().map_err(|e| format!("cannot find flow's binary: {e}"))?;
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

/// The last lines of a log file, for failure reports.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
