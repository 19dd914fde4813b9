//! The Slurm executor: every stage that is not done becomes one `sbatch` job running
//! `flow __job`, the same stage process a local run starts, with `afterok` dependencies that
//! mirror the DAG. Slurm orders the work; flow need not stay attached. Artifacts travel
//! through the remote cache (S3 or a shared filesystem): a job pulls its inputs, runs, pushes
//! its outputs and commits the run record last, exactly as a local run does.
//!
//! A downstream stage's key depends on its inputs' digests, which exist only once the jobs
//! producing them finish; so a job resolves its own key when it starts (from the remote's run
//! records), and submission identifies work by a *recipe*: the key with every not-yet-known
//! input digest replaced by its producer's recipe. Equal recipes mean equal work, which is
//! how a second submission recognises jobs already queued or running.

pub mod ledger;
pub mod scheduler;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::exec::plan::{KeyState, key_parts, resolve_with};
use crate::exec::protocol::JobSpec;
use crate::pipeline::{JobResources, Pipeline};
use crate::remote::{Remote, RemoteError};
use crate::store::{Cache, FileHashes, KeyLock, StoreError};
use crate::ui::{Status, Ui};
use ledger::{JobEntry, Ledger};
use scheduler::{JobInfo, SlurmError};

/// Why submitting, following or cancelling jobs failed.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Slurm(#[from] SlurmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("submitting `{stage}`: {source}")]
    Submit { stage: String, source: SlurmError },
}

pub type Result<T> = std::result::Result<T, Error>;

/// The job that will produce each stage that is not done yet (None: done already).
pub type Jobs = Vec<Option<String>>;

/// Keys as far as the local cache and the remote's run records know them (records only:
/// nothing is downloaded).
pub fn resolve_remote(
    pipeline: &Pipeline,
    cache: &Cache,
    remote: &Remote,
) -> Result<Vec<KeyState>> {
    resolve_with(pipeline, cache, |_, key| -> Result<_> {
        Ok(remote.done_record(key)?)
    })
}

/// Each stage's recipe: its key, where its inputs are known; otherwise the key computed with
/// `recipe:<producer recipe>/<output>` standing for each unknown input digest.
pub fn recipes(
    pipeline: &Pipeline,
    states: &[KeyState],
    files: &FileHashes,
) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(pipeline.stages.len());
    for stage in &pipeline.stages {
        let lookup = |j: usize, name: &str| match states[j].record() {
            Some(r) => r.outputs.get(name).cloned(),
            None => Some(format!("recipe:{}/{name}", out[j])),
        };
        let parts = key_parts(pipeline, stage, &lookup, files)?
            .expect("every producer has outputs or a recipe");
        out.push(parts.key());
    }
    Ok(out)
}

/// What the jobs of a stage ask for: `[executor]`, then `[executor.stage.GROUP]`, then
/// `[executor.stage.NAME]`. GPUs go only to stages that use a device unless set per stage.
fn resources(pipeline: &Pipeline, i: usize) -> JobResources {
    let stage = &pipeline.stages[i];
    let settings = &pipeline.executor;
    let mut res = settings.job.clone();
    if !stage.kind.uses_device {
        res.gpus = None;
    }
    for name in [&stage.group, &stage.name] {
        if let Some((_, over)) = settings.stages.get(name.as_str()) {
            res = res.overlay(over);
        }
    }
    res
}

/// What a job's `--comment` says: its recipe and the remote it pushes to, so that a job
/// counts as the same work only for submitters that share that remote.
fn job_comment(recipe: &str, remote: &Remote) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"flow-slurm-v1\0");
    h.update(recipe.as_bytes());
    h.update(b"\0");
    h.update(remote.url().as_bytes());
    format!("flow:{}", h.finalize().to_hex())
}

