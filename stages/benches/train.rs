//! Training throughput and peak memory of flow's trainers (`cargo bench -p flow-stages --bench
//! train`). Each configuration runs in its own process so that its peak resident memory is
//! its own. PyTorch's figures for the same configurations come from `benches/train_torch.py`.
//!
//! Without arguments: every configuration on the CPU engine, then on wgpu when an adapter is
//! there. `-- --device wgpu` (or cuda, vulkan) selects the device, `-- --precision f16` (or
//! bf16) a burn device's compute type, `-- --checkpointing` activation checkpointing there,
//! `-- --bf16-state` the optimizer's moments stored in bf16, `-- --compare` the CPU engine
//! beside it as the reference (the largest weight difference); `-- --one CONFIG MODE` is the
//! per-process worker. `-- --attention ROWS,HEADS,T,HEAD_DIM` times one layer's attention
//! (fused kernels against materialized scores), `-- --lora-linear D TOKENS` one LoRA Linear.
//!
//! On a burn device a run also counts the kernels one step launches (forward and backward,
//! then the optimizer); `-- --kernels` adds each kernel's device time in that step, the
//! longest first: where the step's time goes.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[path = "train/kernels.rs"]
mod kernels;

use std::process::Command;
use std::time::Instant;

use flow_stages::cpu::batch::Batch;
use flow_stages::cpu::llama::Dropouts;
use flow_stages::cpu::lora::{Adapters, LoraInit, LoraSpec};
use flow_stages::gpu::device::{Choice, select};
use flow_stages::gpu::precision::Precision;
use flow_stages::model::config::ModelConfig;
use flow_stages::model::weights::{Proj, Weights};
use flow_stages::train::cpu::CpuTrainer;
use flow_stages::train::optim::{Optimizer, Rule, StateType};
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
    // A step's kernels, counted in seconds on a software adapter (lavapipe): a step launches
    // the same kernels per layer whatever the width.
    ("tiny", 64, 2, 4, 64, 2, 512, 176, 4),
    ("small", 256, 4, 8, 256, 8, 8192, 704, 7),
    // The shipped studies' model and batch (d=256, 4 layers, 16 rows of 128, their vocabulary).
    ("study", 256, 4, 8, 128, 16, 1132, 704, 12),
    // The same with the IFT studies' rows: one pair each, 75-128 tokens, padded to 128.
    ("study-ift", 256, 4, 8, 128, 16, 1132, 704, 12),
    ("wide", 1024, 8, 16, 128, 2, 8192, 2816, 4),
    // GPU-sized (run with --one large ...; far too slow for a CPU run).
    ("large", 2048, 8, 16, 1024, 4, 32000, 5632, 6),
    // Llama-2-7B's shape at the paper's sequence length, micro-batch 1 (issue 19's memory
    // target: full finetuning in 80 GB with f16 and activation checkpointing, LoRA r=256).
    ("7b", 4096, 32, 32, 4096, 1, 32000, 11008, 4),
];

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// How a burn device trains in a run: `--precision`, `--checkpointing`, `--bf16-state`,
/// `--compare` (the CPU engine beside it) and `--kernels` (each kernel's time in a step).
struct Options {
    precision: Precision,
    checkpointing: bool,
    state_type: StateType,
    compare: bool,
    timed_kernels: bool,
}

