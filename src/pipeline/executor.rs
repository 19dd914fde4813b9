//! `[executor]`: where a pipeline's stages run. None of it enters a cache key: the same stage
//! gives the same artifact on a laptop and on a cluster.
//!
//! ```toml
//! [executor]
//! kind = "slurm"                 # or "local" (the default); `flow run --executor` overrides
//! jobs = 2                       # local: stages at once [default 1]; `flow run -j` overrides
//! partition = "gpu"
//! account = "lab"
//! time = "04:00:00"              # sbatch --time
//! cpus = 8                       # --cpus-per-task, also the stage's thread count
//! mem = "64G"                    # --mem
//! gpus = 1                       # --gpus, for stages that use a device (train, eval)
//! sbatch = ["--qos=high"]        # extra flags, passed as they are
//! flow = "/shared/bin/flow"      # the flow binary on the nodes [default: this one]
//! cache = "/scratch/$USER/flow"  # each job's local cache, expanded by the job's shell
//!
//! [executor.stage.lora]          # a stage group or one stage: overrides for its jobs
//! time = "12:00:00"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::value::{Node, Value, type_error};
use crate::diag::{Diagnostic, Diagnostics, Origin};

/// Which executor runs the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Child processes of this flow process.
    #[default]
    Local,
    /// One Slurm batch job per stage, ordered by job dependencies.
    Slurm,
}

/// The `[executor]` table.
#[derive(Debug, Clone, Default)]
pub struct ExecutorSettings {
    pub kind: ExecutorKind,
    /// Local executor: how many stages may run at once (the machine's cores are shared among
    /// them). None: one. Independent CPU training stages on few cores finish sooner side by
    /// side on a thread each than one after another on all of them (BENCHMARKS.md), but two
    /// large models on one GPU may not fit: a pipeline says what suits it.
    pub jobs: Option<usize>,
    /// Job resources for every stage.
    pub job: JobResources,
    /// The flow binary the jobs run (it must exist at that path on the nodes).
    pub flow: Option<PathBuf>,
    /// The jobs' local cache directory, as shell text (`$VAR` expands on the node).
    pub cache: Option<String>,
    /// Per stage group or stage name, with where the table was written.
    pub stages: BTreeMap<String, (Origin, JobResources)>,
}

/// What one job asks the scheduler for; None leaves the cluster's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobResources {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub time: Option<String>,
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub gpus: Option<u32>,
    pub sbatch: Vec<String>,
}