fn sbatch_args(
    pipeline: &Pipeline,
    i: usize,
    comment: &str,
    log: &Path,
    deps: &[String],
) -> Vec<String> {
    let stage = &pipeline.stages[i];
    let res = resources(pipeline, i);
    let mut args = vec![
        format!("--job-name=flow:{}:{}", pipeline.name, stage.name),
        format!("--comment={comment}"),
        format!("--output={}", log.display()),
        "--open-mode=append".into(),
        // A preempted or failed node puts the job back in the queue; it resumes from its
        // last pushed checkpoint.
        "--requeue".into(),
        // Without it, dependents of a failed job would wait forever.
        "--kill-on-invalid-dep=yes".into(),
    ];
    if !deps.is_empty() {
        args.push(format!("--dependency=afterok:{}", deps.join(":")));
    }
    let opt = |flag: &str, v: &Option<String>| v.as_ref().map(|v| format!("--{flag}={v}"));
    args.extend(opt("partition", &res.partition));
    args.extend(opt("account", &res.account));
    args.extend(opt("time", &res.time));
    args.extend(opt("mem", &res.mem));
    args.extend(res.cpus.map(|c| format!("--cpus-per-task={c}")));
    args.extend(res.gpus.filter(|g| *g > 0).map(|g| format!("--gpus={g}")));
    args.extend(res.sbatch.iter().cloned());
    args
}

/// Single-quotes a word for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Double-quotes for sh, leaving `$VAR` to expand on the node.
fn sh_expand(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A name for the batch script's comment line: control characters (a newline in a pipeline
/// name or a sweep value would start a command) become `?`.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The batch script: the job spec travels inside it (Slurm stores the script), so the job
/// runs exactly what was submitted even if the pipeline file changes meanwhile. Every
/// value in it is quoted (the flow binary, the cache), JSON inside a quoted heredoc (the
/// spec: JSON escapes newlines) or made one line (the comment).
fn job_script(
    flow: &Path,
    cache: &str,
    pipeline: &Pipeline,
    stage: &str,
    spec: &JobSpec,
) -> String {
    let json = serde_json::to_string(spec).expect("specs serialize");
    format!(
        "#!/bin/sh\n\
         # flow: stage `{stage}` of pipeline `{name}`\n\
         export FLOW_CACHE={cache}\n\
         exec {flow} __job <<'FLOW_JOB_SPEC'\n{json}\nFLOW_JOB_SPEC\n",
        name = one_line(&pipeline.name),
        stage = one_line(stage),
        cache = sh_expand(cache),
        flow = sh_quote(&flow.display().to_string()),
    )
}

/// Submits a job for every stage that is done neither here nor on the remote and is not
/// queued or running already. Returns the job of each stage that is not done.
pub fn submit(pipeline: &Pipeline, cache: &Cache, remote: &Remote, ui: &mut Ui) -> Result<Jobs> {
    // One submitter per pipeline and cache at a time, or two could both find a stage unqueued.
    let lock_name = format!(
        "slurm-submit-{}",
        blake3::hash(pipeline.name.as_bytes()).to_hex()
    );
    let _lock = KeyLock::acquire(cache, &lock_name, |holder| {
        ui.note(&format!(
            "waiting for another submission of this pipeline ({holder})"
        ))
    })?;
    let states = resolve_remote(pipeline, cache, remote)?;
    let files = FileHashes::load(cache);
    let recipes = recipes(pipeline, &states, &files)?;
    let mut ledger = Ledger::load(cache, &pipeline.name);
    // The scheduler is asked only when there is something to submit: a finished study's
    // rerun works without Slurm.
    let all_done = states.iter().all(|s| s.record().is_some());
    let known = if all_done {
        BTreeMap::new()
    } else {
        scheduler::jobs()?
    };
    let active: HashMap<String, JobInfo> = known
        .into_values()
        .filter(|j| j.is_active())
        .map(|j| (j.comment.clone(), j))
        .collect();
    let flow = match &pipeline.executor.flow {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| StoreError::io(Path::new("flow"), e))?,
    };
    let node_cache = pipeline
        .executor
        .cache
        .clone()
        .unwrap_or_else(|| absolute(cache.root()).display().to_string());
    let log_dir = cache.slurm_log_dir(&pipeline.name);
    std::fs::create_dir_all(&log_dir).map_err(|e| StoreError::io(&log_dir, e))?;
    let pipeline_path = absolute(&pipeline.path);

    // The pipeline and every file it includes, so the jobs run what was submitted.
    let sources = serde_json::to_string(&pipeline.sources).expect("texts serialize");
    let text_blake3 = remote.put_text(&sources)?;
    let mut jobs: Jobs = vec![None; pipeline.stages.len()];
    let mut saved = std::time::Instant::now();
    let (mut submitted, mut kept, mut done) = (0, 0, 0);
    for (i, stage) in pipeline.stages.iter().enumerate() {
        if let Some(record) = states[i].record() {
            done += 1;
            ui.stage(&stage.name, Status::Cached, Some(&record.key), "");
            continue;
        }
        let comment = job_comment(&recipes[i], remote);
        if let Some(job) = active.get(&comment) {
            kept += 1;
            ui.note(&format!(
                "{:>9}  {}  job {} ({}, submitted before)",
                "queued",
                stage.name,
                job.id,
                job.state.to_lowercase()
            ));
            ui.json_line(&serde_json::json!({
                "event": "job", "stage": stage.name, "job": job.id, "new": false,
            }));
            jobs[i] = Some(job.id.clone());
            continue;
        }
        let mut deps: Vec<String> = stage
            .inputs
            .iter()
            .flat_map(|b| b.sources.iter())
            .filter_map(|s| jobs[s.stage].clone())
            .collect();
        deps.sort();
        deps.dedup();
        let log_name = crate::store::safe_name(&stage.name);
        let log_pattern = log_dir.join(format!("{log_name}.%j.log"));
        let spec = JobSpec {
            pipeline: pipeline_path.clone(),
            text_blake3: text_blake3.clone(),
            profiles: pipeline.overrides.profiles.clone(),
            sets: pipeline.overrides.sets.clone(),
            salt: pipeline.salt.clone(),
            stage: stage.name.clone(),
            remote: remote.url().to_string(),
        };
        let script = job_script(&flow, &node_cache, pipeline, &stage.name, &spec);
        let args = sbatch_args(pipeline, i, &comment, &log_pattern, &deps);
        let id = match scheduler::sbatch(&args, &script) {
            Ok(id) => id,
            Err(source) => {
                ledger.save(cache, &pipeline.name)?;
                return Err(Error::Submit {
                    stage: stage.name.clone(),
                    source,
                });
            }
        };
        let log = log_dir.join(format!("{log_name}.{id}.log"));
        let mut detail = format!("job {id}");
        if !deps.is_empty() {
            detail.push_str(&format!(" after {}", deps.join(",")));
        }
        if let Some(key) = states[i].key()
            && let Some(holder) = remote.lease_holder(key)?
        {
            detail.push_str(&format!(
                " (key leased by {holder}: the job will wait and reuse its result)"
            ));
        }
        ui.note(&format!("{:>9}  {}  {detail}", "submitted", stage.name));
        ui.json_line(&serde_json::json!({
            "event": "job", "stage": stage.name, "job": id, "new": true,
            "log": log.display().to_string(),
        }));
        ledger.jobs.insert(
            stage.name.clone(),
            JobEntry {
                job: id.clone(),
                recipe: recipes[i].clone(),
                log: log.display().to_string(),
                submitted: unix_now(),
            },
        );
        // Saved at most once a second (saving after every job rewrites the whole ledger
        // each time: quadratic in a 10,000-job submission), and at the end. A submission
        // killed in between forgets at most a second of jobs here; the next one still finds
        // them queued through their comments.
        if saved.elapsed() >= Duration::from_secs(1) {
            ledger.save(cache, &pipeline.name)?;
            saved = std::time::Instant::now();
        }
        jobs[i] = Some(id);
        submitted += 1;
    }
    ledger.save(cache, &pipeline.name)?;
    ui.json_line(&serde_json::json!({
        "event": "submitted", "submitted": submitted, "queued": kept, "done": done,
    }));
    ui.note(&format!(
        "{submitted} submitted, {kept} already queued or running, {done} done"
    ));
    Ok(jobs)
}

