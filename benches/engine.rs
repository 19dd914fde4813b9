//! Engine benchmarks (run with `cargo bench --bench engine`); figures go to BENCHMARKS.md.
//!
//! 1. The scheduler at scale, on two generated DAGs of trivial `command` stages (`echo i >
//!    $FLOW_OUT/o`): a binary tree (stage i reads stage (i-1)/2) and a wide one (n
//!    independent stages feeding one join). For each size: a cold `flow run` (time per stage,
//!    the parent's peak RSS), no-op reruns and `flow plan`. Targets: per-stage time at
//!    100,000 within 2x of that at 1,000; no-op 10,000 < 0.25 s and 100,000 < 2.5 s; plan of
//!    100,000 < 3 s; parent RSS at 100,000 < 500 MB.
//! 2. Snakemake on the same tree DAG (one wildcard rule, `-j 2`), cold and no-op, where it
//!    is installed (`pip install snakemake`): the anchor.
//! 3. blake3 hashing of a 1 GiB file through the cache's hasher (target >= 1.5 GiB/s per core).
//!
//! `FLOW_BENCH_SIZES` (default `1000,10000,100000`) picks the sizes, `FLOW_BENCH_ONLY` one
//! section (`scale`, `snakemake`, `hash`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    let only = std::env::var("FLOW_BENCH_ONLY").ok();
    let wants = |s: &str| only.as_deref().is_none_or(|o| o == s);
    let sizes: Vec<usize> = std::env::var("FLOW_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("FLOW_BENCH_SIZES: numbers"))
        .collect();
    if wants("scale") {
        for tree in [true, false] {
            for &n in &sizes {
                scale(n, tree);
            }
        }
    }
    if wants("snakemake") {
        for &n in sizes.iter().filter(|n| **n <= 10_000) {
            snakemake(n);
        }
    }
    if wants("hash") {
        hashing();
    }
}

/// The generated pipeline's text.
fn pipeline_text(n: usize, tree: bool) -> String {
    let mut text = format!("[pipeline]\nname = \"bench{n}\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "\n[stage.s{i}]\nkind = \"command\"\nrun = \"echo {i} > $FLOW_OUT/o\"\n"
        ));
        if tree && i > 0 {
            text.push_str(&format!("inputs = {{ up = \"s{}\" }}\n", (i - 1) / 2));
        }
    }
    if !tree {
        text.push_str("\n[stage.join]\nkind = \"command\"\nrun = \"ls $FLOW_IN_ALL | wc -l > $FLOW_OUT/o\"\ninputs = { all = [");
        for i in 0..n {
            text.push_str(&format!("{}\"s{i}\"", if i > 0 { ", " } else { "" }));
        }
        text.push_str("] }\n");
    }
    text
}

/// A finished command: wall seconds, peak RSS in MB (of that process alone, from wait4),
/// its stdout, and whether it exited 0.
struct Measured {
    secs: f64,
    rss_mb: f64,
    stdout: String,
    ok: bool,
}

