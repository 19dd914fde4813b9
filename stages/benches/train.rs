//! Training throughput and peak memory of flow's trainers (`cargo bench -p flow-stages --bench
//! train`). Each configuration runs in its own process so that its peak resident memory is
//! its own. PyTorch's figures for the same configurations come from `benches/train_torch.py`.
//!
//! Without arguments: every configuration on the CPU engine, then on wgpu when an adapter is
//! there. `-- --device wgpu` (or cuda, vulkan) selects the device; `-- --one CONFIG MODE` is
//! the per-process worker.
use std::process::Command;
use std::time::Instant;

use flow_stages::cpu::llama::Batch;
use flow_stages::cpu::lora::{Adapters, LoraInit, LoraSpec};
use flow_stages::gpu::device::{Choice, select};
use flow_stages::model::config::LlamaConfig;
use flow_stages::model::weights::{Proj, Weights};
use flow_stages::train::cpu::CpuTrainer;
use flow_stages::train::optim::{Optimizer, Rule};
use flow_stages::train::trainer::Trainer;

/// (name, d, layers, heads, seq, rows, vocab, ff, steps)
type Config = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

const CONFIGS: &[Config] = &[
    ("small", 256, 4, 8, 256, 8, 8192, 704, 7),
    ("wide", 1024, 8, 16, 128, 2, 8192, 2816, 4),
];

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn one(config: &str, mode: &str, device: &str, threads: usize) {
    let &(_, d, layers, heads, seq, rows, vocab, ff, steps) = CONFIGS
        .iter()
        .find(|c| c.0 == config)
        .expect("known config");
    let cfg = LlamaConfig::new(vocab, d, ff, layers, heads, heads, seq, false);
    let w = Weights::init(&cfg, 1);
    let ids: Vec<u32> = (0..rows * seq)
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    let targets: Vec<i32> = (0..rows * seq)
        .map(|i| (((i + 1) * 7919) % vocab) as i32)
        .collect();
    let batch = Batch {
        rows,
        seq,
        ids,
        targets,
        pos: (0..rows).flat_map(|_| 0..seq as u32).collect(),
        seq_ids: None,
    };
    let lora = mode.strip_prefix("lora").map(|r| {
        let rank: usize = r.parse().expect("lora<rank>");
        let spec = LoraSpec {
            rank,
            alpha: 2.0 * rank as f64,
            rslora: false,
            dropout: 0.0,
            targets: Proj::ALL.to_vec(),
        };
        Adapters::init(&cfg, &spec, LoraInit::Kaiming, 3)
    });
    let sizes: Vec<usize> = match &lora {
        Some(l) => l.tensors.iter().map(|t| t.data.len()).collect(),
        None => w.tensors.iter().map(|t| t.data.len()).collect(),
    };
    let opt = Optimizer::new(
        Rule::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        0.0,
        1e-3,
        &sizes,
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let (mut trainer, what): (Box<dyn Trainer>, String) = match select(device).expect("device") {
        Choice::Cpu => (
            Box::new(CpuTrainer::new(w, lora, opt, seq, threads)),
            "cpu engine".into(),
        ),
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        Choice::Burn(dev, what) => (
            Box::new(flow_stages::gpu::trainer::BurnTrainer::new(
                w, lora, &opt, dev,
            )),
            what,
        ),
    };
    let mut times = Vec::new();
    pool.install(|| {
        for step in 0..steps {
            let t0 = Instant::now();
            let scale = 1.0 / batch.target_count() as f32;
            trainer.accumulate(&batch, scale, None);
            trainer.apply(1e-3, 1.0);
            if step >= 2 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
    });
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "flow", "device": what, "config": config, "mode": mode, "threads": threads,
            "step_s": (med * 1e4).round() / 1e4, "tokens_per_s": ((rows * seq) as f64 / med).round(),
            "peak_rss_mib": peak_rss_mib().round(),
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let device = args
        .iter()
        .position(|a| a == "--device")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| "cpu".into());
    if let Some(i) = args.iter().position(|a| a == "--one") {
        one(&args[i + 1], &args[i + 2], &device, threads);
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let devices: Vec<String> = if args.iter().any(|a| a == "--device") {
        vec![device]
    } else {
        vec!["cpu".into(), "wgpu".into()]
    };
    for dev in devices {
        for (config, ..) in CONFIGS {
            for mode in ["full", "lora16"] {
                if dev != "cpu" && *config == "wide" && std::env::var("FLOW_BENCH_WIDE").is_err() {
                    continue; // minutes on a software rasterizer; set FLOW_BENCH_WIDE to run it
                }
                let out = Command::new(&exe)
                    .args(["--one", config, mode, "--device", &dev])
                    .output()
                    .unwrap();
                print!("{}", String::from_utf8_lossy(&out.stdout));
                if !out.status.success() {
                    eprintln!(
                        "{dev} {config} {mode}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
    }
}