/// How a stage's job stands, for people.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: String,
    /// queued, running, failed, blocked, cancelled, finished, unknown
    pub status: &'static str,
    /// The scheduler's state (or `?` once it forgot the job).
    pub state: String,
    pub detail: String,
    pub log: String,
}

/// The job view of every stage the ledger knows, given the scheduler's jobs.
pub fn job_views(
    pipeline: &Pipeline,
    ledger: &Ledger,
    jobs: &BTreeMap<String, JobInfo>,
) -> Vec<Option<JobView>> {
    let mut views: Vec<Option<JobView>> = Vec::with_capacity(pipeline.stages.len());
    // The nearest failed job upstream of each stage (itself included), found from its
    // producers' in one pass (topological order): no walk up the DAG per blocked stage.
    let mut blame: Vec<Option<usize>> = Vec::with_capacity(pipeline.stages.len());
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let upstream = pipeline.producers(i).into_iter().find_map(|p| blame[p]);
        let view = ledger
            .jobs
            .get(&stage.name)
            .map(|entry| job_view(pipeline, entry, jobs.get(&entry.job), upstream, &views));
        let failed = view
            .as_ref()
            .is_some_and(|v| matches!(v.status, "failed" | "cancelled"));
        blame.push(if failed { Some(i) } else { upstream });
        views.push(view);
    }
    views
}

