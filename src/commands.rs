//! The subcommands: thin glue between the CLI and the engine library.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use flow::exec::plan::{KeyState, resolve, resolve_with};
use flow::exec::protocol::{ChildSpec, JobSpec};
use flow::exec::{self, RunOptions, Threads};
use flow::key::short;
use flow::pipeline::{ExecutorKind, Overrides, Pipeline};
use flow::remote::{Remote, Transfer};
use flow::slurm::{self, ledger::Ledger};
use flow::store::{Cache, KeyLock};
use flow::ui::{Status, Ui};
use serde_json::json;

use crate::{DagFormat, ExecutorArg, PipelineArgs, RunArgs};

/// Invalid pipeline or usage.
const EXIT_INVALID: u8 = 2;

pub struct Context {
    pub cache: Option<PathBuf>,
    pub remote: Option<String>,
    pub verbose: bool,
}

type CmdResult = anyhow::Result<ExitCode>;

/// Loads and validates a pipeline, printing every problem (as JSON lines with `json`).
fn load(p: &PipelineArgs, json: bool) -> Result<Pipeline, ExitCode> {
    let overrides = Overrides {
        profiles: p.profiles.clone(),
        sets: p.sets.clone(),
    };
    match Pipeline::load(&p.pipeline, &overrides) {
        Ok(mut pipeline) => {
            if let Some(salt) = &p.salt {
                pipeline.salt = salt.clone();
            }
            Ok(pipeline)
        }
        Err(diags) => {
            if json {
                for d in &diags.0 {
                    println!("{}", d.to_json());
                }
            }
            eprintln!("{diags}");
            Err(ExitCode::from(EXIT_INVALID))
        }
    }
}

/// The pipeline for the rest of the command, never dropped: a command runs once per
/// process, and freeing 100,000 expanded stages before exiting was 9% of `flow plan`.
macro_rules! load_or_exit {
    ($p:expr, $json:expr) => {
        match load($p, $json) {
            Ok(p) => std::mem::ManuallyDrop::new(p),
            Err(code) => return Ok(code),
        }
    };
}

impl Context {
    fn open_cache(&self, pipeline: Option<&Pipeline>) -> anyhow::Result<Cache> {
        let root = self
            .cache
            .clone()
            .or_else(|| pipeline.and_then(|p| p.cache.clone()))
            .unwrap_or_else(|| PathBuf::from("cache"));
        Cache::open(&root).with_context(|| format!("opening the cache at {}", root.display()))
    }

    /// The remote cache named by --remote / FLOW_REMOTE, else by the pipeline, if any.
    fn open_remote(&self, pipeline: &Pipeline) -> anyhow::Result<Option<Remote>> {
        match self.remote.clone().or_else(|| pipeline.remote.clone()) {
            Some(url) => Ok(Some(Remote::open(&url)?)),
            None => Ok(None),
        }
    }

