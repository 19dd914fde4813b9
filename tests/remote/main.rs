//! The remote cache against a real S3-compatible server (SeaweedFS on 127.0.0.1) and a
//! `file://` directory: sharing, resuming and leases here; a remote as untrusted input in
//! `trust.rs`; keeping a remote whole (verify, repair, leases raced for, gc) in
//! `consistency.rs`.

mod bucket;
#[path = "../common/mod.rs"]
mod common;
mod consistency;
mod trust;

use std::path::Path;

use common::{S3, Workspace, parse_lines, statuses, tree, with_status};

/// Three stages; `big` writes 24 MiB (a multipart upload) and `small` many small files.
const PIPELINE: &str = r#"
[stage.big]
kind = "command"
run = "head -c 25165824 /dev/zero | tr '\\0' 'x' > $FLOW_OUT/big.bin; echo done > $FLOW_OUT/tag"

[stage.small]
kind = "command"
run = "for i in $(seq 1 50); do echo $i > $FLOW_OUT/f$i.txt; done"

[stage.join]
kind = "command"
run = "wc -c < $FLOW_IN_B/big.bin > $FLOW_OUT/n; ls $FLOW_IN_S | wc -l >> $FLOW_OUT/n"
inputs = { b = "big", s = "small" }
"#;

fn run(ws: &Workspace, p: &Path, s3: &S3, remote: &str) -> std::process::Output {
    let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json", "--remote", remote]);
    cmd.envs(s3.env());
    cmd.output().unwrap()
}

fn outputs(ws: &Workspace, p: &Path) -> Vec<Vec<(String, Vec<u8>)>> {
    ["big", "small", "join"]
        .iter()
        .map(|s| tree(&ws.output_dir(p, s)))
        .collect()
}

#[test]
fn a_second_machine_reuses_everything_and_pull_materializes() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/shared-1";
    let a = Workspace::new();
    let p = a.write("p.toml", PIPELINE);
    let out = run(&a, &p, s3, remote);
    common::assert_ok(&out);
    assert_eq!(
        with_status(&statuses(&parse_lines(&out.stdout)), "ran").len(),
        3
    );

    // A fresh machine: empty local cache, same pipeline. Nothing runs.
    let b = Workspace::new();
    let q = b.write("p.toml", PIPELINE);
    let out = run(&b, &q, s3, remote);
    common::assert_ok(&out);
    let s = statuses(&parse_lines(&out.stdout));
    assert_eq!(with_status(&s, "cached").len(), 3, "{s:?}");
    assert_eq!(outputs(&a, &p), outputs(&b, &q));
    assert!(b.flow(&["cache", "verify"]).status.success());

    // `flow pull` fills a third cache; afterwards no remote is needed.
    let c = Workspace::new();
    let r = c.write("p.toml", PIPELINE);
    let mut cmd = c.command(&["pull", r.to_str().unwrap(), "--remote", remote, "--json"]);
    cmd.envs(s3.env());
    let out = cmd.output().unwrap();
    common::assert_ok(&out);
    let summary = parse_lines(&out.stdout).pop().unwrap();
    assert_eq!(summary["stages"], 3);
    assert!(summary["transfer"]["bytes"].as_u64().unwrap() > 24 << 20);
    assert_eq!(with_status(&c.run_statuses(&r, &[]), "cached").len(), 3);
    assert_eq!(outputs(&a, &p), outputs(&c, &r));

    // A second push sends nothing: every key is there.
    let mut cmd = a.command(&["push", p.to_str().unwrap(), "--remote", remote, "--json"]);
    cmd.envs(s3.env());
    let out = cmd.output().unwrap();
    let summary = parse_lines(&out.stdout).pop().unwrap();
    assert_eq!(summary["transfer"]["files"], 0);
}