/// How one stage's job stands; `upstream` is the nearest failed stage above it.
fn job_view(
    pipeline: &Pipeline,
    entry: &JobEntry,
    info: Option<&JobInfo>,
    upstream: Option<usize>,
    views: &[Option<JobView>],
) -> JobView {
    let state = info.map_or("?".to_string(), |j| j.state.clone());
    let (status, detail) = match info {
        None => ("unknown", "no longer known to the scheduler".to_string()),
        Some(j)
            if j.never_runnable()
                || (j.state == "PENDING" && j.reason == "DependencyNeverSatisfied") =>
        {
            let why = upstream
                .and_then(|u| views[u].as_ref().map(|v| (&pipeline.stages[u].name, v)))
                .map(|(name, v)| {
                    format!("upstream `{name}` failed (job {}; log: {})", v.job, v.log)
                })
                .unwrap_or_else(|| "an upstream job failed".into());
            ("blocked", why)
        }
        Some(j) if j.state == "PENDING" => ("queued", format!("reason {}", j.reason)),
        Some(j) if j.is_active() => ("running", format!("on {}", j.node)),
        Some(j) if j.state == "COMPLETED" => ("finished", String::new()),
        Some(j) if j.state == "CANCELLED" => ("cancelled", String::new()),
        Some(j) => ("failed", format!("exit {}", j.exit_code)),
    };
    JobView {
        job: entry.job.clone(),
        status,
        state,
        detail,
        log: entry.log.clone(),
    }
}

/// Follows the jobs until none is queued or running, printing each change; then reports
/// every stage's outcome from the remote's run records. Returns (done, failed, blocked).
pub fn wait(
    pipeline: &Pipeline,
    cache: &Cache,
    remote: &Remote,
    jobs: &Jobs,
    poll: Duration,
    ui: &mut Ui,
) -> Result<(usize, usize, usize)> {
    let clock = std::time::Instant::now();
    let ledger = Ledger::load(cache, &pipeline.name);
    let mut last: Vec<String> = vec![String::new(); jobs.len()];
    let total = jobs.iter().flatten().count();
    if total == 0 {
        return Ok((0, 0, 0));
    }
    // The last poll (every job ended) is also what the outcome is judged by.
    let infos = loop {
        let infos = scheduler::jobs()?;
        let active = active_count(&infos, jobs);
        for (i, job) in jobs.iter().enumerate() {
            let Some(id) = job else { continue };
            let state = infos
                .get(id)
                .map_or("GONE".to_string(), |j| j.state.clone());
            if state != last[i] {
                let stage = &pipeline.stages[i].name;
                ui.note(&format!(
                    "{:>9}  {stage}  job {id}  ({active} of {total} jobs still queued or running)",
                    state.to_lowercase(),
                ));
                ui.json_line(&serde_json::json!({"event": "job-state", "stage": stage, "job": id, "state": state}));
                last[i] = state;
            }
        }
        if active == 0 {
            break infos;
        }
        std::thread::sleep(poll);
    };
    let states = resolve_remote(pipeline, cache, remote)?;
    let views = job_views(pipeline, &ledger, &infos);
    let (mut done, mut failed, mut blocked) = (0, 0, 0);
    for (i, stage) in pipeline.stages.iter().enumerate() {
        if jobs[i].is_none() {
            continue;
        }
        let key = states[i].key();
        if states[i].record().is_some() {
            done += 1;
            ui.stage(&stage.name, Status::Ran, key, "");
            continue;
        }
        let view = views[i].clone();
        match view {
            Some(v) if v.status == "blocked" => {
                blocked += 1;
                ui.stage(&stage.name, Status::Blocked, key, &v.detail);
            }
            Some(v) => {
                failed += 1;
                ui.stage(
                    &stage.name,
                    Status::Failed,
                    key,
                    &format!("job {} {} {}; log: {}", v.job, v.state, v.detail, v.log),
                );
                ui.warn(&format!(
                    "--- last lines of {} ---\n{}",
                    v.log,
                    crate::exec::tail(Path::new(&v.log), 20)
                ));
            }
            None => {
                failed += 1;
                ui.stage(
                    &stage.name,
                    Status::Failed,
                    key,
                    "no job was recorded for it",
                );
            }
        }
    }
    ui.summary(done, 0, failed, blocked, clock.elapsed().as_secs_f64());
    Ok((done, failed, blocked))
}