fn one(config: &str, mode: &str, device: &str, threads: usize, options: &Options) {
    let &Options {
        precision,
        checkpointing,
        state_type,
        compare,
        timed_kernels,
    } = options;
    // As the stage worker does (`flow __stage`); FLOW_BENCH_GLIBC_DEFAULTS measures without.
    if std::env::var_os("FLOW_BENCH_GLIBC_DEFAULTS").is_none() {
        flow_stages::cpu::alloc::keep_freed_memory();
    }
    let &(_, d, layers, heads, seq, rows, vocab, ff, steps) = CONFIGS
        .iter()
        .find(|c| c.0 == config)
        .expect("known config");
    let cfg = ModelConfig::new(vocab, d, ff, layers, heads, heads, seq, false);
    let w = Weights::init(&cfg, 1);
    let ids: Vec<u32> = (0..rows * seq)
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    // `-ift`: row r trains on its first 75 + 23r mod 54 positions (mean 101 of 128, the IFT
    // studies' fill); the rest is padding, which the CPU engine cuts.
    let trained = |i: usize| !config.ends_with("-ift") || i % seq < 75 + (i / seq * 23) % 54;
    let targets: Vec<i32> = (0..rows * seq)
        .map(|i| {
            if trained(i) {
                (((i + 1) * 7919) % vocab) as i32
            } else {
                -1
            }
        })
        .collect();
    let batch = Batch {
        rows,
        seq,
        ids,
        targets,
        pos: (0..rows).flat_map(|_| 0..seq as u32).collect(),
        seq_ids: None,
        lens: None,
    };
    // `lora16-drop`: PEFT's lora_dropout 0.05 on every adapter input, the studies' default.
    let (mode_rank, lora_dropout) = match mode.strip_suffix("-drop") {
        Some(m) => (m, 0.05),
        None => (mode, 0.0),
    };
    let lora = mode_rank.strip_prefix("lora").map(|r| {
        let rank: usize = r.parse().expect("lora<rank>");
        let spec = LoraSpec {
            rank,
            alpha: 2.0 * rank as f64,
            rslora: false,
            dropout: lora_dropout,
            targets: Proj::ALL.to_vec(),
        };
        Adapters::init(&cfg, &spec, LoraInit::Kaiming, 3)
    });
    let sizes: Vec<usize> = match &lora {
        Some(l) => l.tensors.iter().map(|t| t.data.len()).collect(),
        None => w.tensors.iter().map(|t| t.data.len()).collect(),
    };
    // The 7B shape trains with the paper's LionW (one moment; issue 19 item 7), the rest
    // with AdamW as PyTorch's side does.
    let rule = if config == "7b" {
        Rule::LionW {
            beta1: 0.9,
            beta2: 0.99,
        }
    } else {
        Rule::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    };
    let opt = Optimizer::new(rule, 0.0, 1e-3, &sizes).with_state_type(state_type);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let choice = select(device).expect("device");
    precision
        .check(&choice)
        .expect("a device with that precision");
    state_type
        .check(&choice)
        .expect("a device that stores the optimizer state's type");
    // `--compare`: flow's CPU engine (the reference) trains the same steps beside the device
    // and the largest weight difference is reported (its step times then count both).
    let mut reference: Option<Box<dyn Trainer>> = compare.then(|| {
        Box::new(CpuTrainer::new(
            w.clone(),
            lora.clone(),
            opt.clone(),
            seq,
            threads,
        )) as Box<dyn Trainer>
    });
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let burn_device = match &choice {
        Choice::Burn(dev, _) => Some(dev.clone()),
        _ => None,
    };
    let (mut trainer, what): (Box<dyn Trainer>, String) = match choice {
        Choice::Cpu => (
            Box::new(CpuTrainer::new(w, lora, opt, seq, threads)),
            "cpu engine".into(),
        ),
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        Choice::Burn(dev, what) => (
            Box::new(
                flow_stages::gpu::trainer::BurnTrainer::new(w, lora, &opt, dev, precision)
                    .with_activation_checkpointing(checkpointing),
            ),
            what,
        ),
    };
    let scale = 1.0 / batch.target_count() as f32;
    let drop = |step: usize| {
        (lora_dropout > 0.0).then_some(Dropouts {
            lora: lora_dropout,
            seed: step as u64,
            ..Dropouts::default()
        })
    };
    let mut times = Vec::new();
    pool.install(|| {
        for step in 0..steps {
            let t0 = Instant::now();
            if let Some(r) = &mut reference {
                r.accumulate(&batch, scale, drop(step));
                r.apply(1e-3, 1.0);
            }
            trainer.accumulate(&batch, scale, drop(step));
            trainer.apply(1e-3, 1.0);
            times.push(t0.elapsed().as_secs_f64());
        }
    });
    // One more step on a burn device, its kernels counted (and with --kernels timed): the
    // forward and backward passes, then the optimizer.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let launches = burn_device.map(|dev| {
        pool.install(|| {
            if let Some(r) = &mut reference {
                r.accumulate(&batch, scale, drop(steps));
                r.apply(1e-3, 1.0);
            }
            let passes = kernels::observe(&dev, timed_kernels, || {
                trainer.accumulate(&batch, scale, drop(steps));
            });
            let update = kernels::observe(&dev, timed_kernels, || {
                trainer.apply(1e-3, 1.0);
            });
            serde_json::json!({
                "forward_backward": passes.launches(), "optimizer": update.launches(),
                "timing": [passes.timing, update.timing],
                "forward_backward_kernel_s": passes.seconds(), "optimizer_kernel_s": update.seconds(),
                "top_forward_backward": timed_kernels.then(|| passes.top_json(15)),
                "top_optimizer": timed_kernels.then(|| update.top_json(5)),
            })
        })
    });
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let launches: Option<serde_json::Value> = None;
    let max_weight_diff_vs_cpu = reference.map(|r| {
        let (cpu, dev) = (r.snapshot().0, trainer.snapshot().0);
        cpu.iter()
            .zip(&dev)
            .flat_map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max)
    });
    // The first step compiles kernels (and autotunes them on a burn device); the median
    // leaves out the first two.
    let first_step = times[0];
    let mut steady = times[2..].to_vec();
    steady.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = steady[steady.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "flow", "device": what, "config": config, "mode": mode, "threads": threads,
            "precision": precision.name(), "activation_checkpointing": checkpointing,
            "optimizer": if matches!(rule, Rule::LionW { .. }) { "lionw" } else { "adamw" },
            "optimizer_state": state_type.name(),
            "max_weight_diff_vs_cpu": max_weight_diff_vs_cpu,
            "step_s": (med * 1e4).round() / 1e4, "tokens_per_s": ((rows * seq) as f64 / med).round(),
            "first_step_s": (first_step * 1e3).round() / 1e3,
            "kernels_per_step": launches,
            "peak_rss_mib": peak_rss_mib().round(),
        })
    );
}

