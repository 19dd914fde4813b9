//! Singular values of 7B-sized f32 matrices (4096 x 4096, the attention projections, and
//! 4096 x 11008, the MLP's) with faer, against numpy's LAPACK (`numpy.linalg.svd`,
//! `compute_uv=False`) on the same matrix in the same run (`cargo bench -p flow-stages --bench
//! svd`; `-- --small` for 1024 x 1024 and 1024 x 2752).
use std::process::Command;
use std::time::Instant;

use flow_stages::data::rng::Rng;
use flow_stages::model::weights::normal_vec;
use flow_stages::svd::spectrum::singular_values;

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    let small = std::env::args().any(|a| a == "--small");
    let shapes: &[(usize, usize)] = if small {
        &[(1024, 1024), (1024, 2752)]
    } else {
        &[(4096, 4096), (4096, 11008)]
    };
    let dir = tempfile::tempdir().unwrap();
    for &(rows, cols) in shapes {
        let a = normal_vec(&mut Rng::new(7), rows * cols, 1.0);
        let path = dir.path().join("a.f32");
        let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, bytes).unwrap();
        let start = Instant::now();
        let sv = singular_values(&a, rows, cols, threads);
        let faer_s = start.elapsed().as_secs_f64();
        let script = format!(
            "import numpy as np, time, sys\n\
             a = np.fromfile(sys.argv[1], dtype=np.float32).reshape({rows}, {cols})\n\
             t = time.perf_counter(); s = np.linalg.svd(a, compute_uv=False); t = time.perf_counter() - t\n\
             print(t, s[0], s[-1])"
        );
        let out = Command::new("python3")
            .args(["-c", &script, path.to_str().unwrap()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("OPENBLAS_NUM_THREADS", threads.to_string())
            .output()
            .expect("python3 with numpy");
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        println!(
            "{rows}x{cols} f32, {threads} threads: faer {faer_s:.2} s, numpy {:.2} s ({:.2}x numpy's time); sigma_max {:.3} vs {:.3}, sigma_min {:.4} vs {:.4}",
            f[0],
            faer_s / f[0],
            sv[0],
            f[1],
            sv[sv.len() - 1],
            f[2]
        );
    }
}