/// Cancels the pipeline's queued and running jobs; returns their ids.
pub fn cancel(pipeline: &Pipeline, cache: &Cache) -> Result<Vec<String>> {
    let ledger = Ledger::load(cache, &pipeline.name);
    let infos = scheduler::jobs()?;
    let ids: Vec<String> = ledger
        .jobs
        .values()
        .filter(|e| infos.get(&e.job).is_some_and(JobInfo::is_active))
        .map(|e| e.job.clone())
        .collect();
    scheduler::scancel(&ids)?;
    Ok(ids)
}

fn active_count(infos: &BTreeMap<String, JobInfo>, jobs: &Jobs) -> usize {
    jobs.iter()
        .flatten()
        .filter(|id| infos.get(*id).is_some_and(JobInfo::is_active))
        .count()
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_keeps_words_and_expands_only_variables() {
        assert_eq!(sh_quote("/a b/it's"), r"'/a b/it'\''s'");
        assert_eq!(
            sh_expand(r#"/s/$USER/"x"`y`\"#),
            r#""/s/$USER/\"x\"\`y\`\\""#
        );
    }

    #[test]
    fn names_with_newlines_or_slashes_stay_comments_and_file_names() {
        let text = "[pipeline]\nname = \"p\\ntouch /tmp/owned\"\n\n[stage.gen]\n\
                    kind = \"command\"\nrun = [\"true\\nrm -rf ~\", \"echo a/b%j\"]\n\
                    sweep = [\"run\"]\n";
        let p = Pipeline::from_text(Path::new("/p/x.toml"), text.into(), &Default::default())
            .unwrap_or_else(|d| panic!("{d}"));
        assert!(p.name.contains('\n') && p.stages.len() == 2);
        assert!(p.stages.iter().any(|s| s.name.contains('\n')));
        for stage in &p.stages {
            let spec = JobSpec {
                pipeline: "/p/x.toml".into(),
                text_blake3: "0".repeat(64),
                profiles: vec![],
                sets: vec![],
                salt: String::new(),
                stage: stage.name.clone(),
                remote: "file:///r".into(),
            };
            let script = job_script(Path::new("/bin/flow"), "/c", &p, &stage.name, &spec);
            let lines: Vec<&str> = script.lines().collect();
            assert_eq!(lines.len(), 6, "{script}");
            assert!(lines[1].starts_with("# flow: stage"), "{script}");
            for l in &lines {
                assert!(!l.starts_with("touch") && !l.starts_with("rm "), "{script}");
            }
            let name = crate::store::safe_name(&stage.name);
            assert!(!name.contains(['/', '%', '\n']), "{name}");
        }
    }

    #[test]
    fn job_resources_layer_defaults_then_group_then_stage() {
        let text = r#"
[executor]
partition = "cpu"
time = "01:00:00"
gpus = 2
sbatch = ["--qos=low"]

[executor.stage.gen]
time = "02:00:00"

[executor.stage."gen[seed=2]"]
partition = "big"
gpus = 1
sbatch = ["--exclusive"]

[stage.gen]
kind = "command"
run = "true"
seed = [1, 2]
sweep = ["seed"]
"#;
        let p = Pipeline::from_text(Path::new("/p/x.toml"), text.into(), &Default::default())
            .unwrap_or_else(|d| panic!("{d}"));
        let first = sbatch_args(&p, 0, "flow:c", Path::new("/l/%j.log"), &["7".into()]);
        for want in [
            "--partition=cpu",
            "--time=02:00:00",
            "--qos=low",
            "--comment=flow:c",
            "--dependency=afterok:7",
            "--kill-on-invalid-dep=yes",
            "--requeue",
        ] {
            assert!(first.iter().any(|a| a == want), "{want} in {first:?}");
        }
        assert!(
            !first.iter().any(|a| a.starts_with("--gpus")),
            "a command stage uses no device: {first:?}"
        );
        let second = sbatch_args(&p, 1, "flow:c", Path::new("/l/%j.log"), &[]);
        for want in [
            "--partition=big",
            "--time=02:00:00",
            "--gpus=1",
            "--qos=low",
            "--exclusive",
        ] {
            assert!(second.iter().any(|a| a == want), "{want} in {second:?}");
        }
        assert!(!second.iter().any(|a| a.starts_with("--dependency")));
    }
}
