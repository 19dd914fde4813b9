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

// --- Trust boundaries: a remote is untrusted input -------------------------------------
//
// Anyone who can write to the bucket plants objects below; a fresh machine then runs
// against it. Nothing outside its cache may change, and nothing of its may be uploaded.

/// A remote that a test plants objects in, as anyone with write access could: a `file://`
/// directory, or a prefix of the shared S3 bucket.
enum Bucket {
    File(tempfile::TempDir),
    S3(&'static S3, String),
}

impl Bucket {
    /// The same test against both kinds of remote.
    fn both(name: &str) -> [Bucket; 2] {
        [
            Bucket::File(tempfile::tempdir().unwrap()),
            Bucket::S3(S3::shared(), format!("evil-{name}")),
        ]
    }

    fn url(&self) -> String {
        match self {
            Bucket::File(d) => format!("file://{}", d.path().display()),
            Bucket::S3(_, prefix) => format!("s3://flow-test/{prefix}"),
        }
    }

    /// Writes (or overwrites) an object.
    fn put(&self, rel: &str, bytes: &[u8]) {
        match self {
            Bucket::File(d) => {
                let p = d.path().join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            Bucket::S3(s3, prefix) => s3.put_bytes(&format!("{prefix}/{rel}"), bytes).unwrap(),
        }
    }

    fn has(&self, rel: &str) -> bool {
        match self {
            Bucket::File(d) => d.path().join(rel).exists(),
            Bucket::S3(s3, prefix) => s3.exists(&format!("{prefix}/{rel}")),
        }
    }

    /// Stores bytes as a blob where flow looks for them; returns their blake3.
    fn put_blob(&self, bytes: &[u8]) -> String {
        let hash = blake3::hash(bytes).to_hex().to_string();
        self.put(&blob_rel(&hash), bytes);
        hash
    }

    /// `flow run --json --remote` of a workspace's pipeline against this remote.
    fn run(&self, ws: &Workspace, p: &Path) -> std::process::Output {
        let url = self.url();
        let mut cmd = ws.command(&["run", p.to_str().unwrap(), "--json", "--remote", &url]);
        if let Bucket::S3(s3, _) = self {
            cmd.envs(s3.env());
        }
        cmd.output().unwrap()
    }
}

fn blob_rel(hash: &str) -> String {
    format!("objects/blake3/{}/{}", &hash[..2], &hash[2..])
}

const VICTIM: &str = "[stage.a]\nkind = \"command\"\nrun = \"echo hello > $FLOW_OUT/out.txt\"\n";

/// A fresh machine about to run [`VICTIM`], with files beside (outside) its cache that a
/// remote must not reach: `sentinel` must keep its bytes, `secret` must neither change nor
/// reach the bucket, and `outside`, `abs-created`, `planted.json` must not appear.
struct Victim {
    ws: Workspace,
    p: std::path::PathBuf,
    key: String,
    secret: Vec<u8>,
}

impl Victim {
    fn new() -> Victim {
        let ws = Workspace::new();
        let p = ws.write("p.toml", VICTIM);
        ws.write("sentinel", "original\n");
        let secret = format!("secret of {:?}\n", ws.path()).into_bytes();
        std::fs::write(ws.path().join("secret"), &secret).unwrap();
        let plan = ws.json(&["plan", p.to_str().unwrap()], true);
        let key = plan.iter().find(|e| e["stage"] == "a").unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        Victim { ws, p, key, secret }
    }

    /// An absolute path beside the cache, as a string a planted object can carry.
    fn abs(&self, name: &str) -> String {
        self.ws.path().join(name).display().to_string()
    }

    fn assert_untouched(&self, bucket: &Bucket, case: &str) {
        let dir = self.ws.path();
        assert_eq!(
            std::fs::read_to_string(dir.join("sentinel")).unwrap(),
            "original\n",
            "{case}: a file outside the cache was overwritten"
        );
        for name in ["outside", "abs-created", "planted.json"] {
            assert!(!dir.join(name).exists(), "{case}: {name} was created");
        }
        assert_eq!(
            std::fs::read(dir.join("secret")).ok().as_deref(),
            Some(self.secret.as_slice()),
            "{case}: a file outside the cache was changed or deleted"
        );
        let leaked = blob_rel(&blake3::hash(&self.secret).to_hex());
        assert!(!bucket.has(&leaked), "{case}: a local file was uploaded");
    }

