//! Quick probe: training steps/s of the CPU engine (full and LoRA) on the config.
use std::time::Instant;

use flow_stages::cpu::llama::{Batch, Llama, Trainable};
use flow_stages::cpu::lora::{Adapters, LoraInit, LoraSpec};
use flow_stages::cpu::ops::Rope;
use flow_stages::model::config::LlamaConfig;
use flow_stages::model::weights::{Proj, Weights};
use flow_stages::train::optim::{Optimizer, Rule};

fn main() {
    let threads: usize = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let (d, layers, heads, seq, rows, vocab, ff) = (256, 4, 8, 256, 8, 8192, 704);
    let cfg = LlamaConfig::new(vocab, d, ff, layers, heads, heads, seq, false);
    let w = Weights::init(&cfg, 1);
    let rope = Rope::new(cfg.head_dim(), 10000.0, seq);
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
    pool.install(|| {
        for mode in ["full", "lora16"] {
            let mut w = w.clone();
            let lora = (mode == "lora16").then(|| {
                let spec = LoraSpec {
                    rank: 16,
                    alpha: 32.0,
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
            let mut opt = Optimizer::new(
                Rule::AdamW {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
                0.0,
                1e-3,
                &sizes,
            );
            let mut lora = lora;
            let mut times = Vec::new();
            for step in 0..7 {
                let t0 = Instant::now();
                let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
                {
                    let model = Llama {
                        w: &w,
                        lora: lora.as_ref(),
                        rope: &rope,
                        threads,
                    };
                    let fwd = model.forward(&batch, None, true);
                    let scale = 1.0 / fwd.targets as f32;
                    let train = match &lora {
                        Some(l) => Trainable::Lora(l),
                        None => Trainable::Full,
                    };
                    model.backward(fwd, &batch, scale, &train, &mut grads);
                }
                match &mut lora {
                    Some(l) => {
                        let mut ps: Vec<&mut [f32]> =
                            l.tensors.iter_mut().map(|t| &mut t.data[..]).collect();
                        opt.update(&mut ps, &grads, 1e-3);
                    }
                    None => {
                        let mut ps: Vec<&mut [f32]> =
                            w.tensors.iter_mut().map(|t| &mut t.data[..]).collect();
                        opt.update(&mut ps, &grads, 1e-3);
                    }
                }
                if step >= 2 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let med = times[times.len() / 2];
            println!(
                "{mode}: median step {:.3}s, {:.0} tokens/s",
                med,
                (rows * seq) as f64 / med
            );
        }
    });
}
