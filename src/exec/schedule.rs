//! The local scheduler: each stage's work done once, whatever the pipeline's size.
//!
//! Every stage counts the producers it still waits for; a stage whose count reaches zero goes
//! on a ready queue (lowest index first, the file's order where the DAG allows). A free job
//! slot is checked before a ready stage is looked at; only then is its key computed (once)
//! and the cache consulted (once). A finished stage decrements its consumers' counts, a
//! failed one blocks its pending descendants: each edge is walked a bounded number of times,
//! so a run of 100,000 stages costs 100 times a run of 1,000 (Snakemake and Nextflow
//! schedule the same way).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::mpsc;
use std::time::Instant;

use super::plan::key_parts;
use super::protocol::{
    ChildEvent, ChildSpec, EXIT_CORRUPT_INPUT, Outputs, SpecArtifact, SpecInput,
};
use super::{
    MAX_HEALS, Msg, RunOptions, Summary, Threads, cached_outputs, has_every_output, holds_cores,
    params_json, pull, spawn_stage, sync_push, tail, thread_shares,
};
use crate::pipeline::Pipeline;
use crate::store::{Cache, FileHashes};
use crate::ui::{Status, Ui};

#[derive(Debug, Clone)]
enum State {
    /// Not part of this run (`only` names another stage that does not need it).
    Unwanted,
    /// Waiting for producers, or ready and not looked at yet.
    Pending,
    Running,
    Done(Outputs),
    Failed,
    Blocked,
}

/// What looking at a ready stage found.
enum Found {
    Done(Outputs),
    Failed,
    Run(Box<ChildSpec>),
}

/// One `flow run`'s bookkeeping, indexed by stage.
pub(super) struct Scheduler<'a> {
    pipeline: &'a Pipeline,
    cache: &'a Cache,
    opts: &'a RunOptions<'a>,
    ui: &'a mut Ui,
    files: FileHashes,
    state: Vec<State>,
    /// Producers each stage still waits for.
    waiting: Vec<usize>,
    consumers: Vec<Vec<usize>>,
    ready: BinaryHeap<Reverse<usize>>,
    keys: Vec<Option<String>>,
    corrupt: Vec<Option<String>>,
    reused: Vec<bool>,
    heals: Vec<usize>,
    started: Vec<Option<Instant>>,
    outcome: Vec<Option<Status>>,
    /// Threads each running stage holds, and their sum.
    threads: Vec<usize>,
    held: usize,
    running: usize,
    push_failed: bool,
}