    /// Runs the pipeline against a bucket holding a planted object: it must be refused with
    /// an error naming it and its bad field, and nothing outside the cache may change.
    fn run_planted(
        &self,
        bucket: &Bucket,
        object: &str,
        field: &str,
        case: &str,
    ) -> std::process::Output {
        let out = bucket.run(&self.ws, &self.p);
        self.assert_refused(&out, object, field, case);
        self.assert_untouched(bucket, case);
        out
    }

    /// The planted object was refused with an error naming it, and no process panicked.
    fn assert_refused(&self, out: &std::process::Output, object: &str, field: &str, case: &str) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
        assert!(
            stderr.contains(object) && stderr.contains(field),
            "{case}: the error should name {object} and {field}: {stderr}"
        );
    }

    /// Stage `a`'s status in a `flow run --json` output.
    fn status(out: &std::process::Output) -> String {
        statuses(&parse_lines(&out.stdout))
            .into_iter()
            .find(|(s, _)| s == "a")
            .map(|(_, st)| st)
            .unwrap_or_default()
    }
}

#[test]
fn a_planted_checkpoint_index_writes_nothing_outside_scratch() {
    for bucket in Bucket::both("ckpt-names") {
        let blob = bucket.put_blob(b"pwned\n");
        for name in ["../../../outside", "abs-created", "sentinel"] {
            let v = Victim::new();
            let name = match name {
                "../../../outside" => name.to_string(),
                other => v.abs(other),
            };
            let index = serde_json::json!({ &name: {"blake3": blob, "size": 6} });
            let rel = format!("scratch/{}/index.json", v.key);
            bucket.put(&rel, index.to_string().as_bytes());
            let case = format!("{} checkpoint `{name}`", bucket.url());
            let out = v.run_planted(&bucket, &rel, &name, &case);
            assert_eq!(out.status.code(), Some(1), "{case}: the stage must fail");
            assert_eq!(Victim::status(&out), "failed", "{case}");
        }
    }
}

#[test]
fn a_planted_checkpoint_digest_reads_and_uploads_no_local_file() {
    for bucket in Bucket::both("ckpt-digests") {
        for bad in ["ab/SECRET", "a", "aé"] {
            let v = Victim::new();
            // `ab` + an absolute path once resolved to that file, which was copied into
            // scratch and pushed with the next checkpoint; short digests panicked.
            let digest = bad.replace("/SECRET", &v.abs("secret"));
            let index = serde_json::json!({"ckpt": {"blake3": &digest, "size": 1}});
            let rel = format!("scratch/{}/index.json", v.key);
            bucket.put(&rel, index.to_string().as_bytes());
            let case = format!("{} checkpoint digest `{digest}`", bucket.url());
            let out = v.run_planted(&bucket, &rel, "blake3", &case);
            assert_eq!(out.status.code(), Some(1), "{case}: the stage must fail");
        }
    }
}

/// A genuine run record of [`VICTIM`], as JSON, made on a machine of its own.
fn genuine_record() -> serde_json::Value {
    let v = Victim::new();
    v.ws.run_statuses(&v.p, &[]);
    let bytes = std::fs::read(v.ws.cache().join(format!("runs/{}.json", v.key))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_planted_manifest_links_and_deletes_nothing_outside_the_cache() {
    let template = genuine_record();
    for bucket in Bucket::both("manifests") {
        let blob = bucket.put_blob(b"pwned\n");
        let cases = [
            ("../../../outside", blob.clone(), "path"),
            ("ABS/abs-created", blob.clone(), "path"),
            ("out.txt", "a".to_string(), "blake3"),
            ("out.txt", "ab/SECRET".to_string(), "blake3"),
        ];
        for (path, digest, field) in cases {
            let v = Victim::new();
            let path = path.replace("ABS/", &format!("{}/", v.ws.path().display()));
            let digest = digest.replace("/SECRET", &v.abs("secret"));
            let manifest = serde_json::json!({"format": "flow-artifact-v1",
                "files": [{"path": &path, "size": 6, "blake3": &digest}]})
            .to_string();
            let d = blake3::hash(manifest.as_bytes()).to_hex().to_string();
            let manifest_rel = format!("artifacts/{}/{d}.json", &d[..2]);
            bucket.put(&manifest_rel, manifest.as_bytes());
            let mut record = template.clone();
            record["outputs"] = serde_json::json!({"out": d});
            bucket.put(
                &format!("runs/{}.json", v.key),
                record.to_string().as_bytes(),
            );
            let case = format!("{} manifest entry `{path}` / `{digest}`", bucket.url());
            let out = v.run_planted(&bucket, &manifest_rel, field, &case);
            common::assert_ok(&out);
            assert_eq!(Victim::status(&out), "ran", "{case}: not pulled, computed");
        }
    }
}

#[test]
fn a_planted_run_record_is_checked_against_the_key_it_was_asked_for() {
    for bucket in Bucket::both("records") {
        // A genuine result on the remote: only the record is then tampered with.
        let a = Victim::new();
        common::assert_ok(&bucket.run(&a.ws, &a.p));
        let record_rel = format!("runs/{}.json", a.key);
        let genuine = genuine_record();
        let other_key = "0".repeat(64);
        let cases: [(&str, serde_json::Value, &str); 5] = [
            ("key", serde_json::json!("../../planted"), "key"),
            ("key", serde_json::json!(other_key), "key"),
            ("outputs", serde_json::json!({"out": "ab"}), "outputs.out"),
            (
                "outputs",
                serde_json::json!({"out": "ab/../../../x"}),
                "outputs.out",
            ),
            ("outputs", serde_json::json!({}), "outputs"),
        ];
        for (field, value, named) in cases {
            let v = Victim::new();
            let mut record = genuine.clone();
            record[field] = value.clone();
            bucket.put(&record_rel, record.to_string().as_bytes());
            let case = format!("{} record with {field} = {value}", bucket.url());
            let out = v.run_planted(&bucket, &record_rel, named, &case);
            common::assert_ok(&out);
            assert_eq!(Victim::status(&out), "ran", "{case}: not pulled, computed");
            let runs = v.ws.cache().join("runs");
            assert!(
                !runs.join(format!("{other_key}.json")).exists(),
                "{case}: a record was written under the key it claims"
            );
            assert!(!runs.join("../planted.json").exists(), "{case}");
        }
        // The genuine record still pulls: the checks refuse only what is wrong.
        bucket.put(&record_rel, genuine.to_string().as_bytes());
        let v = Victim::new();
        let out = bucket.run(&v.ws, &v.p);
        common::assert_ok(&out);
        assert_eq!(Victim::status(&out), "cached", "{}", bucket.url());
    }
}

// --- Remote consistency ------------------------------------------------------------------

impl Bucket {
    fn delete(&self, rel: &str) {
        match self {
            Bucket::File(d) => std::fs::remove_file(d.path().join(rel)).unwrap(),
            Bucket::S3(s3, prefix) => s3.delete(&format!("{prefix}/{rel}")),
        }
    }

    /// The remote opened in this process, as a second machine would.
    fn open(&self) -> flow::remote::Remote {
        match self {
            Bucket::File(_) => flow::remote::Remote::open(&self.url()).unwrap(),
            Bucket::S3(s3, _) => {
                let options = s3.options();
                let options: Vec<(&str, &str)> =
                    options.iter().map(|(k, v)| (*k, v.as_str())).collect();
                flow::remote::Remote::open_with(&self.url(), &options).unwrap()
            }
        }
    }

    /// `flow ARGS --remote URL` in a workspace, against this remote.
    fn flow(&self, ws: &Workspace, args: &[&str]) -> std::process::Output {
        let url = self.url();
        let mut cmd = ws.command(args);
        cmd.args(["--remote", &url]);
        if let Bucket::S3(s3, _) = self {
            cmd.envs(s3.env());
        }
        cmd.output().unwrap()
    }
}

/// The manifest digest and blob hashes of a workspace's stage output, from its local cache.
fn artifact_of(ws: &Workspace, p: &Path, stage: &str) -> (String, Vec<String>) {
    let plan = ws.json(&["plan", p.to_str().unwrap()], true);
    let key = plan.iter().find(|e| e["stage"] == stage).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.cache().join(format!("runs/{key}.json"))).unwrap(),
    )
    .unwrap();
    let digest = record["outputs"]["out"].as_str().unwrap().to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            ws.cache()
                .join(format!("artifacts/{}/{digest}.json", &digest[..2])),
        )
        .unwrap(),
    )
    .unwrap();
    let blobs = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["blake3"].as_str().unwrap().to_string())
        .collect();
    (digest, blobs)
}

