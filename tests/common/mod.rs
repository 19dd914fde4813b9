//! Helpers for tests that drive the real `flow` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let out = self.flow(&all);
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
