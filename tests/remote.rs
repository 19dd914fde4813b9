//! The remote cache against a real S3-compatible server (SeaweedFS on 127.0.0.1).

mod common;

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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        with_status(&statuses(&parse_lines(&out.stdout)), "ran").len(),
        3
    );

    // A fresh machine: empty local cache, same pipeline. Nothing runs.
    let b = Workspace::new();
    let q = b.write("p.toml", PIPELINE);
    let out = run(&b, &q, s3, remote);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
        "a result that cannot be shared fails the run"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("push failed  a: remote s3://flow-test/creds"),
        "{stderr}"
    );
    assert!(
        stderr.contains("403") || stderr.contains("SignatureDoesNotMatch"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("not-the-secret-xyz"),
        "the secret leaked: {stderr}"
    );
}

#[test]
fn a_server_killed_mid_push_leaves_no_record_and_the_next_run_completes() {
    let base = 30000 + (std::process::id() % 100) * 25;
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