#[test]
fn a_damaged_remote_blob_is_detected_and_the_stage_recomputed() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/shared-2";
    let a = Workspace::new();
    let p = a.write("p.toml", PIPELINE);
    assert!(run(&a, &p, s3, remote).status.success());
    // Overwrite the blob of `small`'s f1.txt ("1\n") on the server with other bytes.
    let hash = blake3::hash(b"1\n").to_hex().to_string();
    s3.put_bytes(
        &format!("shared-2/objects/blake3/{}/{}", &hash[..2], &hash[2..]),
        b"9\n",
    )
    .unwrap();

    let b = Workspace::new();
    let q = b.write("p.toml", PIPELINE);
    let out = run(&b, &q, s3, remote);
    common::assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is damaged"), "{stderr}");
    let s = statuses(&parse_lines(&out.stdout));
    assert_eq!(
        with_status(&s, "ran"),
        ["small"],
        "only the damaged stage is recomputed"
    );
    assert_eq!(outputs(&a, &p), outputs(&b, &q));
}

#[test]
fn wrong_credentials_give_a_clear_error_without_the_secret() {
    let s3 = S3::shared();
    let ws = Workspace::new();
    let p = ws.write(
        "p.toml",
        "[stage.a]\nkind = \"command\"\nrun = \"echo a > $FLOW_OUT/a\"\n",
    );
    let mut cmd = ws.command(&[
        "run",
        p.to_str().unwrap(),
        "--remote",
        "s3://flow-test/creds",
    ]);
    cmd.envs(s3.env());
    cmd.env("AWS_SECRET_ACCESS_KEY", "not-the-secret-xyz");
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stage that cannot share its result fails"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("remote s3://flow-test/creds") && stderr.contains("failed  a"),
        "{stderr}"
    );
    assert!(
        stderr.contains("403") && stderr.contains("SignatureDoesNotMatch"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-the-secret-xyz"),
        "the secret leaked: {stderr}"
    );
}