impl JobResources {
    /// `self` with every field `over` sets replaced (extra flags are appended).
    pub fn overlay(&self, over: &JobResources) -> JobResources {
        JobResources {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            account: over.account.clone().or_else(|| self.account.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            cpus: over.cpus.or(self.cpus),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            gpus: over.gpus.or(self.gpus),
            sbatch: self.sbatch.iter().chain(&over.sbatch).cloned().collect(),
        }
    }
}

const EXECUTOR_KEYS: &[&str] = &[
    "kind",
    "jobs",
    "partition",
    "account",
    "time",
    "cpus",
    "mem",
    "gpus",
    "sbatch",
    "flow",
    "cache",
    "stage",
];

const RESOURCE_KEYS: &[&str] = &[
    "partition",
    "account",
    "time",
    "cpus",
    "mem",
    "gpus",
    "sbatch",
];

/// Reads `[executor]`; problems go to `diags` with their location.
pub fn read(node: Option<&Node>, diags: &mut Diagnostics) -> ExecutorSettings {
    let mut out = ExecutorSettings::default();
    let Some(node) = node else { return out };
    let Some(table) = node.as_table() else {
        diags.push(type_error(node, "a table", "`executor`"));
        return out;
    };
    for (key, (key_origin, n)) in table {
        match key.as_str() {
            "kind" => match n.as_str() {
                Some("local") => out.kind = ExecutorKind::Local,
                Some("slurm") => out.kind = ExecutorKind::Slurm,
                _ => diags.push(Diagnostic::new(
                    &n.origin,
                    "executor.kind must be \"local\" or \"slurm\"",
                )),
            },
            "jobs" => match n.value {
                Value::Int(j) if (1..=1024).contains(&j) => out.jobs = Some(j as usize),
                _ => diags.push(type_error(n, "an integer from 1 to 1024", "executor.jobs")),
            },
            "flow" => {
                if let Some(s) = string(n, "executor.flow", diags) {
                    out.flow = Some(PathBuf::from(s));
                }
            }
            "cache" => out.cache = string(n, "executor.cache", diags),
            "stage" => {
                let Some(stages) = n.as_table() else {
                    diags.push(type_error(n, "a table of stage names", "executor.stage"));
                    continue;
                };
                for (name, (origin, t)) in stages {
                    let Some(t) = t.as_table() else {
                        diags.push(type_error(t, "a table", &format!("executor.stage.{name}")));
                        continue;
                    };
                    let mut res = JobResources::default();
                    for (k, (ko, v)) in t {
                        if RESOURCE_KEYS.contains(&k.as_str()) {
                            read_resource(&mut res, k, v, diags);
                        } else {
                            diags.push(unknown(
                                ko,
                                k,
                                &format!("executor.stage.{name}"),
                                RESOURCE_KEYS,
                            ));
                        }
                    }
                    out.stages.insert(name.clone(), (origin.clone(), res));
                }
            }
            k if RESOURCE_KEYS.contains(&k) => read_resource(&mut out.job, k, n, diags),
            other => diags.push(unknown(key_origin, other, "[executor]", EXECUTOR_KEYS)),
        }
    }
    out
}

fn unknown(origin: &Origin, key: &str, place: &str, expected: &[&str]) -> Diagnostic {
    Diagnostic::new(
        origin,
        format!(
            "unknown setting `{key}` in {place} (expected one of: {})",
            expected.join(", ")
        ),
    )
    .with_suggestion(key, expected.iter().copied())
}

fn string(n: &Node, what: &str, diags: &mut Diagnostics) -> Option<String> {
    match n.as_str() {
        Some(s) => Some(s.to_string()),
        None => {
            diags.push(type_error(n, "a string", what));
            None
        }
    }
}

fn read_resource(res: &mut JobResources, key: &str, n: &Node, diags: &mut Diagnostics) {
    let what = format!("executor.{key}");
    let count = |diags: &mut Diagnostics| match n.value {
        Value::Int(i) if (0..=1_000_000).contains(&i) => Some(i as u32),
        _ => {
            diags.push(type_error(n, "a non-negative integer", &what));
            None
        }
    };
    match key {
        "partition" => res.partition = string(n, &what, diags),
        "account" => res.account = string(n, &what, diags),
        "time" => res.time = string(n, &what, diags),
        "mem" => res.mem = string(n, &what, diags),
        "cpus" => res.cpus = count(diags).filter(|c| *c > 0),
        "gpus" => res.gpus = count(diags),
        "sbatch" => match &n.value {
            Value::List(items) => {
                for item in items {
                    match item.as_str() {
                        Some(s) => res.sbatch.push(s.to_string()),
                        None => diags.push(type_error(item, "a string", "an sbatch flag")),
                    }
                }
            }
            _ => diags.push(type_error(n, "a list of strings", &what)),
        },
        _ => unreachable!("only RESOURCE_KEYS reach here"),
    }
}

/// Checks that every `[executor.stage.NAME]` names a stage group or a stage.
pub fn check_stage_names<'a>(
    settings: &ExecutorSettings,
    names: impl Iterator<Item = &'a str> + Clone,
    diags: &mut Diagnostics,
) {
    for (name, (origin, _)) in &settings.stages {
        if !names.clone().any(|n| n == name) {
            diags.push(
                Diagnostic::new(
                    origin,
                    format!("[executor.stage.{name}]: no stage or stage group is named `{name}`"),
                )
                .with_suggestion(name, names.clone()),
            );
        }
    }
}