fn manifest_rel(digest: &str) -> String {
    format!("artifacts/{}/{digest}.json", &digest[..2])
}

/// A remote entry that lost a blob or a manifest is found by `verify` and repaired by
/// `push` from a machine that has the data; `push` used to skip every key with a record.
#[test]
fn verify_finds_missing_blobs_and_manifests_and_push_repairs_them() {
    for bucket in Bucket::both("repair") {
        let a = Workspace::new();
        let p = a.write("p.toml", PIPELINE);
        common::assert_ok(&bucket.run(&a, &p));
        let (small, small_blobs) = artifact_of(&a, &p, "small");
        let (big, big_blobs) = artifact_of(&a, &p, "big");
        let case = bucket.url();

        // A blob vanishes; the record stays. `push` alone puts it back.
        bucket.delete(&blob_rel(&small_blobs[0]));
        let out = bucket.flow(&a, &["push", p.to_str().unwrap(), "--json"]);
        common::assert_ok(&out);
        assert!(
            bucket.has(&blob_rel(&small_blobs[0])),
            "{case}: push repairs a blob"
        );
        assert_eq!(
            parse_lines(&out.stdout).pop().unwrap()["transfer"]["files"],
            1
        );

        // A blob and a manifest vanish: verify names both and evicts the records.
        bucket.delete(&blob_rel(&small_blobs[1]));
        bucket.delete(&manifest_rel(&big));
        let out = bucket.flow(&a, &["cache", "verify", "--remote-cache", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{case}");
        let report = &parse_lines(&out.stdout)[0];
        assert_eq!(
            report["missing_objects"],
            serde_json::json!([small_blobs[1]]),
            "{case}"
        );
        assert_eq!(
            report["missing_manifests"],
            serde_json::json!([big]),
            "{case}"
        );
        // `small` and `big`; `join` names neither artifact.
        assert_eq!(
            report["evicted_records"].as_array().unwrap().len(),
            2,
            "{case}"
        );

        // Push repairs from local data; then verify is clean and a fresh machine reuses all.
        common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
        assert!(bucket.has(&manifest_rel(&big)) && bucket.has(&blob_rel(&big_blobs[0])));
        assert!(bucket.has(&manifest_rel(&small)));
        let out = bucket.flow(&a, &["cache", "verify", "--remote-cache", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{case}: {:?}",
            parse_lines(&out.stdout)
        );
        let b = Workspace::new();
        let q = b.write("p.toml", PIPELINE);
        let out = bucket.run(&b, &q);
        common::assert_ok(&out);
        let s = statuses(&parse_lines(&out.stdout));
        assert_eq!(with_status(&s, "cached").len(), 3, "{case}: {s:?}");
        assert_eq!(outputs(&a, &p), outputs(&b, &q));
    }
}

/// Two machines racing for one expired lease: exactly one takes it, every time; the other
/// is told who holds it. A holder whose lease expired and was taken over learns it at its
/// next renewal. (Takeover used to be delete-then-create: both racers could hold it.)
#[test]
fn exactly_one_of_two_machines_racing_for_an_expired_lease_takes_it() {
    use flow::remote::LeaseAttempt;
    for bucket in Bucket::both("leases") {
        let (one, two) = (bucket.open(), bucket.open());
        for round in 0..40u32 {
            let key = format!("{round:064x}");
            bucket.put(
                &format!("leases/{key}/{:020}.json", 7),
                br#"{"holder": "a machine that died", "expires": 1}"#,
            );
            let barrier = std::sync::Barrier::new(2);
            let take = |remote: &flow::remote::Remote, me: &str| {
                barrier.wait();
                remote.try_lease(&key, me, 60).unwrap()
            };
            let (first, second) = std::thread::scope(|s| {
                let a = s.spawn(|| take(&one, "one"));
                let b = s.spawn(|| take(&two, "two"));
                (a.join().unwrap(), b.join().unwrap())
            });
            let taken = [&first, &second]
                .iter()
                .filter(|r| matches!(r, LeaseAttempt::Taken(_)))
                .count();
            assert_eq!(
                taken,
                1,
                "{} round {round}: {first:?} {second:?}",
                bucket.url()
            );
            let winner = if matches!(first, LeaseAttempt::Taken(_)) {
                "one"
            } else {
                "two"
            };
            assert_eq!(one.lease_holder(&key).unwrap().as_deref(), Some(winner));
        }

        // A lease left to expire (ttl 0) is taken over; the old holder's renewal fails.
        let key = "f".repeat(64);
        let LeaseAttempt::Taken(g) = one.try_lease(&key, "one", 0).unwrap() else {
            panic!("a fresh key is free");
        };
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let LeaseAttempt::Taken(h) = two.try_lease(&key, "two", 60).unwrap() else {
            panic!("an expired lease is taken over");
        };
        assert!(h > g);
        let lost = one.renew_lease(&key, "one", g, 60).unwrap_err();
        assert!(lost.to_string().contains("taken over by two"), "{lost}");
        assert_eq!(one.lease_holder(&key).unwrap().as_deref(), Some("two"));
        assert_eq!(
            one.try_lease(&key, "one", 60).unwrap(),
            LeaseAttempt::HeldBy("two".into())
        );
        two.release_lease(&key, "two", h).unwrap();
        assert!(matches!(
            one.try_lease(&key, "one", 60).unwrap(),
            LeaseAttempt::Taken(_)
        ));
    }
}

/// `gc` spares what a push in flight has uploaded before its record (young objects), and a
/// push uploads again an old object it reuses, so a `gc` running beside it does not take
/// it. Here the push in flight is a pushed key whose record is not there (yet).
#[test]
fn remote_gc_spares_a_push_in_flight() {
    for bucket in Bucket::both("gc-push") {
        let a = Workspace::new();
        let p = a.write("p.toml", PIPELINE);
        let o = a.write(
            "o.toml",
            "[stage.other]\nkind = \"command\"\nrun = \"echo o > $FLOW_OUT/o\"\n",
        );
        common::assert_ok(&bucket.run(&a, &p));
        let (small, blobs) = artifact_of(&a, &p, "small");
        let plan = a.json(&["plan", p.to_str().unwrap()], true);
        let key = plan.iter().find(|e| e["stage"] == "small").unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        bucket.delete(&format!("runs/{key}.json"));
        let case = bucket.url();

        // gc keeping another pipeline only: the young, unreferenced objects stay.
        let gc = |grace: &str| {
            let args = [
                "gc",
                "--keep",
                o.to_str().unwrap(),
                "--remote-cache",
                "--delete",
            ];
            let mut args = args.to_vec();
            if !grace.is_empty() {
                args.extend(["--grace", grace]);
            }
            common::assert_ok(&bucket.flow(&a, &args));
        };
        gc("");
        assert!(
            bucket.has(&manifest_rel(&small)),
            "{case}: gc took a young manifest"
        );
        assert!(
            blobs.iter().all(|b| bucket.has(&blob_rel(b))),
            "{case}: gc took young blobs"
        );
        // The push completes: the key is whole.
        common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
        let b = Workspace::new();
        let q = b.write("p.toml", PIPELINE);
        let s = statuses(&parse_lines(&bucket.run(&b, &q).stdout));
        assert_eq!(with_status(&s, "cached").len(), 3, "{case}: {s:?}");

        // Freshening: objects a push reuses that are older than an hour are uploaded again.
        if let Bucket::File(dir) = &bucket {
            let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86400);
            for blob in &blobs {
                let f = std::fs::File::options()
                    .write(true)
                    .open(dir.path().join(blob_rel(blob)))
                    .unwrap();
                f.set_modified(old).unwrap();
            }
            common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
            for blob in &blobs {
                let modified = std::fs::metadata(dir.path().join(blob_rel(blob)))
                    .unwrap()
                    .modified()
                    .unwrap();
                assert!(
                    modified > old + std::time::Duration::from_secs(86400),
                    "{blob} not freshened"
                );
            }
        }
        // Without the grace period, unreferenced objects go (what gc did to pushes in flight).
        bucket.delete(&format!("runs/{key}.json"));
        gc("0");
        assert!(
            !bucket.has(&manifest_rel(&small)),
            "{case}: --grace 0 collects"
        );
    }
}