// The child is reaped by wait4 (for its own rusage), not by std's wait.
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command, dir: &Path) -> Measured {
    let out_path = dir.join("stdout.txt");
    let err_path = dir.join("stderr.txt");
    cmd.stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .stdin(Stdio::null());
    let t = Instant::now();
    let child = cmd.spawn().expect("starts");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our own child, reaped here once (std's Child is not waited on).
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let secs = t.elapsed().as_secs_f64();
    assert!(pid > 0, "wait4 failed");
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        eprintln!(
            "command failed: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    Measured {
        secs,
        rss_mb: usage.ru_maxrss as f64 / 1024.0,
        stdout,
        ok,
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn scale(n: usize, tree: bool) {
    let shape = if tree { "tree" } else { "wide" };
    let stages = if tree { n } else { n + 1 };
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, pipeline_text(n, tree)).unwrap();
    let jobs = if n >= 100_000 { "8" } else { "2" };
    let flow = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flow"));
        c.args(args)
            .arg(&pipeline)
            .args(["--json"])
            .env("FLOW_CACHE", dir.path().join("cache"));
        c
    };
    let plan_cold = median(
        (0..3)
            .map(|_| measure(&mut flow(&["plan"]), dir.path()).secs)
            .collect(),
    );
    let cold = measure(&mut flow(&["run", "-j", jobs]), dir.path());
    assert!(cold.ok, "the cold run failed");
    let last = cold.stdout.lines().last().unwrap_or_default().to_string();
    assert!(last.contains(&format!("\"ran\":{stages}")), "{last}");
    println!(
        "{shape} {n}: cold run -j {jobs}: {:.1} s, {:.2} ms per stage, parent peak RSS {:.0} MB; {last}",
        cold.secs,
        cold.secs * 1000.0 / stages as f64,
        cold.rss_mb
    );
    let reps = if n >= 100_000 { 5 } else { 11 };
    let mut rss: f64 = 0.0;
    let noop = median(
        (0..reps)
            .map(|_| {
                let m = measure(&mut flow(&["run", "-j", jobs]), dir.path());
                assert!(m.ok, "the no-op run failed");
                let last = m.stdout.lines().last().unwrap_or_default().to_string();
                assert!(last.contains(&format!("\"cached\":{stages}")), "{last}");
                rss = rss.max(m.rss_mb);
                m.secs
            })
            .collect(),
    );
    println!(
        "{shape} {n}: no-op run: median {:.3} s (min {:.3}, max {:.3}) over {reps}, peak RSS {rss:.0} MB",
        noop.0, noop.1, noop.2
    );
    let plan = median(
        (0..3)
            .map(|_| measure(&mut flow(&["plan"]), dir.path()).secs)
            .collect(),
    );
    println!(
        "{shape} {n}: plan: {:.3} s empty cache, {:.3} s all done (medians of 3)",
        plan_cold.0, plan.0
    );
}

/// Snakemake on the tree DAG: one wildcard rule, the same shell command per job.
fn snakemake(n: usize) {
    let Ok(version) = Command::new("snakemake").arg("--version").output() else {
        println!("snakemake: not installed (pip install snakemake), skipped");
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let snakefile: PathBuf = dir.path().join("Snakefile");
    std::fs::write(
        &snakefile,
        format!(
            "N = {n}\n\
             rule all:\n    input: expand(\"out/{{i}}.txt\", i=range(N))\n\
             def up(w):\n    i = int(w.i)\n    return [] if i == 0 else [f\"out/{{(i - 1) // 2}}.txt\"]\n\
             rule s:\n    input: up\n    output: \"out/{{i}}.txt\"\n    shell: \"echo {{wildcards.i}} > {{output}}\"\n"
        ),
    )
    .unwrap();
    // Bounded: Snakemake's time grows faster than linearly with the number of jobs.
    let limit = 900;
    let run = || {
        let mut c = Command::new("timeout");
        c.arg(limit.to_string())
            .args(["snakemake", "-j", "2", "--quiet", "all", "-s"])
            .arg(&snakefile)
            .current_dir(dir.path());
        measure(&mut c, dir.path())
    };
    let cold = run();
    if !cold.ok {
        println!("snakemake {version} tree {n}: cold -j 2 did not finish in {limit} s");
        return;
    }
    let noop = median((0..3).map(|_| run().secs).collect());
    println!(
        "snakemake {version} tree {n}: cold -j 2: {:.1} s ({:.2} ms per job), peak RSS {:.0} MB; no-op: median {:.3} s of 3",
        cold.secs,
        cold.secs * 1000.0 / n as f64,
        cold.rss_mb,
        noop.0
    );
}

fn hashing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("big.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9E3779B97F4A7C15u64;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    for _ in 0..1024 {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let h = flow::store::hash::hash_file(&path).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(h.len(), 64);
        rates.push(1.0 / s);
    }
    let (med, lo, hi) = median(rates);
    println!(
        "blake3 of a 1 GiB file (one thread, page cache warm): median {med:.2} GiB/s (min {lo:.2}, max {hi:.2})"
    );
}
