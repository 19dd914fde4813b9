//! The Slurm executor against a real one-node Slurm cluster (slurmctld, slurmd and munge on
//! 127.0.0.1, started by `scripts/slurm-up` unless SLURM_CONF points at one). Every job gets
//! its own empty local cache (`$SLURM_JOB_ID` in `[executor] cache`), so artifacts can only
//! travel through the remote cache, as between the nodes of a real cluster.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{S3, Workspace, assert_ok, parse_lines, statuses, tree, with_status};

/// The cluster's SLURM_CONF; starts the cluster once per test binary.
fn slurm_conf() -> &'static str {
    static CONF: OnceLock<String> = OnceLock::new();
    CONF.get_or_init(|| {
        if let Ok(conf) = std::env::var("SLURM_CONF") {
            return conf;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/slurm-up");
        let out = Command::new(script)
            .output()
            .expect("scripts/slurm-up runs");
        assert!(
            out.status.success(),
            "these tests need a Slurm cluster (Debian: apt-get install slurmctld slurmd \
             slurm-client munge); scripts/slurm-up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// `flow ARGS` in the workspace, talking to the test cluster.
fn flow(ws: &Workspace, args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut cmd = ws.command(args);
    cmd.env("SLURM_CONF", slurm_conf())
        .env("FLOW_SLURM_POLL_SECONDS", "0.5");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("flow runs")
}

/// A pipeline whose stages run as Slurm jobs, each with a fresh local cache.
fn slurm_pipeline(ws: &Workspace, name: &str, remote: &str, stages: &str) -> std::path::PathBuf {
    let node = ws.path().join("node");
    ws.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"{name}\"\nremote = \"{remote}\"\n\n[executor]\nkind = \"slurm\"\n\
             cache = \"{}/$SLURM_JOB_ID\"\n\n{stages}",
            node.display()
        ),
    )
}

fn file_remote(ws: &Workspace) -> String {
    let dir = ws.path().join("remote");
    std::fs::create_dir_all(&dir).unwrap();
    format!("file://{}", dir.display())
}

fn scontrol_state(job: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", "--oneliner", job])
        .env("SLURM_CONF", slurm_conf())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("JobState="))
        .unwrap_or("?")
        .to_string()
}

/// The `job` events of `flow run --executor slurm --json`: (stage, job id, newly submitted).
fn job_events(stdout: &[u8]) -> Vec<(String, String, bool)> {
    parse_lines(stdout)
        .iter()
        .filter(|e| e["event"] == "job")
        .map(|e| {
            (
                e["stage"].as_str().unwrap().to_string(),
                e["job"].as_str().unwrap().to_string(),
                e["new"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn keys(ws: &Workspace, p: &Path, env: &[(&str, String)]) -> Vec<(String, String)> {
    let out = flow(ws, &["status", p.to_str().unwrap(), "--json"], env);
    assert_ok(&out);
    parse_lines(&out.stdout)
        .iter()
        .map(|l| {
            (
                l["stage"].as_str().unwrap().to_string(),
                l["key"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_fan_out_and_join_under_slurm_match_a_local_run_key_for_key() {
    let s3 = S3::shared();
    let env: Vec<(&str, String)> = s3.env();
    let local = Workspace::new();
    let lp = local.write("p.toml", common::FAN_OUT_AND_JOIN);
    assert_ok(&local.flow(&["run", lp.to_str().unwrap()]));

    let ws = Workspace::new();
    let p = slurm_pipeline(
        &ws,
        "fan",
        "s3://flow-test/slurm-fan",
        common::FAN_OUT_AND_JOIN,
    );
    let ps = p.to_str().unwrap();
    let out = flow(&ws, &["run", ps, "--wait", "--json"], &env);
    assert_ok(&out);
    let s = statuses(&parse_lines(&out.stdout));
    assert_eq!(with_status(&s, "ran").len(), 7, "{s:?}");
    // Seven jobs, seven separate node caches: the artifacts went through S3.
    assert_eq!(
        std::fs::read_dir(ws.path().join("node")).unwrap().count(),
        7
    );
    assert!(
        !ws.cache().join("runs").exists()
            || std::fs::read_dir(ws.cache().join("runs")).unwrap().count() == 0,
        "nothing ran in the submitting cache"
    );

    // Same keys as the local run, and the same bytes once pulled.
    assert_eq!(keys(&ws, &p, &env), keys(&local, &lp, &[]));
    assert_ok(&flow(&ws, &["pull", ps], &env));
    assert_eq!(
        tree(&ws.output_dir(&p, "sum")),
        tree(&local.output_dir(&lp, "sum"))
    );

    // A rerun finds everything done and submits nothing.
    let out = flow(&ws, &["run", ps, "--json"], &env);
    assert_ok(&out);
    let summary = parse_lines(&out.stdout)
        .into_iter()
        .find(|e| e["event"] == "submitted")
        .unwrap();
    assert_eq!(summary["submitted"], 0);
    assert_eq!(summary["done"], 7);
}

#[test]
fn a_failed_job_blocks_its_dependents_and_status_says_why() {
    let ws = Workspace::new();
    let remote = file_remote(&ws);
    let p = slurm_pipeline(
        &ws,
        "failing",
        &remote,
        r#"
[stage.ok]
kind = "command"
run = "echo fine > $FLOW_OUT/v"

[stage.bad]
kind = "command"
run = "echo boom-from-bad >&2; exit 7"

[stage.after]
kind = "command"
run = "cp $FLOW_IN_X/v $FLOW_OUT/v"
inputs = { x = "bad" }

[stage.last]
kind = "command"
run = "cp $FLOW_IN_X/v $FLOW_OUT/v"
inputs = { x = "after" }

[stage.other]
kind = "command"
run = "cp $FLOW_IN_X/v $FLOW_OUT/v"
inputs = { x = "ok" }
"#,
    );
    let ps = p.to_str().unwrap();
    let out = flow(&ws, &["run", ps, "--wait", "--json"], &[]);
    assert_eq!(out.status.code(), Some(1), "a failed job fails the run");
    let s = statuses(&parse_lines(&out.stdout));
    assert_eq!(with_status(&s, "ran"), ["ok", "other"]);
    assert_eq!(with_status(&s, "failed"), ["bad"]);
    assert_eq!(with_status(&s, "blocked"), ["after", "last"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("boom-from-bad"),
        "the failure shows the job log's tail"
    );

    let out = flow(&ws, &["status", ps, "--json"], &[]);
    assert_ok(&out);
    let lines = parse_lines(&out.stdout);
    let by = |name: &str| lines.iter().find(|l| l["stage"] == name).unwrap().clone();
    let bad = by("bad");
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["job"]["state"], "FAILED");
    let log = bad["job"]["log"].as_str().unwrap();
    assert!(
        std::fs::read_to_string(log)
            .unwrap()
            .contains("boom-from-bad")
    );
    for name in ["after", "last"] {
        let blocked = by(name);
        assert_eq!(blocked["status"], "blocked", "{blocked}");
        let detail = blocked["job"]["detail"].as_str().unwrap();
        assert!(
            detail.contains("upstream `bad` failed") && detail.contains(log),
            "{name}: {detail}"
        );
    }
}

#[test]
fn a_job_cancelled_mid_training_resumes_from_its_pushed_checkpoint() {
    let ws = Workspace::new();
    let remote = file_remote(&ws);
    // Eight one-second "steps", checkpointing the step atomically; the output says where the
    // run that finished started from.
    let p = slurm_pipeline(
        &ws,
        "train",
        &remote,
        r#"
[stage.train]
kind = "command"
run = """
step=0
[ -f $FLOW_SCRATCH/step ] && step=$(cat $FLOW_SCRATCH/step)
start=$step
while [ $step -lt 8 ]; do
  sleep 1
  step=$((step + 1))
  echo $step > $FLOW_SCRATCH/step.tmp && mv $FLOW_SCRATCH/step.tmp $FLOW_SCRATCH/step
done
echo "started-at $start" > $FLOW_OUT/result
"""
"#,
    );
    let ps = p.to_str().unwrap();
    let env = [
        ("FLOW_CHECKPOINT_SECONDS", "1".to_string()),
        ("FLOW_LEASE_SECONDS", "3".to_string()),
    ];
    let out = flow(&ws, &["run", ps, "--json"], &env);
    assert_ok(&out);
    let jobs = job_events(&out.stdout);
    assert_eq!(jobs.len(), 1);
    let job = jobs[0].1.clone();

    // Wait for a checkpoint of step >= 3 on the remote, then cancel the job.
    let scratch = ws.path().join("remote/scratch");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no checkpoint reached the remote"
        );
        let snap = std::fs::read_dir(&scratch)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("index.json"))
            .find(|p| p.exists());
        if let Some(index) = snap {
            let text = std::fs::read_to_string(index).unwrap_or_default();
            // The index maps each file to its blob; the blob of `step` holds the step.
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let step = v
                .get("step")
                .and_then(|f| f.get("blake3"))
                .and_then(|h| h.as_str())
                .and_then(|h| {
                    std::fs::read_to_string(
                        ws.path()
                            .join("remote/objects/blake3")
                            .join(&h[..2])
                            .join(&h[2..]),
                    )
                    .ok()
                })
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(0);
            if step >= 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = Command::new("scancel")
        .arg(&job)
        .env("SLURM_CONF", slurm_conf())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while scontrol_state(&job) != "CANCELLED" {
        assert!(Instant::now() < deadline, "the job did not end");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Rerun: a new job, on a new empty node cache, resumes where the checkpoint was.
    let out = flow(&ws, &["run", ps, "--wait", "--json"], &env);
    assert_ok(&out);
    let again = job_events(&out.stdout);
    assert_eq!(again.len(), 1);
    assert!(again[0].2, "a new job");
    assert_ne!(again[0].1, job);
    assert_ok(&flow(&ws, &["pull", ps], &[]));
    let result = tree(&ws.output_dir(&p, "train"));
    let text = String::from_utf8_lossy(&result[0].1).to_string();
    let start: u32 = text
        .trim()
        .strip_prefix("started-at ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3..8).contains(&start),
        "resumed from the checkpoint, not from step 0: {text}"
    );
}

#[test]
fn a_second_submission_while_jobs_are_queued_submits_nothing_and_cancel_stops_them() {
    let ws = Workspace::new();
    let remote = file_remote(&ws);
    let p = slurm_pipeline(
        &ws,
        "queued",
        &remote,
        r#"
[stage.slow]
kind = "command"
run = "sleep 120; echo done > $FLOW_OUT/v"

[stage.next]
kind = "command"
run = "cp $FLOW_IN_X/v $FLOW_OUT/v"
inputs = { x = "slow" }
"#,
    );
    let ps = p.to_str().unwrap();
    let out = flow(&ws, &["run", ps, "--json"], &[]);
    assert_ok(&out);
    let first = job_events(&out.stdout);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|j| j.2));

    let out = flow(&ws, &["run", ps, "--json"], &[]);
    assert_ok(&out);
    let second = job_events(&out.stdout);
    assert_eq!(
        second.iter().map(|j| (&j.0, &j.1, j.2)).collect::<Vec<_>>(),
        first
            .iter()
            .map(|j| (&j.0, &j.1, false))
            .collect::<Vec<_>>(),
        "the same jobs, none new"
    );

    let out = flow(&ws, &["status", ps, "--json"], &[]);
    let lines = parse_lines(&out.stdout);
    assert!(
        matches!(lines[0]["status"].as_str(), Some("queued" | "running")),
        "{lines:?}"
    );
    assert_eq!(lines[1]["status"], "queued");

    let out = flow(&ws, &["cancel", ps, "--json"], &[]);
    assert_ok(&out);
    let cancelled = &parse_lines(&out.stdout)[0]["jobs"];
    assert_eq!(cancelled.as_array().unwrap().len(), 2);
    for (_, job, _) in &first {
        let deadline = Instant::now() + Duration::from_secs(30);
        while scontrol_state(job) != "CANCELLED" {
            assert!(Instant::now() < deadline, "job {job} was not cancelled");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