#[test]
fn a_server_killed_mid_push_leaves_no_record_and_the_next_run_completes() {
    // Its own free block, clear of the shared server's (whose gRPC ports sit 10000 above).
    let base = S3::free_block(40000);
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::at(base);
    let pid = s3.start(dir.path());
    let remote = "s3://flow-test/killed";
    let ws = Workspace::new();
    // 400 MiB: the push takes long enough to be interrupted.
    let p = ws.write(
        "p.toml",
        "[stage.huge]\nkind = \"command\"\nrun = \"head -c 419430400 /dev/zero > $FLOW_OUT/huge.bin\"\n",
    );
    let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json", "--remote", remote]);
    cmd.envs(s3.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // The stage is committed locally, then pushed: kill the server as soon as the record is
    // written here.
    let runs = ws.cache().join("runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&runs).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stage never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) of the server process this test started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = parse_lines(&out.stdout)
        .iter()
        .find(|e| e["stage"] == "huge")
        .unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    std::thread::sleep(std::time::Duration::from_millis(500));
    s3.start(dir.path());
    assert!(
        !s3.exists(&format!("killed/runs/{key}.json")),
        "a record for an incomplete push"
    );
    let out = run(&ws, &p, &s3, remote);
    common::assert_ok(&out);
    assert!(s3.exists(&format!("killed/runs/{key}.json")));
    let other = Workspace::new();
    let q = other.write("p.toml", &std::fs::read_to_string(&p).unwrap());
    let out = run(&other, &q, &s3, remote);
    assert_eq!(statuses(&parse_lines(&out.stdout))[0].1, "cached");
    let size = std::fs::metadata(other.output_dir(&q, "huge").join("huge.bin"))
        .unwrap()
        .len();
    assert_eq!(size, 419430400);
}

#[test]
fn two_machines_sharing_a_remote_run_a_key_once() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/twice";
    let counter = tempfile::NamedTempFile::new().unwrap();
    let text = format!(
        "[stage.slow]\nkind = \"command\"\nrun = \"echo run >> {}; sleep 2; echo result > $FLOW_OUT/r\"\n",
        counter.path().display()
    );
    let (a, b) = (Workspace::new(), Workspace::new());
    let (p, q) = (a.write("p.toml", &text), b.write("p.toml", &text));
    let spawn = |ws: &Workspace, p: &Path| {
        let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json", "--remote", remote]);
        cmd.envs(s3.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let first = spawn(&a, &p);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let second = spawn(&b, &q);
    let (o1, o2) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(
        o1.status.success() && o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(counter.path()).unwrap(),
        "run\n",
        "computed once"
    );
    let s1 = statuses(&parse_lines(&o1.stdout));
    let s2 = statuses(&parse_lines(&o2.stdout));
    assert_eq!((s1[0].1.as_str(), s2[0].1.as_str()), ("ran", "cached"));
    assert!(
        String::from_utf8_lossy(&o2.stderr).contains("waiting"),
        "the second says it waits"
    );
    assert_eq!(
        tree(&a.output_dir(&p, "slow")),
        tree(&b.output_dir(&q, "slow"))
    );
}

/// A stage that resumes from a checkpoint: the first attempt writes 20 MiB of "weights"
/// (a multipart upload) and step 5, then dies; a resume reports what it found.
fn checkpointing(extra: &str) -> String {
    format!(
        r#"[stage.train]
kind = "command"
run = """
if [ -f $FLOW_SCRATCH/ckpt ]; then
  echo resumed-from-$(cat $FLOW_SCRATCH/ckpt) > $FLOW_OUT/model.txt
  tr -d y < $FLOW_SCRATCH/weights | wc -c | tr -d ' ' >> $FLOW_OUT/model.txt
  wc -c < $FLOW_SCRATCH/weights | tr -d ' ' >> $FLOW_OUT/model.txt
else
  head -c 20971520 /dev/zero | tr '\\0' y > $FLOW_SCRATCH/weights.tmp && mv $FLOW_SCRATCH/weights.tmp $FLOW_SCRATCH/weights
  echo 5 > $FLOW_SCRATCH/ckpt.tmp && mv $FLOW_SCRATCH/ckpt.tmp $FLOW_SCRATCH/ckpt
  {extra}
fi
"""
"#
    )
}

#[test]
fn a_failed_run_resumes_on_another_machine_from_its_pushed_checkpoint() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/resume-failed";
    let text = checkpointing("exit 1");
    let (a, b) = (Workspace::new(), Workspace::new());
    let (p, q) = (a.write("p.toml", &text), b.write("p.toml", &text));
    let out = run(&a, &p, s3, remote);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&b, &q, s3, remote);
    common::assert_ok(&out);
    assert_eq!(
        tree(&b.output_dir(&q, "train"))[0].1,
        b"resumed-from-5\n0\n20971520\n"
    );
    // Done: the remote checkpoints are gone, the record is there.
    let key = statuses(&parse_lines(&out.stdout));
    assert_eq!(key[0].1, "ran");
}

#[test]
fn a_run_killed_on_one_machine_resumes_on_another_after_its_lease_expires() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/resume-killed";
    let text = checkpointing("sleep 60");
    let (a, b) = (Workspace::new(), Workspace::new());
    let (p, q) = (a.write("p.toml", &text), b.write("p.toml", &text));
    let mut cmd = a.command(&["run", p.to_str().unwrap(), "--json", "--remote", remote]);
    cmd.envs(s3.env())
        .env("FLOW_CHECKPOINT_SECONDS", "1")
        .env("FLOW_LEASE_SECONDS", "4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    // Wait until the checkpoint reached the remote, then kill machine A outright.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut key = None;
    while key.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint was pushed"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(entries) = std::fs::read_dir(a.cache().join("scratch")) {
            for e in entries.flatten() {
                let k = e.file_name().to_string_lossy().into_owned();
                if s3.exists(&format!("resume-killed/scratch/{k}/index.json")) {
                    key = Some(k);
                }
            }
        }
    }
    // SAFETY: kill(2) of the process group this test started.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();

    let mut cmd = b.command(&["run", q.to_str().unwrap(), "--json", "--remote", remote]);
    cmd.envs(s3.env()).env("FLOW_LEASE_SECONDS", "4");
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    common::assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting"),
        "B waits for A's lease"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "an expired lease is taken over"
    );
    assert_eq!(
        tree(&b.output_dir(&q, "train"))[0].1,
        b"resumed-from-5\n0\n20971520\n"
    );
    let key = key.unwrap();
    assert!(
        !s3.exists(&format!("resume-killed/scratch/{key}/ckpt")),
        "checkpoints removed after the push"
    );
    assert!(s3.exists(&format!("resume-killed/runs/{key}.json")));
}

