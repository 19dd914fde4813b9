//! The Slurm commands flow uses (`sbatch`, `scontrol show job`, `scancel`), run as processes:
//! they are the cluster's public interface, stable across versions, and need no library.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use thiserror::Error;

/// A Slurm command that could not run or said no.
#[derive(Debug, Error)]
pub enum SlurmError {
    #[error("cannot run `{cmd}` ({source}); is Slurm's client installed and SLURM_CONF set?")]
    Spawn {
        cmd: &'static str,
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: &'static str, stderr: String },
    #[error("`sbatch` printed no job id: {0:?}")]
    NoJobId(String),
}

pub type Result<T> = std::result::Result<T, SlurmError>;

/// One job as `scontrol show job` describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobInfo {
    pub id: String,
    /// PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    pub state: String,
    /// Why it waits or ended (`Dependency`, `DependencyNeverSatisfied`, `None`, ...).
    pub reason: String,
    /// `code:signal` of the batch script.
    pub exit_code: String,
    pub comment: String,
    pub node: String,
}

impl JobInfo {
    /// Still queued or running: a resubmission must not duplicate it.
    pub fn is_active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESIZING"
                | "SUSPENDED"
                | "STOPPED"
                | "SIGNALING"
                | "STAGE_OUT"
        )
    }

    /// Slurm cancelled it because a job it depends on failed.
    pub fn never_runnable(&self) -> bool {
        self.reason == "DependencyNeverSatisfied"
    }
}

/// Submits a batch script read from stdin; returns the job id.
pub fn sbatch(args: &[String], script: &str) -> Result<String> {
    let mut child = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SlurmError::Spawn {
            cmd: "sbatch",
            source,
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|source| SlurmError::Spawn {
            cmd: "sbatch",
            source,
        })?;
    let out = child
        .wait_with_output()
        .map_err(|source| SlurmError::Spawn {
            cmd: "sbatch",
            source,
        })?;
    if !out.status.success() {
        return Err(SlurmError::Failed {
            cmd: "sbatch",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // `--parsable` prints `id` or `id;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(SlurmError::NoJobId(text.into_owned()));
    }
    Ok(id)
}

/// Every job the controller still knows (finished ones stay for its MinJobAge), by id.
pub fn jobs() -> Result<BTreeMap<String, JobInfo>> {
    let out = Command::new("scontrol")
        .args(["show", "job", "--oneliner"])
        .output()
        .map_err(|source| SlurmError::Spawn {
            cmd: "scontrol",
            source,
        })?;
    if !out.status.success() {
        return Err(SlurmError::Failed {
            cmd: "scontrol show job",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(parse_jobs(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `scontrol show job --oneliner`: one job per line, `Key=Value` fields separated by
/// spaces (values we read hold no spaces).
fn parse_jobs(text: &str) -> BTreeMap<String, JobInfo> {
    let mut jobs = BTreeMap::new();
    for line in text.lines() {
        let mut job = JobInfo::default();
        for field in line.split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            match k {
                "JobId" => job.id = v.to_string(),
                "JobState" => job.state = v.to_string(),
                "Reason" => job.reason = v.to_string(),
                "ExitCode" => job.exit_code = v.to_string(),
                "Comment" => job.comment = v.to_string(),
                "BatchHost" => job.node = v.to_string(),
                _ => {}
            }
        }
        if !job.id.is_empty() {
            jobs.insert(job.id.clone(), job);
        }
    }
    jobs
}

/// Cancels jobs (their dependents then never run).
pub fn scancel(ids: &[String]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let out = Command::new("scancel")
        .args(ids)
        .output()
        .map_err(|source| SlurmError::Spawn {
            cmd: "scancel",
            source,
        })?;
    if !out.status.success() {
        return Err(SlurmError::Failed {
            cmd: "scancel",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_oneliner_output() {
        let text = "JobId=12 JobName=flow:p:a UserId=root(0) JobState=PENDING Reason=Dependency \
                    Dependency=afterok:11(unfulfilled) ExitCode=0:0 Comment=flow:abc \
                    Command=(null) BatchHost=vm\n\
                    JobId=13 JobName=x JobState=CANCELLED Reason=DependencyNeverSatisfied ExitCode=1:0\n";
        let jobs = parse_jobs(text);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs["12"].state, "PENDING");
        assert_eq!(jobs["12"].comment, "flow:abc");
        assert_eq!(jobs["12"].node, "vm");
        assert!(jobs["12"].is_active());
        assert!(!jobs["13"].is_active());
        assert!(jobs["13"].never_runnable());
        assert!(parse_jobs("No jobs in the system\n").is_empty());
    }
}