/// Median seconds of 5 runs of `f` after 3 warm-ups (kernel compilation, autotune); `f`
/// ends by reading a scalar, which waits for the device.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn median_seconds(f: &dyn Fn() -> f32) -> f64 {
    let mut t = Vec::new();
    for i in 0..8 {
        let t0 = Instant::now();
        let _ = f();
        if i >= 3 {
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// flow's fused attention kernels (`gpu/flash.rs`, what recomputed blocks attend with, their
/// backward through autodiff) against attention by burn's tensor ops as flow's plain forward
/// pass has it (`t x t` scores materialized, burn's tuned matmuls): median seconds of the
/// forward pass and of forward + backward of one layer's causal attention over `rows` x
/// `heads` sequences of `t` x `head_dim`, in f32, on a burn device, and the throughput that
/// gives in causal FLOPs (FlashAttention's count: `2 rows heads t^2 head_dim` forward, 2.5x
/// that backward). PyTorch's SDPA on the same shape: `benches/train_torch.py --attention`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn attention(device: &str, [rows, heads, t, hd]: [usize; 4]) {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, Tensor};
    use flow_stages::gpu::{flash, llama};
    let Choice::Burn(dev, what) = select(device).expect("a burn device") else {
        panic!("--attention needs a burn device (wgpu, cuda)");
    };
    let plain = dev.clone().without_autodiff();
    let random = || Tensor::<4>::random([rows, heads, t, hd], Distribution::Default, &plain);
    let (q, k, v, d_out) = (random(), random(), random(), random());
    let docs = Tensor::<2>::ones([rows, t], &plain);
    let scale = 1.0 / (hd as f32).sqrt();
    let sum = |x: Tensor<4>| llama::total(x).into_scalar::<f32>();
    let allowed = llama::attention_mask(rows, t, None, None, &dev);
    let fused = |qkv: [Tensor<4>; 3]| flash::attention(qkv, docs.clone().autodiff(), scale, None);
    let materialized = |[q, k, v]: [Tensor<4>; 3]| {
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        softmax(scores.mask_fill(allowed.clone().bool_not(), -1e9), 3).matmul(v)
    };
    // Both through autodiff, as a model attends: the forward alone, then with the backward.
    let on_dev = |x: &Tensor<4>| x.clone().autodiff();
    let forward = |attend: &dyn Fn([Tensor<4>; 3]) -> Tensor<4>| {
        median_seconds(&|| sum(attend([on_dev(&q), on_dev(&k), on_dev(&v)])))
    };
    let both = |attend: &dyn Fn([Tensor<4>; 3]) -> Tensor<4>| {
        median_seconds(&|| {
            let leaves = [&q, &k, &v].map(|x| on_dev(x).require_grad());
            let out = attend(leaves.clone());
            let g = llama::total(out * on_dev(&d_out)).backward();
            leaves
                .iter()
                .map(|x| sum(x.grad(&g).expect("attention depends on q, k and v")))
                .sum()
        })
    };
    let (fused_fwd, fused_both) = (forward(&fused), both(&fused));
    let (mat_fwd, mat_both) = (forward(&materialized), both(&materialized));
    let flops = 2.0 * (rows * heads * t * t * hd) as f64;
    let tflops = |flops: f64, s: f64| flops / s / 1e12;
    println!(
        "{}",
        serde_json::json!({
            "bench": "attention", "device": what, "rows": rows, "heads": heads, "t": t,
            "head_dim": hd, "precision": "f32",
            "fused_forward_s": fused_fwd, "fused_forward_backward_s": fused_both,
            "materialized_forward_s": mat_fwd, "materialized_forward_backward_s": mat_both,
            "fused_forward_tflops": tflops(flops, fused_fwd),
            "fused_forward_backward_tflops": tflops(3.5 * flops, fused_both),
            "materialized_forward_tflops": tflops(flops, mat_fwd),
            "materialized_forward_backward_tflops": tflops(3.5 * flops, mat_both),
        })
    );
}

/// burn's `apply_lora` (the adapted weight composed densely, `W + s A B`, every forward)
/// against the unfused form flow's burn trainer uses (`x W + s (x A) B`): forward+backward
/// time of one d x d Linear over `tokens` rows, on a burn device.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn lora_linear(device: &str, d: usize, tokens: usize, rank: usize) {
    use burn::module::{Lora, Module};
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, Tensor};
    let Choice::Burn(dev, what) = select(device).expect("a burn device") else {
        panic!("--lora-linear needs a burn device (wgpu, cuda)");
    };
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &dev);
    let fused = LinearConfig::new(d, d)
        .with_bias(false)
        .init(&dev)
        .apply_lora(Lora::new(rank, 2.0 * rank as f64));
    let w = Tensor::<2>::random([d, d], Distribution::Default, &dev);
    let a = Tensor::<2>::random([d, rank], Distribution::Default, &dev).require_grad();
    let b = Tensor::<2>::random([rank, d], Distribution::Default, &dev).require_grad();
    let t_fused = median_seconds(&|| {
        let y = fused.forward(x.clone());
        let g = y.clone().sum().backward();
        let _ = g;
        y.sum().into_scalar::<f32>()
    });
    let t_unfused = median_seconds(&|| {
        let y = x.clone().matmul(w.clone())
            + x.clone()
                .matmul(a.clone())
                .matmul(b.clone())
                .mul_scalar(2.0);
        let g = y.clone().sum().backward();
        let ga = a
            .grad(&g)
            .map(|t| t.sum().into_scalar::<f32>())
            .unwrap_or(0.0);
        ga + y.sum().into_scalar::<f32>() * 0.0
    });
    println!(
        "{}",
        serde_json::json!({
            "bench": "lora-linear", "device": what, "d": d, "tokens": tokens, "rank": rank,
            "apply_lora_s": t_fused, "unfused_s": t_unfused,
            "dense_grad_mib_avoided": (d * d * 4) as f64 / 1048576.0,
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
    let precision_name = args
        .iter()
        .position(|a| a == "--precision")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| "f32".into());
    let precision = Precision::parse(&precision_name).expect("--precision f32, f16 or bf16");
    let checkpointing = args.iter().any(|a| a == "--checkpointing");
    let state_type = if args.iter().any(|a| a == "--bf16-state") {
        StateType::Bf16
    } else {
        StateType::F32
    };
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Some(i) = args.iter().position(|a| a == "--lora-linear") {
        let d: usize = args[i + 1].parse().unwrap();
        let tokens: usize = args[i + 2].parse().unwrap();
        lora_linear(&device, d, tokens, 16);
        return;
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Some(i) = args.iter().position(|a| a == "--attention") {
        let dims = args[i + 1]
            .split(',')
            .map(|x| x.parse().expect("--attention ROWS,HEADS,T,HEAD_DIM"))
            .collect::<Vec<usize>>();
        attention(
            &device,
            dims.try_into().expect("--attention ROWS,HEADS,T,HEAD_DIM"),
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--one") {
        one(
            &args[i + 1],
            &args[i + 2],
            &device,
            threads,
            &Options {
                precision,
                checkpointing,
                state_type,
                compare: args.iter().any(|a| a == "--compare"),
                timed_kernels: args.iter().any(|a| a == "--kernels"),
            },
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let devices: Vec<String> = if args.iter().any(|a| a == "--device") {
        vec![device]
    } else {
        vec!["cpu".into(), "wgpu".into()]
    };
    for dev in devices {
        for (config, ..) in CONFIGS
            .iter()
            .filter(|c| !["tiny", "large", "7b"].contains(&c.0))
        {
            for mode in ["full", "lora16", "lora16-drop"] {
                if dev != "cpu" && *config == "wide" && std::env::var("FLOW_BENCH_WIDE").is_err() {
                    continue; // minutes on a software rasterizer; set FLOW_BENCH_WIDE to run it
                }
                let out = Command::new(&exe)
                    .args(["--one", config, mode, "--device", &dev])
                    .args(["--precision", &precision_name])
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