#[test]
fn remote_gc_keeps_what_kept_pipelines_use_and_verify_evicts_damage() {
    let s3 = S3::shared();
    let remote = "s3://flow-test/gcv";
    let a = Workspace::new();
    let p = a.write("p.toml", PIPELINE);
    let o = a.write(
        "o.toml",
        "[stage.other]\nkind = \"command\"\nrun = \"echo other > $FLOW_OUT/o\"\n",
    );
    assert!(run(&a, &p, s3, remote).status.success());
    assert!(run(&a, &o, s3, remote).status.success());
    let flow = |args: &[&str]| {
        let mut cmd = a.command(args);
        cmd.envs(s3.env()).args(["--remote", remote]);
        cmd.output().unwrap()
    };

    let dry = parse_lines(
        &flow(&[
            "gc",
            "--keep",
            p.to_str().unwrap(),
            "--remote-cache",
            "--grace",
            "0",
            "--json",
        ])
        .stdout,
    );
    assert_eq!(dry[0]["dry_run"], true);
    assert!(dry[0]["removed_objects"].as_u64().unwrap() >= 3, "{dry:?}");
    let fresh = Workspace::new();
    let o2 = fresh.write("o.toml", &std::fs::read_to_string(&o).unwrap());
    assert_eq!(
        statuses(&parse_lines(&run(&fresh, &o2, s3, remote).stdout))[0].1,
        "cached"
    );

    let done = parse_lines(
        &flow(&[
            "gc",
            "--keep",
            p.to_str().unwrap(),
            "--remote-cache",
            "--delete",
            "--grace",
            "0",
            "--json",
        ])
        .stdout,
    );
    assert_eq!(done[0]["dry_run"], false);
    let fresh = Workspace::new();
    let o3 = fresh.write("o.toml", &std::fs::read_to_string(&o).unwrap());
    assert_eq!(
        statuses(&parse_lines(&run(&fresh, &o3, s3, remote).stdout))[0].1,
        "ran"
    );
    let p3 = fresh.write("p.toml", PIPELINE);
    let kept = statuses(&parse_lines(&run(&fresh, &p3, s3, remote).stdout));
    assert_eq!(with_status(&kept, "cached").len(), 3, "{kept:?}");

    // Damage one blob of `small`: verify finds it and evicts the record that needs it.
    let hash = blake3::hash(b"7\n").to_hex().to_string();
    s3.put_bytes(
        &format!("gcv/objects/blake3/{}/{}", &hash[..2], &hash[2..]),
        b"8\n",
    )
    .unwrap();
    let out = flow(&["cache", "verify", "--remote-cache", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = &parse_lines(&out.stdout)[0];
    assert_eq!(report["bad_objects"].as_array().unwrap().len(), 1);
    assert_eq!(report["evicted_records"].as_array().unwrap().len(), 1);
    assert!(
        flow(&["cache", "verify", "--remote-cache"])
            .status
            .success()
    );
}

#[test]
fn push_and_pull_all_through_a_file_remote() {
    let shared = tempfile::tempdir().unwrap();
    let remote = format!("file://{}", shared.path().display());
    let (a, b) = (Workspace::new(), Workspace::new());
    let p = a.write("p.toml", PIPELINE);
    let o = a.write(
        "o.toml",
        "[stage.other]\nkind = \"command\"\nrun = \"echo other > $FLOW_OUT/o\"\n",
    );
    a.run_statuses(&p, &[]);
    a.run_statuses(&o, &[]);
    let out = a.flow(&["push", "--all", "--remote", &remote, "--json"]);
    common::assert_ok(&out);
    assert_eq!(parse_lines(&out.stdout)[0]["stages"], 4);
    let out = b.flow(&["pull", "--all", "--remote", &remote, "--json"]);
    common::assert_ok(&out);
    assert_eq!(parse_lines(&out.stdout)[0]["stages"], 4);
    // No remote needed any more: everything is local on B.
    let q = b.write("p.toml", PIPELINE);
    assert_eq!(with_status(&b.run_statuses(&q, &[]), "cached").len(), 3);
    assert_eq!(outputs(&a, &p), outputs(&b, &q));
    let usage = a.flow(&["push", "--remote", &remote]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "a pipeline or --all is required"
    );
}