    fn require_remote(&self, pipeline: &Pipeline) -> anyhow::Result<Remote> {
        self.open_remote(pipeline)?.ok_or_else(|| {
            anyhow::anyhow!("no remote: pass --remote URL, set FLOW_REMOTE or [pipeline] remote")
        })
    }

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
        Ok(
            if summary.failed + summary.blocked > 0 || summary.push_failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            },
        )
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
        Ok(if failed + blocked > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }

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
        Ok(
            if summary.failed + summary.blocked > 0 || summary.push_failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            },
        )
    }

    pub fn cancel(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let ids = slurm::cancel(&pipeline, &cache)?;
        if json {
            println!("{}", json!({"event": "cancelled", "jobs": ids}));
        } else if ids.is_empty() {
            println!("no queued or running jobs of {}", pipeline.name);
        } else {
            println!("cancelled {} job(s): {}", ids.len(), ids.join(" "));
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn plan(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        // One write per 64 KiB, not per line: plans of 100,000 stages print 100,000 lines.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        // Never dropped, like the pipeline: freeing 100,000 records and key parts at exit
        // was 11% of planning 100,000 done stages.
        let states = std::mem::ManuallyDrop::new(resolve(&pipeline, &cache)?);
        let index = cache.read_index(&pipeline.name);
        let (mut would, mut cached) = (0, 0);
        for (stage, state) in pipeline.stages.iter().zip(states.iter()) {
            let (status, reason) = match state {
                KeyState::Known {
                    record: Some(_), ..
                } => (Status::Cached, String::new()),
                KeyState::Known { parts, key, .. } => {
                    let reason = if KeyLock::is_held(&cache, key) {
                        "running in another flow process".to_string()
                    } else {
                        match index.get(&stage.name) {
                            Some(old) if old == key => {
                                "missing: its record or outputs were removed".into()
                            }
                            Some(old) => match cache.read_record(old)? {
                                Some(r) => {
                                    format!("changed: {}", parts.differences(&r.parts).join("; "))
                                }
                                None => format!(
                                    "changed: earlier key {} is no longer cached",
                                    short(old)
                                ),
                            },
                            None => "missing: never run".to_string(),
                        }
                    };
                    (Status::WouldRun, reason)
                }
                KeyState::Waiting { on } => (
                    Status::WouldRun,
                    format!("upstream `{}` would run first", pipeline.stages[*on].name),
                ),
            };
            match status {
                Status::Cached => cached += 1,
                _ => would += 1,
            }
            let budget = training_budget(&pipeline, stage);
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({"event": "stage", "stage": stage.name, "status": status.as_str(),
                           "key": state.key(), "reason": reason, "budget": budget})
                )?;
            } else if status != Status::Cached || self.verbose {
                let k = state.key().map(short).unwrap_or("?");
                let budget = budget.map(|b| format!("  [{b}]")).unwrap_or_default();
                writeln!(
                    out,
                    "{:>9}  {}  {k}  {reason}{budget}",
                    status.as_str(),
                    stage.name
                )?;
            }
        }
        if json {
            writeln!(
                out,
                "{}",
                json!({"event": "summary", "would_run": would, "cached": cached})
            )?;
        } else {
            writeln!(out, "{would} would run, {cached} cached")?;
        }
        Ok(ExitCode::SUCCESS)
    }

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

    pub fn explain(&self, p: &PipelineArgs, name: &str, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let i = find_stage(&pipeline, name)?;
        let states = resolve(&pipeline, &cache)?;
        let stage = &pipeline.stages[i];
        let inputs: Vec<serde_json::Value> = stage
            .inputs
            .iter()
            .map(|b| {
                json!({"param": b.path, "from": b.sources.iter().map(|s| {
                    let producer = &pipeline.stages[s.stage];
                    let digest = states[s.stage].record().map(|r| r.outputs[&s.output].clone());
                    json!({"stage": producer.name, "output": s.output, "digest": digest})
                }).collect::<Vec<_>>()})
            })
            .collect();
        let (parts, key, done) = match &states[i] {
            KeyState::Known { parts, key, record } => (Some(parts), Some(key), record.is_some()),
            KeyState::Waiting { .. } => (None, None, false),
        };
        let params: serde_json::Map<_, _> = stage
            .params
            .iter()
            .map(|(k, v)| (k.clone(), json!(v.canonical())))
            .collect();
        if json {
            println!(
                "{}",
                json!({"stage": stage.name, "kind": stage.kind.name, "kind_version": stage.kind.version,
                       "format": flow::key::KEY_FORMAT, "params": params, "inputs": inputs,
                       "salt": pipeline.salt, "key": key, "done": done, "parts": parts})
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!("stage        {}", stage.name);
        println!("key format   {}", flow::key::KEY_FORMAT);
        println!(
            "kind         {} (version {})",
            stage.kind.name, stage.kind.version
        );
        for (k, v) in &params {
            println!("param        {k} = {}", v.as_str().unwrap_or_default());
        }
        for b in &stage.inputs {
            for s in &b.sources {
                let producer = &pipeline.stages[s.stage];
                let digest = states[s.stage]
                    .record()
                    .map(|r| r.outputs[&s.output].clone())
                    .unwrap_or_else(|| "(not computed yet)".into());
                println!(
                    "input        {} <- {}.{} = {digest}",
                    b.path, producer.name, s.output
                );
            }
        }
        println!("salt         {:?}", pipeline.salt);
        match key {
            Some(k) => println!(
                "key          {k} ({})",
                if done { "done" } else { "missing" }
            ),
            None => println!("key          unknown until its inputs are computed"),
        }
        Ok(ExitCode::SUCCESS)
    }

    pub fn dag(&self, p: &PipelineArgs, format: DagFormat) -> CmdResult {
        let pipeline = load_or_exit!(p, false);
        print!(
            "{}",
            match format {
                DagFormat::Dot => flow::graph::to_dot(&pipeline),
                DagFormat::Mermaid => flow::graph::to_mermaid(&pipeline),
            }
        );
        Ok(ExitCode::SUCCESS)
    }

    pub fn show(&self, p: &PipelineArgs, name: &str, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let i = find_stage(&pipeline, name)?;
        let states = resolve(&pipeline, &cache)?;
        let (key, record) = match &states[i] {
            KeyState::Known {
                key,
                record: Some(r),
                ..
            } => (key.clone(), r.clone()),
            _ => bail!(
                "stage `{name}` is not done: run `flow run {}` first",
                p.pipeline.display()
            ),
        };
        let mut outputs = serde_json::Map::new();
        let mut files = Vec::new();
        for (out, digest) in &record.outputs {
            let bad = cache.check_artifact(digest)?;
            if !bad.is_empty() {
                cache.evict_artifact(digest, &bad)?;
                cache.remove_record(&key)?;
                bail!(
                    "output `{out}` of `{name}` was damaged ({}); it was evicted: run the pipeline again",
                    bad.iter()
                        .map(|b| b.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let dir = cache.view_path(digest);
            if let Some(m) = cache.read_manifest(digest)? {
                files.extend(
                    m.files
                        .into_iter()
                        .map(|f| json!({"output": out, "path": f.path, "size": f.size})),
                );
            }
            outputs.insert(out.clone(), json!(dir.display().to_string()));
        }
        let default = stage_default_output(&pipeline, i);
        let output = outputs
            .get(default)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if json {
            println!(
                "{}",
                json!({"stage": name, "key": key, "output": output, "outputs": outputs,
                       "files": files, "metrics": record.metrics, "duration_s": record.duration_s})
            );
        } else {
            println!("stage    {name}\nkey      {key}");
            for (n, d) in &outputs {
                println!("output   {n} = {}", d.as_str().unwrap_or_default());
            }
            for f in &files {
                println!(
                    "  {:>10}  {}/{}",
                    f["size"],
                    f["output"].as_str().unwrap_or_default(),
                    f["path"].as_str().unwrap_or_default()
                );
            }
            for (k, v) in &record.metrics {
                println!("metric   {k} = {v}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }

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
            let args = PipelineArgs {
                pipeline: path.clone(),
                sets: vec![],
                profiles: profiles.to_vec(),
                salt: None,
            };
            let pipeline = load_or_exit!(&args, json);
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

    /// The remote named by --remote / FLOW_REMOTE (no pipeline to ask).
    fn global_remote(&self) -> anyhow::Result<Remote> {
        let url = self
            .remote
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no remote: pass --remote URL or set FLOW_REMOTE"))?;
        Ok(Remote::open(&url)?)
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
            let args = PipelineArgs {
                pipeline: path.clone(),
                sets: vec![],
                profiles: profiles.to_vec(),
                salt: None,
            };
            let pipeline = load_or_exit!(&args, json);
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

    pub fn verify_remote(&self, json: bool) -> CmdResult {
        let remote = self.global_remote()?;
        let tmp = std::env::temp_dir();
        let report = remote.verify(&tmp)?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "checked {} remote objects: {} damaged, {} missing; {} damaged and {} missing manifests; {} run records evicted",
                report.objects_checked,
                report.bad_objects.len(),
                report.missing_objects.len(),
                report.bad_manifests.len(),
                report.missing_manifests.len(),
                report.evicted_records.len()
            );
            for key in &report.evicted_records {
                println!("  evicted {key} (`flow push` from a machine that has it repairs it)");
            }
        }
        Ok(if report.is_clean() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    pub fn verify(&self, json: bool) -> CmdResult {
        let cache = self.open_cache(None)?;
        let report = cache.verify()?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "checked {} objects ({:.1} MiB): {} damaged objects, {} damaged artifacts, {} run records evicted",
                report.objects_checked,
                report.bytes_checked as f64 / (1024.0 * 1024.0),
                report.bad_objects.len(),
                report.bad_artifacts.len(),
                report.evicted_records.len()
            );
            for o in &report.bad_objects {
                println!("  damaged object {o}");
            }
            for k in &report.evicted_records {
                println!("  evicted run {k}: it will run again");
            }
        }
        Ok(if report.is_clean() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
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

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn find_stage(pipeline: &Pipeline, name: &str) -> anyhow::Result<usize> {
    pipeline.stage_index(name).ok_or_else(|| {
        let names: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
        anyhow::anyhow!(
            "no stage `{name}` in {} (stages: {})",
            pipeline.path.display(),
            names.join(", ")
        )
    })
}

fn stage_default_output(pipeline: &Pipeline, i: usize) -> &'static str {
    pipeline.stages[i].kind.outputs[0]
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

/// `flow kinds`: the reference of every stage kind, from the registry itself.
pub fn kinds(only: Option<&str>, markdown: bool) -> CmdResult {
    use flow_stages::Default as D;
    let kinds: Vec<_> = flow_stages::registry()
        .into_iter()
        .filter(|k| only.is_none_or(|o| o == k.name))
        .collect();
    if kinds.is_empty() {
        let names: Vec<&str> = flow_stages::registry().iter().map(|k| k.name).collect();
        bail!(
            "no kind `{}` (kinds: {})",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    for k in kinds {
        let default = |d: &D| match d {
            D::Required => "required".to_string(),
            D::Optional => "none".to_string(),
            D::Value(v) => format!("`{v}`"),
            D::PipelineSeed => "`[pipeline] seed`".to_string(),
        };
        if markdown {
            println!("### `{}` (version {})\n{}.\n", k.name, k.version, k.doc);
            println!(
                "Outputs: {}.\n",
                k.outputs
                    .iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("| param | type | default | meaning |\n|---|---|---|---|");
            for p in k.params {
                println!(
                    "| `{}` | {} | {} | {} |",
                    p.name,
                    p.ty.describe(),
                    default(&p.default),
                    p.doc
                );
            }
            println!();
        } else {
            println!(
                "{} (v{}): {}\n  outputs: {}",
                k.name,
                k.version,
                k.doc,
                k.outputs.join(", ")
            );
            for p in k.params {
                println!(
                    "  {:<16} {:<40} {:<18} {}",
                    p.name,
                    p.ty.describe(),
                    default(&p.default),
                    p.doc
                );
            }
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a training stage will do, for `flow plan`: its duration in tokens, steps and
/// epochs where the rows' length is known from the `pack` stage that feeds it.
fn training_budget(pipeline: &Pipeline, stage: &flow::pipeline::Stage) -> Option<String> {
    if !matches!(stage.kind.name, "train-full" | "train-lora") {
        return None;
    }
    let int = |s: &flow::pipeline::Stage, k: &str| match s.params.get(k) {
        Some(flow::key::Val::Int(v)) => Some(*v),
        _ => None,
    };
    let global = int(stage, "global_batch")?;
    let seq = stage
        .inputs
        .iter()
        .find(|b| b.path == "data")
        .and_then(|b| b.sources.first())
        .and_then(|s| int(&pipeline.stages[s.stage], "seq_len"));
    let human = |t: f64| {
        if t >= 1e9 {
            format!("{:.2}B", t / 1e9)
        } else if t >= 1e6 {
            format!("{:.1}M", t / 1e6)
        } else {
            format!("{t:.0}")
        }
    };
    let per_step = seq.map(|s| (global * s) as f64);
    let text = match (
        int(stage, "steps"),
        int(stage, "tokens"),
        stage.params.get("epochs"),
    ) {
        (Some(steps), _, _) => match per_step {
            Some(t) => format!(
                "{steps} steps x {global} rows x {} = {} tokens",
                seq?,
                human(steps as f64 * t)
            ),
            None => format!("{steps} steps of {global} rows"),
        },
        (_, Some(tokens), _) => match per_step {
            Some(t) => format!(
                "{} tokens = {} steps x {global} rows x {}",
                human(tokens as f64),
                (tokens as f64 / t).ceil(),
                seq?
            ),
            None => format!("{} tokens", human(tokens as f64)),
        },
        (_, _, Some(flow::key::Val::Float(e))) => format!("{e} epochs, {global} rows per step"),
        (_, _, Some(flow::key::Val::Int(e))) => format!("{e} epochs, {global} rows per step"),
        _ => return None,
    };
    Some(text)
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
