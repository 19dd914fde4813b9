//! Engine benchmarks (run with `cargo bench --bench engine`); figures go to BENCHMARKS.md.
//!
//! 1. `flow run` of a generated pipeline of 1,000 `command` stages, all cached (target < 0.5 s).
//! 2. blake3 hashing of a 1 GiB file through the cache's hasher (target >= 1.5 GiB/s per core).

use std::io::Write;
use std::process::Command;
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let flow = env!("CARGO_BIN_EXE_flow");

    // A binary-tree-shaped DAG: stage i reads stage (i-1)/2.
    let mut text = String::from("[pipeline]\nname = \"bench1000\"\n");
    for i in 0..1000 {
        text.push_str(&format!(
            "\n[stage.s{i}]\nkind = \"command\"\nrun = \"echo {i} > $FLOW_OUT/v\"\n"
        ));
        if i > 0 {
            text.push_str(&format!("inputs = {{ up = \"s{}\" }}\n", (i - 1) / 2));
        }
    }
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, text).unwrap();
    let run = || {
        let out = Command::new(flow)
            .args(["run", pipeline.to_str().unwrap(), "-j", "2", "--json"])
            .env("FLOW_CACHE", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let t = Instant::now();
    run();
    println!(
        "cold run of 1000 command stages: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    for _ in 0..11 {
        let t = Instant::now();
        let out = run();
        times.push(t.elapsed().as_secs_f64());
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        assert!(last.contains("\"cached\":1000"), "{last}");
    }
    times.sort_by(f64::total_cmp);
    println!(
        "all-cached run of 1000 stages: median {:.3} s (min {:.3}, max {:.3}) over 11 runs",
        times[5], times[0], times[10]
    );

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
    rates.sort_by(f64::total_cmp);
    println!(
        "blake3 of a 1 GiB file (one thread, page cache warm): median {:.2} GiB/s (min {:.2}, max {:.2})",
        rates[2], rates[0], rates[4]
    );
}