impl<'a> Scheduler<'a> {
    pub(super) fn new(
        pipeline: &'a Pipeline,
        cache: &'a Cache,
        opts: &'a RunOptions<'a>,
        ui: &'a mut Ui,
    ) -> Scheduler<'a> {
        let n = pipeline.stages.len();
        let wanted = match opts.only {
            Some(target) => pipeline.upstream_of(target),
            None => vec![true; n],
        };
        let mut state = vec![State::Unwanted; n];
        let mut waiting = vec![0; n];
        let mut ready = BinaryHeap::new();
        for i in (0..n).filter(|i| wanted[*i]) {
            state[i] = State::Pending;
            waiting[i] = pipeline.producers(i).len();
            if waiting[i] == 0 {
                ready.push(Reverse(i));
            }
        }
        ui.set_total(wanted.iter().filter(|w| **w).count());
        Scheduler {
            pipeline,
            cache,
            opts,
            ui,
            files: FileHashes::load(cache),
            state,
            waiting,
            consumers: pipeline.consumers(),
            ready,
            keys: vec![None; n],
            corrupt: vec![None; n],
            reused: vec![false; n],
            heals: vec![0; n],
            started: vec![None; n],
            outcome: vec![None; n],
            threads: vec![0; n],
            held: 0,
            running: 0,
            push_failed: false,
        }
    }

    /// Runs until no stage can make progress.
    pub(super) fn run(mut self) -> anyhow::Result<Summary> {
        let clock = Instant::now();
        let (tx, rx) = mpsc::channel::<Msg>();
        loop {
            let mut starting: Vec<(usize, ChildSpec)> = Vec::new();
            while self.running + starting.len() < self.opts.jobs.max(1) {
                let Some(Reverse(i)) = self.ready.pop() else {
                    break;
                };
                // A healed producer can send a stage back to waiting after it was queued.
                if !matches!(self.state[i], State::Pending) || self.waiting[i] > 0 {
                    continue;
                }
                match self.look_at(i)? {
                    Found::Done(outputs) => self.complete(i, outputs),
                    Found::Failed => self.fail(i),
                    Found::Run(spec) => {
                        self.state[i] = State::Running;
                        starting.push((i, *spec));
                    }
                }
            }
            self.start(starting, &tx);
            if self.running == 0 {
                break;
            }
            self.ui.flush();
            match rx.recv().expect("workers hold a sender while running") {
                Msg::Event(i, event) => self.on_event(i, event),
                Msg::Exit(i, code) => self.on_exit(i, code)?,
            }
        }
        self.finish(clock)
    }

    /// Computes a ready stage's key and finds it done here, done on the remote, or to run.
    fn look_at(&mut self, i: usize) -> anyhow::Result<Found> {
        let (pipeline, cache, opts) = (self.pipeline, self.cache, self.opts);
        let stage = &pipeline.stages[i];
        let state = &self.state;
        let lookup = |j: usize, name: &str| match &state[j] {
            State::Done(o) => o.get(name).cloned(),
            _ => None,
        };
        let parts = key_parts(pipeline, stage, &lookup, &self.files)?
            .map_err(|_| anyhow::anyhow!("stage `{}` was ready before its inputs", stage.name))?;
        let key = parts.key();
        self.keys[i] = Some(key.clone());
        if let Some(outputs) = cached_outputs(cache, &key, stage.kind)? {
            if let Some(remote) = opts.remote {
                self.push_failed |= !sync_push(remote, cache, &key, &stage.name, self.ui);
            }
            self.report(i, Status::Cached, "");
            return Ok(Found::Done(outputs));
        }
        if let Some(remote) = opts.remote
            && let Some(outputs) = pull(remote, cache, &key, stage, self.ui)
        {
            self.report(i, Status::Cached, "(pulled from the remote)");
            return Ok(Found::Done(outputs));
        }
        if opts.only.is_some_and(|target| target != i) {
            self.report(
                i,
                Status::Failed,
                "not done here nor on the remote: its own job must finish first",
            );
            return Ok(Found::Failed);
        }
        let inputs = stage
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
                        digest: match &self.state[s.stage] {
                            State::Done(o) => o[&s.output].clone(),
                            _ => unreachable!("inputs are done"),
                        },
                    })
                    .collect(),
            })
            .collect();
        Ok(Found::Run(Box::new(ChildSpec {
            cache: cache.root().to_path_buf(),
            key,
            parts,
            pipeline: pipeline.name.clone(),
            stage: stage.name.clone(),
            kind: stage.kind.name.to_string(),
            params: params_json(stage),
            inputs,
            workdir: pipeline
                .dir
                .canonicalize()
                .unwrap_or_else(|_| pipeline.dir.clone()),
            threads: 1,
            remote: opts.remote.map(|r| r.url().to_string()),
            device: stage.device.clone().or_else(|| opts.device.clone()),
        })))
    }

    /// Records a stage's final status for this run and shows it.
    fn report(&mut self, i: usize, status: Status, detail: &str) {
        self.outcome[i] = Some(status);
        let key = self.keys[i].as_deref();
        self.ui
            .stage(&self.pipeline.stages[i].name, status, key, detail);
    }

    /// A stage is done: its consumers wait for one producer less.
    fn complete(&mut self, i: usize, outputs: Outputs) {
        self.state[i] = State::Done(outputs);
        for &c in &self.consumers[i] {
            if matches!(self.state[c], State::Pending) {
                self.waiting[c] -= 1;
                if self.waiting[c] == 0 {
                    self.ready.push(Reverse(c));
                }
            }
        }
    }

    /// A stage failed: every pending stage downstream of it is blocked.
    fn fail(&mut self, i: usize) {
        self.state[i] = State::Failed;
        let mut todo = self.consumers[i].clone();
        while let Some(c) = todo.pop() {
            if !matches!(self.state[c], State::Pending) {
                continue;
            }
            self.state[c] = State::Blocked;
            self.report(c, Status::Blocked, "(an upstream stage failed)");
            todo.extend_from_slice(&self.consumers[c]);
        }
    }

    /// Starts the stages found this pass, splitting the free cores among those that hold them.
    fn start(&mut self, starting: Vec<(usize, ChildSpec)>, tx: &mpsc::Sender<Msg>) {
        let heavy = |i: usize| holds_cores(self.pipeline.stages[i].kind);
        let heavy_starting = starting.iter().filter(|(i, _)| heavy(*i)).count();
        let mut shares = thread_shares(self.opts.threads, self.held, heavy_starting).into_iter();
        for (i, mut spec) in starting {
            // Data stages (tokenize, pack, ...) are short next to training and eval:
            // they use every core for their moment and hold none, so that a training run
            // started beside one is not left on a thread for its whole length.
            let share = match (self.opts.threads, heavy(i)) {
                (_, true) => shares.next().expect("one share per heavy stage"),
                (Threads::PerStage(t), false) => t.max(1),
                (Threads::Share(cores), false) => cores.max(1),
            };
            spec.threads = share;
            self.threads[i] = if heavy(i) { share } else { 0 };
            self.held += self.threads[i];
            let log = self.cache.log_path(&spec.key);
            spawn_stage(i, spec, log, tx.clone());
            self.started[i] = Some(Instant::now());
            self.running += 1;
            self.ui.started(&self.pipeline.stages[i].name);
        }
    }

    fn on_event(&mut self, i: usize, event: ChildEvent) {
        let name = &self.pipeline.stages[i].name;
        match event {
            ChildEvent::Waiting { holder } => self.ui.waiting(name, &holder),
            ChildEvent::Progress { len, pos, msg } => {
                self.ui.progress(name, len, pos, msg.as_deref())
            }
            ChildEvent::Corrupt { digest, files } => {
                self.ui.warn(&format!(
                    "  damaged  input {} of {name} ({}): evicted, recomputing its producer",
                    crate::key::short(&digest),
                    files.join(", ")
                ));
                self.corrupt[i] = Some(digest);
            }
            ChildEvent::Done { cached } => self.reused[i] = cached,
            ChildEvent::Started | ChildEvent::Failed { .. } => {}
        }
    }

    fn on_exit(&mut self, i: usize, code: Result<i32, String>) -> anyhow::Result<()> {
        self.running -= 1;
        self.held -= std::mem::take(&mut self.threads[i]);
        let key = self.keys[i].clone().expect("running stages have keys");
        let secs = self.started[i].map_or(0.0, |t| t.elapsed().as_secs_f64());
        match code {
            Ok(0) => match self
                .cache
                .read_record(&key)?
                .filter(|r| has_every_output(&r.outputs, self.pipeline.stages[i].kind))
            {
                Some(record) if self.reused[i] => {
                    self.report(i, Status::Cached, "(run by another flow process)");
                    self.complete(i, record.outputs);
                }
                Some(record) => {
                    if let Some(remote) = self.opts.remote {
                        let name = &self.pipeline.stages[i].name;
                        self.push_failed |= !sync_push(remote, self.cache, &key, name, self.ui);
                    }
                    self.report(i, Status::Ran, &format!("{secs:.1}s"));
                    self.complete(i, record.outputs);
                }
                None => {
                    self.report(
                        i,
                        Status::Failed,
                        "exited without committing a record of every output",
                    );
                    self.fail(i);
                }
            },
            Ok(EXIT_CORRUPT_INPUT) if self.corrupt[i].is_some() => {
                let digest = self.corrupt[i].take().expect("checked");
                if !self.heal(i, &digest)? {
                    self.report(i, Status::Failed, "input damaged again after recomputing");
                    self.fail(i);
                }
            }
            other => {
                let why = match other {
                    Ok(c) => format!("exit status {c}"),
                    Err(e) => e,
                };
                self.report(i, Status::Failed, &why);
                let log = self.cache.log_path(&key);
                self.ui.warn(&format!(
                    "--- last lines of {} ---\n{}",
                    log.display(),
                    tail(&log, 20)
                ));
                self.fail(i);
            }
        }
        Ok(())
    }

    /// Sends the producers of a damaged input back to be recomputed (each at most
    /// [`MAX_HEALS`] times) and stage `i` back to wait for them; false when none may be.
    fn heal(&mut self, i: usize, digest: &str) -> anyhow::Result<bool> {
        let mut healed = Vec::new();
        for p in producers_of(self.pipeline, i, digest, &self.state) {
            self.heals[p] += 1;
            if self.heals[p] > MAX_HEALS {
                continue;
            }
            if let Some(k) = &self.keys[p] {
                self.cache.remove_record(k)?;
            }
            healed.push(p);
        }
        if healed.is_empty() {
            return Ok(false);
        }
        // Every healed producer is pending before any count is taken, so that one healed
        // producer feeding another makes the second wait for the first.
        self.state[i] = State::Pending;
        for &p in &healed {
            self.state[p] = State::Pending;
        }
        for &p in &healed {
            // Consumers that have not started count the producer as missing again.
            for &c in &self.consumers[p] {
                if matches!(self.state[c], State::Pending) {
                    self.waiting[c] += 1;
                }
            }
        }
        for &p in &healed {
            if self.waiting[p] == 0 {
                self.ready.push(Reverse(p));
            }
        }
        Ok(true)
    }

    fn finish(self, clock: Instant) -> anyhow::Result<Summary> {
        self.files.save()?;
        let count = |s: Status| self.outcome.iter().filter(|o| **o == Some(s)).count();
        let summary = Summary {
            ran: count(Status::Ran),
            cached: count(Status::Cached),
            failed: count(Status::Failed),
            blocked: count(Status::Blocked),
            push_failed: self.push_failed,
        };
        if summary.ran > 0 {
            let known: BTreeMap<String, String> = self
                .pipeline
                .stages
                .iter()
                .zip(&self.keys)
                .filter_map(|(s, k)| k.clone().map(|k| (s.name.clone(), k)))
                .collect();
            self.cache.write_index(&self.pipeline.name, &known)?;
        }
        self.ui.summary(
            summary.ran,
            summary.cached,
            summary.failed,
            summary.blocked,
            clock.elapsed().as_secs_f64(),
        );
        Ok(summary)
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
