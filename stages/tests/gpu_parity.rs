//! The burn (GPU) trainer against flow's CPU engine, on wgpu. In CI this runs on Mesa's
//! lavapipe Vulkan driver (`apt-get install mesa-vulkan-drivers`); without any adapter the
//! test fails rather than skips, so a broken GPU path cannot pass unnoticed.
#![cfg(feature = "wgpu")]

mod families;
mod wgpu;

use std::path::Path;

use burn::tensor::{Device, Tensor};
use flow_stages::cpu::attention::{self, Dims, Mask, Span};
use flow_stages::cpu::batch::Batch;
use flow_stages::cpu::lora::{Adapters, LoraInit};
use flow_stages::gpu::flash;
use flow_stages::gpu::llama::{download, total, upload};
use flow_stages::gpu::precision::Precision;
use flow_stages::gpu::trainer::BurnTrainer;
use flow_stages::model::weights::Weights;
use flow_stages::train::cpu::CpuTrainer;
use flow_stages::train::optim::{Optimizer, Rule, StateType};
use flow_stages::train::trainer::Trainer;
use wgpu::burn_device;

fn batch(vocab: u32, rows: usize, seq: usize, salt: u32) -> Batch {
    let ids: Vec<u32> = (0..rows * seq)
        .map(|i| ((i as u32).wrapping_mul(2654435761).rotate_left(salt) >> 7) % vocab)
        .collect();
    let mut targets = vec![-1i32; rows * seq];
    for r in 0..rows {
        for t in 0..seq - 1 {
            targets[r * seq + t] = ids[r * seq + t + 1] as i32;
        }
    }
    Batch {
        rows,
        seq,
        ids,
        targets,
        pos: (0..rows).flat_map(|_| 0..seq as u32).collect(),
        seq_ids: None,
        lens: None,
    }
}

/// The tensors that train: the adapters' with LoRA, else the model's.
fn trainable<'a>(
    w: &'a Weights,
    adapters: Option<&'a Adapters>,
) -> impl Iterator<Item = &'a flow_stages::model::weights::Tensor> {
    adapters.map_or(&w.tensors, |a| &a.tensors).iter()
}

/// Per-step losses and final trainable tensors of one trainer.
type Run = (Vec<f64>, Vec<Vec<f32>>);

/// Runs `steps` optimizer steps on both trainers: (CPU engine, wgpu computing in
/// `precision`), on the fixture model in `tests/fixtures/{model}`.
fn train_both(model: &str, lora: bool, steps: usize, precision: Precision) -> (Run, Run) {
    train_both_storing(model, lora, steps, precision, StateType::F32)
}

/// [`train_both`] with the optimizer's moments stored in `state_type`.
fn train_both_storing(
    model: &str,
    lora: bool,
    steps: usize,
    precision: Precision,
    state_type: StateType,
) -> (Run, Run) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(model);
    let w = Weights::load(&dir).unwrap();
    let adapters = lora.then(|| {
        let mut a = Adapters::init(&w.config, &families::peft_spec(), LoraInit::Kaiming, 9);
        // Nonzero B so the adapter matters from step one.
        for t in a.tensors.iter_mut().filter(|t| t.name.contains("lora_B")) {
            for (i, v) in t.data.iter_mut().enumerate() {
                *v = ((i % 7) as f32 - 3.0) * 0.01;
            }
        }
        a
    });
    let sizes: Vec<usize> = trainable(&w, adapters.as_ref())
        .map(|t| t.data.len())
        .collect();
    // A large epsilon keeps near-zero gradients (whose sign rounding may flip) from taking
    // full-size Adam steps, so the comparison measures the model, not Adam's sign noise.
    let rule = Rule::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-3,
    };
    let opt = Optimizer::new(rule, 0.01, 1e-3, &sizes).with_state_type(state_type);
    let mut cpu: Box<dyn Trainer> = Box::new(CpuTrainer::new(
        w.clone(),
        adapters.clone(),
        opt.clone(),
        64,
        2,
    ));
    let mut gpu: Box<dyn Trainer> = Box::new(BurnTrainer::new(
        w,
        adapters,
        &opt,
        burn_device(),
        precision,
    ));
    let (mut lc, mut lg) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let b = batch(96, 2, 16, 3); // the same rows each step: the loss must fall
        let scale = 1.0 / b.target_count() as f32;
        let (sc, n) = cpu.accumulate(&b, scale, None);
        let (sg, _) = gpu.accumulate(&b, scale, None);
        lc.push(sc / n as f64);
        lg.push(sg / n as f64);
        cpu.apply(1e-3, 1.0);
        let update = gpu.apply(1e-3, 1.0);
        assert!(!update.skipped, "no step overflows here: {update:?}");
    }
    let tc = cpu.snapshot().0.into_iter().map(|t| t.data).collect();
    let tg = gpu.snapshot().0.into_iter().map(|t| t.data).collect();
    ((lc, tc), (lg, tg))
}

/// Tolerances: both run f32, with different summation orders (GPU reductions and tiled
/// matmuls against gemm's). Measured on lavapipe: losses agree to 1e-7 relative and weights to
/// 2e-7 after 5 steps; the bounds, 1e-5 on both, stay 100x below one step's change (1e-3).
fn assert_close(lc: &[f64], lg: &[f64], tc: &[Vec<f32>], tg: &[Vec<f32>]) {
    assert_within(lc, lg, tc, tg, 1e-5);
}

/// [`assert_close`] with weights within `weight_tol`.
fn assert_within(lc: &[f64], lg: &[f64], tc: &[Vec<f32>], tg: &[Vec<f32>], weight_tol: f32) {
    for (s, (a, b)) in lc.iter().zip(lg).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {s}: loss cpu {a} vs wgpu {b}"
        );
    }
    let mut worst = 0.0f32;
    for (a, b) in tc.iter().zip(tg) {
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= weight_tol, "weights differ by up to {worst}");
    eprintln!("losses cpu {lc:?}\n       wgpu {lg:?}\nmax weight difference {worst}");
}

#[test]
fn full_finetuning_on_wgpu_agrees_with_the_cpu_engine() {
    let ((lc, tc), (lg, tg)) = train_both("llama/gqa", false, 5, Precision::F32);
    assert!(lc[4] < lc[0], "it trains: {lc:?}");
    assert_close(&lc, &lg, &tc, &tg);
}

#[test]
fn lora_on_wgpu_agrees_with_the_cpu_engine() {
    let ((lc, tc), (lg, tg)) = train_both("llama/gqa", true, 5, Precision::F32);
    assert_close(&lc, &lg, &tc, &tg);
}

/// Each family's variations (RoPE scaling, biases, q/k norms, sliding windows, fused
/// modules and their adapters, Gemma 2's norms, GeGLU, scales and soft caps) on wgpu train
/// as on the CPU engine, which matches transformers (llama_parity.rs).
#[test]
fn every_family_on_wgpu_agrees_with_the_cpu_engine() {
    for name in families::names() {
        eprintln!("{name}:");
        let ((lc, tc), (lg, tg)) =
            train_both(&format!("families/{name}"), false, 3, Precision::F32);
        assert!(lc[2] < lc[0], "{name} trains: {lc:?}");
        assert_close(&lc, &lg, &tc, &tg);
        let ((lc, tc), (lg, tg)) = train_both(&format!("families/{name}"), true, 2, Precision::F32);
        assert_close(&lc, &lg, &tc, &tg);
    }
}

/// The attention masks made on the device are the CPU engine's rule
/// (`cpu::attention::allowed`, itself checked against transformers' masks in
/// llama_parity.rs) for every query and key: causal, with a sliding window, and per
/// document with padding that sees only itself.
#[test]
fn device_made_masks_follow_the_cpu_engines_rule() {
    use flow_stages::cpu::attention::{Mask, allowed};
    use flow_stages::gpu::llama::attention_mask;
    let device = burn_device();
    let (rows, t) = (3, 11);
    let docs: Vec<u16> = (0..rows * t)
        .map(|i| match (i / t, i % t) {
            (0, j) => 1 + (j >= 4) as u16,
            (1, j) if j < 9 => 1 + (j >= 2) as u16 + (j >= 7) as u16,
            (1, _) => 0,
            (_, j) => 5 + (j % 4 == 0) as u16 * (j as u16),
        })
        .collect();
    let mut checked = 0;
    for docs in [None, Some(docs.as_slice())] {
        for window in [None, Some(1), Some(3), Some(20)] {
            let got: Vec<i64> = attention_mask(rows, t, docs, window, &device)
                .int()
                .to_data()
                .convert::<i64>()
                .try_to_vec()
                .unwrap();
            let rule = Mask { docs, window };
            let mut masked = 0;
            for r in 0..rows {
                for i in 0..t {
                    for j in 0..t {
                        let want = allowed(rule, r * t, i, j);
                        let at = (r * t + i) * t + j;
                        assert_eq!(
                            got[at] == 1,
                            want,
                            "docs {docs:?} window {window:?}: row {r} query {i} key {j}"
                        );
                        masked += usize::from(!want);
                    }
                }
            }
            assert!(
                masked >= rows * t * (t - 1) / 2,
                "the causal part at least is masked"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn seeded_gpu_dropout_repeats_bit_for_bit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/gqa");
    let w = Weights::load(&dir).unwrap();
    let sizes: Vec<usize> = w.tensors.iter().map(|t| t.data.len()).collect();
    let rule = Rule::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    };
    let opt = Optimizer::new(rule, 0.0, 1e-3, &sizes);
    let run_from = |p: f32, resume_at: Option<u64>| {
        let mut t = BurnTrainer::new(w.clone(), None, &opt, burn_device(), Precision::F32);
        let mut losses = Vec::new();
        for step in 0..4u64 {
            if resume_at == Some(step) {
                let (saved, o) = t.snapshot();
                t = BurnTrainer::new(w.clone(), None, &opt, burn_device(), Precision::F32);
                t.restore(saved, o).unwrap();
            }
            let b = batch(96, 2, 16, 3);
            let drop = flow_stages::cpu::llama::Dropouts {
                attention: p,
                hidden: p,
                lora: 0.0,
                seed: 1000 + step,
            };
            losses.push(t.accumulate(&b, 0.01, (p > 0.0).then_some(drop)).0);
            t.apply(1e-3, 1.0);
        }
        let bits: Vec<Vec<f32>> = t.snapshot().0.into_iter().map(|t| t.data).collect();
        (losses, bits)
    };
    let run = |p: f32| run_from(p, None);
    let plain = (run(0.0), run(0.0));
    assert!(
        plain.0 == plain.1,
        "without dropout: {:?} vs {:?}",
        plain.0.0,
        plain.1.0
    );
    let (a, b) = (run(0.1), run(0.1));
    assert!(a == b, "with dropout: {:?} vs {:?}", a.0, b.0);
    assert_ne!(a.0, plain.0.0, "dropout changes the losses");
    // A trainer restored from a snapshot after two steps (a resume) ends with the same bits.
    let resumed = run_from(0.1, Some(2));
    assert!(resumed == a, "resumed: {:?} vs {:?}", resumed.0, a.0);
}

/// f16 training (autocast: f32 master weights, loss scaling) agrees with the f32 CPU engine
/// to f16's precision, full and LoRA, and is really computed in f16: its losses are not the
/// f32 device's bits.
#[test]
fn f16_training_on_wgpu_agrees_with_the_f32_cpu_engine() {
    for lora in [false, true] {
        let ((lc, tc), (lg, tg)) = train_both("llama/gqa", lora, 5, Precision::F16);
        let ((_, _), (l32, _)) = train_both("llama/gqa", lora, 1, Precision::F32);
        let mut worst_loss = 0.0f64;
        for (a, b) in lc.iter().zip(&lg) {
            worst_loss = worst_loss.max((a - b).abs() / a.abs());
        }
        let mut worst = 0.0f32;
        for (a, b) in tc.iter().zip(&tg) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!(
            "lora {lora}: losses cpu f32 {lc:?}\n  wgpu f16 {lg:?}\n  worst relative loss \
             difference {worst_loss:e}, worst weight difference {worst:e}"
        );
        assert_ne!(lg[0], l32[0], "f16 computes in f16, not f32");
        // f16 keeps 11 significant bits (relative rounding 4.9e-4). Measured on lavapipe:
        // losses within 1.2e-4 relative, f32 master weights within 1.0e-4 (full) and 3.4e-4
        // (LoRA) after 5 AdamW steps of lr 1e-3 (f32 on wgpu: 1e-7 and 2e-7). The bounds,
        // 1e-3 relative and 1e-3 (one step), fail a gradient left scaled or a wrong cast.
        assert!(lg[4] < lg[0], "f16 trains: {lg:?}");
        assert!(
            worst_loss <= 1e-3,
            "losses differ by {worst_loss:e} relative"
        );
        assert!(worst <= 1e-3, "weights differ by up to {worst:e}");
    }
}

/// A device without the asked type fails naming the device and the type: lavapipe has f16
/// (shader-f16) and no bf16 (WGSL has none).
#[test]
fn a_device_without_the_precision_fails_naming_both() {
    use flow_stages::gpu::device::select;
    let choice = select("wgpu").expect("a wgpu adapter");
    Precision::F16
        .check(&choice)
        .expect("lavapipe computes in f16");
    let e = Precision::Bf16.check(&choice).unwrap_err().to_string();
    assert!(
        e.contains("bf16") && e.contains("llvmpipe") && e.contains("f16"),
        "{e}"
    );
}

/// Moments stored in bf16 on a device that has the type agree with the CPU engine's, which
/// rounds the same f32 moments the same way (to nearest-even). Where the two f32 moments
/// differ in their last bits the rounding can land one bf16 step (2^-8 relative) apart,
/// and AdamW's update with it by 0.4% of lr: the weights' bound is 5e-5 after 5 steps at
/// lr 1e-3. A device without bf16 (lavapipe: WGSL has none) refuses it before anything
/// loads, naming itself and the type. On CUDA, `scripts/gpu-bench.sh` makes the same
/// comparison (`train-bench --compare --bf16-state`).
#[test]
fn bf16_optimizer_state_agrees_with_the_cpu_engine_or_is_refused() {
    use flow_stages::gpu::device::{Choice, select};
    let choice = select("wgpu").expect("a wgpu adapter");
    match StateType::Bf16.check(&choice) {
        Ok(()) => {
            let ((lc, tc), (lg, tg)) =
                train_both_storing("llama/gqa", false, 5, Precision::F32, StateType::Bf16);
            assert_within(&lc, &lg, &tc, &tg, 5e-5);
        }
        Err(e) => {
            let Choice::Burn(_, name) = &choice else {
                unreachable!("`wgpu` is a burn device")
            };
            let e = e.to_string();
            assert!(
                e.contains("optimizer_state `bf16`") && e.contains(name.as_str()),
                "{e}"
            );
        }
    }
}

/// f16's loss scaling as GradScaler's: from a scale at which the gradients overflow f16,
/// steps are skipped (nothing trains, the optimizer's step count stays) and the scale halves
/// until they fit; a restored snapshot carries the scale, so a resumed run ends with the
/// same bits as an uninterrupted one.
#[test]
fn f16_loss_scaling_skips_overflowing_steps_and_resumes_to_the_bit() {
    use flow_stages::gpu::precision::LossScale;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/gqa");
    let w = Weights::load(&dir).unwrap();
    let sizes: Vec<usize> = w.tensors.iter().map(|t| t.data.len()).collect();
    let rule = Rule::LionW {
        beta1: 0.9,
        beta2: 0.99,
    };
    let mut opt = Optimizer::new(rule, 0.0, 1e-3, &sizes);
    // 2^20 / 30 targets: the logits' gradient alone is 3.5e4, and the gradients further
    // back pass f16's 65504 (on lavapipe, 2^17 is the first scale that fits).
    opt.loss_scale = Some(LossScale {
        scale: (1u64 << 20) as f32,
        good_steps: 0,
    });
    let b = batch(96, 2, 16, 3);
    let scale = 1.0 / b.target_count() as f32;
    let run = |resume_at: Option<usize>| {
        let mut t = BurnTrainer::new(w.clone(), None, &opt, burn_device(), Precision::F16);
        let mut log = Vec::new();
        for step in 0..8 {
            if resume_at == Some(step) {
                let (saved, o) = t.snapshot();
                t = BurnTrainer::new(w.clone(), None, &opt, burn_device(), Precision::F16);
                t.restore(saved, o).unwrap();
            }
            let before = t.loss_scale().unwrap();
            t.accumulate(&b, scale, None);
            let u = t.apply(1e-3, 1.0);
            log.push((u.skipped, before, t.loss_scale().unwrap()));
        }
        let (bits, o) = t.snapshot();
        (log, bits.into_iter().map(|t| t.data).collect::<Vec<_>>(), o)
    };
    let (log, bits, o) = run(None);
    eprintln!("(skipped, scale before, scale after): {log:?}");
    let skipped = log.iter().take_while(|s| s.0).count();
    assert!(skipped >= 1, "the first step overflows: {log:?}");
    assert!(skipped < 6, "the scale comes down until steps fit: {log:?}");
    for &(was_skipped, before, after) in &log {
        if was_skipped {
            assert_eq!(after, before / 2.0, "an overflow halves the scale");
        } else {
            assert_eq!(after, before, "a good step keeps it (growth after 2000)");
        }
    }
    assert_eq!(
        o.step,
        log.iter().filter(|s| !s.0).count() as u64,
        "skipped steps are not optimizer steps"
    );
    assert_eq!(o.loss_scale.map(|s| s.scale), Some(log[7].2));
    let start: Vec<Vec<f32>> = w.tensors.iter().map(|t| t.data.clone()).collect();
    assert_ne!(bits, start, "the steps that fit train");
    // Only skipped steps before: the weights are the start's after them.
    let (early, early_bits, _) = {
        let mut t = BurnTrainer::new(w.clone(), None, &opt, burn_device(), Precision::F16);
        t.accumulate(&b, scale, None);
        let u = t.apply(1e-3, 1.0);
        let (bits, o) = t.snapshot();
        (u, bits.into_iter().map(|t| t.data).collect::<Vec<_>>(), o)
    };
    assert!(early.skipped && !early.grad_norm.is_finite(), "{early:?}");
    assert_eq!(early_bits, start, "a skipped step changes no weight");
    // Resumed mid-run (after the skips, while training) it ends with the same bits.
    let (log2, bits2, o2) = run(Some(skipped + 2));
    assert_eq!(log2, log);
    assert!(bits2 == bits, "the resumed f16 run ends with other weights");
    assert_eq!(o2, o);
}

/// Activation checkpointing (each block recomputed in the backward pass from its input) is
/// the same math as keeping every activation, whichever attention it recomputes: the
/// fused kernels with their recomputing backward (no attention dropout; 160 tokens; causal
/// and per document) and the materialized one (with attention dropout, whose masks
/// each layer draws from its own seed). With hidden and LoRA dropout and gradient
/// accumulation over two micro-batches, in f32 and f16, runs agree to rounding (kernel
/// fusion groups a lone block's backward differently, and the kernels sum in another order).
/// That is why it is not part of the key, as the device is not.
#[test]
fn activation_checkpointing_is_the_same_math() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/gqa");
    let w = Weights::load(&dir).unwrap();
    for (lora, precision, attention, documents) in [
        (false, Precision::F32, 0.0, false),
        (false, Precision::F32, 0.0, true),
        (true, Precision::F32, 0.1, false),
        (false, Precision::F16, 0.0, false),
    ] {
        let adapters = lora.then(|| {
            let mut spec = families::peft_spec();
            spec.dropout = 0.1;
            Adapters::init(&w.config, &spec, LoraInit::Kaiming, 9)
        });
        let sizes: Vec<usize> = trainable(&w, adapters.as_ref())
            .map(|t| t.data.len())
            .collect();
        // AdamW with a large epsilon, as train_both: rounding-level differences in a
        // gradient stay rounding-level in the weights (a sign-based rule would flip them).
        let rule = Rule::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-3,
        };
        let opt = Optimizer::new(rule, 0.0, 1e-3, &sizes);
        let micro_batch = |k: u32| {
            let seq = if attention == 0.0 { 160 } else { 16 };
            let mut b = batch(96, 2, seq, 3 + k);
            if documents {
                // Two documents a row, positions restarting at the second.
                b.seq_ids = Some(
                    (0..b.rows * seq)
                        .map(|i| 1 + (i % seq >= 70) as u16)
                        .collect(),
                );
                b.pos = (0..b.rows * seq)
                    .map(|i| (if i % seq >= 70 { i % seq - 70 } else { i % seq }) as u32)
                    .collect();
            }
            b
        };
        let run = |checkpointing: bool| {
            let mut t =
                BurnTrainer::new(w.clone(), adapters.clone(), &opt, burn_device(), precision)
                    .with_activation_checkpointing(checkpointing);
            let (mut losses, mut norms) = (Vec::new(), Vec::new());
            for step in 0..3u64 {
                for k in 0..2u64 {
                    let drop = flow_stages::cpu::llama::Dropouts {
                        attention,
                        hidden: 0.1,
                        lora: if lora { 0.1 } else { 0.0 },
                        seed: 100 * step + k,
                    };
                    losses.push(t.accumulate(&micro_batch(k as u32), 0.01, Some(drop)).0);
                }
                norms.push(t.apply(1e-3, 1.0).grad_norm);
            }
            let bits: Vec<Vec<f32>> = t.snapshot().0.into_iter().map(|t| t.data).collect();
            (losses, norms, bits)
        };
        let (plain, recomputed) = (run(false), run(true));
        let start: Vec<Vec<f32>> = trainable(&w, adapters.as_ref())
            .map(|t| t.data.clone())
            .collect();
        assert!(plain.2 != start, "it trains");
        let what = format!(
            "lora {lora} {precision:?} attention dropout {attention} documents {documents}"
        );
        let rel = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / x.abs())
                .fold(0.0, f64::max)
        };
        let worst = plain
            .2
            .iter()
            .zip(&recomputed.2)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max);
        let (loss, norm) = (rel(&plain.0, &recomputed.0), rel(&plain.1, &recomputed.1));
        eprintln!("{what}: losses {loss:e}, gradient norms {norm:e}, weights {worst:e}");
        // Rounding: f32's 6e-8 and f16's 4.9e-4, a few times over, not a missing term
        // (leaving the embedding's gradient out moved the norm by 14%). In f16 the fused
        // attention computes in f32 where the materialized one multiplies in f16: measured
        // 1.5e-5 (losses), 2.0e-4 (norms), 7.4e-5 (weights, a 14th of a step).
        let (tol, weights) = if precision == Precision::F32 {
            (1e-6, 1e-5)
        } else {
            (1e-3, 3e-4)
        };
        assert!(loss <= tol && norm <= tol, "{what}: {loss:e} {norm:e}");
        assert!(worst <= weights, "{what}: weights differ by {worst:e}");
    }
}

/// Deterministic values in [-scale, scale) from a seed (a 64-bit LCG's top bits).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The largest difference relative to the largest magnitude of the reference.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let top = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    worst / top
}

/// One attention problem and what the kernels and the CPU engine make of it.
struct Case {
    rows: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    docs: Option<Vec<u16>>,
    window: Option<usize>,
}

impl Case {
    /// `[tokens, n * head_dim]` token-major (the trainer's layout, and the CPU engine's) as
    /// a leaf to differentiate, and viewed as `[rows, n, t, head_dim]`: a strided tensor, as
    /// the trainer hands the kernels.
    fn heads_of(&self, x: &[f32], n: usize, device: &Device) -> (Tensor<2>, Tensor<4>) {
        let flat = upload(x, &[self.rows * self.t, n * self.head_dim], device).require_grad();
        let view = flat
            .clone()
            .reshape([self.rows, self.t, n, self.head_dim])
            .swap_dims(1, 2);
        (flat, view)
    }

    fn check(&self, device: &Device) {
        let (tokens, hd) = (self.rows * self.t, self.head_dim);
        let q = values(tokens * self.heads * hd, 1, 1.5);
        let k = values(tokens * self.kv_heads * hd, 2, 1.5);
        let v = values(tokens * self.kv_heads * hd, 3, 1.0);
        let d_out = values(tokens * self.heads * hd, 4, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let spans: Vec<Span> = (0..self.rows)
            .map(|b| Span {
                start: b * self.t,
                len: self.t,
            })
            .collect();
        let dims = Dims {
            rows: &spans,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: hd,
            scale,
            softcap: None,
        };
        let mask = Mask {
            docs: self.docs.as_deref(),
            window: self.window,
        };
        let (want_out, probs) = attention::forward(dims, &q, &k, &v, mask, None);
        let (want_dq, want_dk, want_dv) =
            attention::backward(dims, &q, &k, &v, &probs, &d_out, None);

        let docs: Vec<f32> = match &self.docs {
            Some(d) => d.iter().map(|&x| f32::from(x)).collect(),
            None => vec![1.0; tokens],
        };
        let docs = upload(&docs, &[self.rows, self.t], device);
        let (leaves, views): (Vec<Tensor<2>>, Vec<Tensor<4>>) = [
            self.heads_of(&q, self.heads, device),
            self.heads_of(&k, self.kv_heads, device),
            self.heads_of(&v, self.kv_heads, device),
        ]
        .into_iter()
        .unzip();
        let qkv: [Tensor<4>; 3] = views.try_into().expect("q, k and v");
        let out = flash::attention(qkv, docs, scale, self.window);
        let d_out_t = self.heads_of(&d_out, self.heads, device).1.detach();
        let g = total(out.clone() * d_out_t).backward();
        let [dq, dk, dv] = [0, 1, 2]
            .map(|i| download(&leaves[i].grad(&g).expect("attention depends on q, k and v")));
        let out = download(&out.swap_dims(1, 2).reshape([tokens, self.heads * hd]));
        let what = format!(
            "{} rows of {}, {}/{} heads of {}, documents {}, window {:?}",
            self.rows,
            self.t,
            self.heads,
            self.kv_heads,
            hd,
            self.docs.is_some(),
            self.window
        );
        let diffs = [
            ("out", rel_diff(&out, &want_out)),
            ("dq", rel_diff(&dq, &want_dq)),
            ("dk", rel_diff(&dk, &want_dk)),
            ("dv", rel_diff(&dv, &want_dv)),
        ];
        eprintln!("{what}: {diffs:?}");
        for (name, diff) in diffs {
            // f32 sums in another order: measured 1.7e-7 to 4.2e-7 of the largest value
            // (a few of f32's 6e-8), where a wrong mask or a missing term moves them by
            // whole percents.
            assert!(
                diff < 2e-6,
                "{what}: {name} differs by {diff:e} of its largest value"
            );
        }
    }
}

/// Two documents a row and padding (id 0) at its end, ids restarting per row.
fn documents(rows: usize, t: usize, cut: usize, pad: usize) -> Vec<u16> {
    (0..rows * t)
        .map(|i| {
            let at = i % t;
            if at >= t - pad {
                0
            } else if at < cut {
                1
            } else {
                2
            }
        })
        .collect()
}

/// The fused attention kernels (`gpu::flash`, flash attention's forward and, through burn's
/// autodiff, its recomputing backward) against the CPU engine's attention, which matches transformers
/// (tests/llama_parity.rs): output and the gradients of q, k and v agree to f32 rounding,
/// with grouped key/value heads read in place, documents with padding, a sliding window,
/// strided inputs (the trainer's layout), lengths that are no multiple of anything, and
/// sequences longer than a cube's block of rows.
#[test]
fn fused_attention_equals_the_cpu_engines() {
    let device = burn_device();
    let cases = [
        // Grouped heads (two query heads a key/value head), causal only.
        Case {
            rows: 2,
            t: 37,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            docs: None,
            window: None,
        },
        // Documents with padding, and a sliding window shorter than a document.
        Case {
            rows: 2,
            t: 45,
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            docs: Some(documents(2, 45, 20, 4)),
            window: Some(6),
        },
        // One head per key/value head, a wider head, documents, over 128 tokens.
        Case {
            rows: 1,
            t: 150,
            heads: 3,
            kv_heads: 3,
            head_dim: 64,
            docs: Some(documents(1, 150, 61, 0)),
            window: None,
        },
        // Several cubes of queries and keys (the kernels take 64 a cube and tiles of 32 keys
        // at this head size), a window that starts them past the first key, grouped heads.
        Case {
            rows: 2,
            t: 230,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            docs: Some(documents(2, 230, 140, 9)),
            window: Some(50),
        },
    ];
    for case in &cases {
        case.check(&device);
    }
}

/// RoPE by its kernel (`gpu::rope`, one launch each way) against the CPU engine's rotation,
/// which matches transformers (tests/llama_parity.rs): the output, and the gradient of the
/// input through burn's autodiff against the CPU engine's inverse rotation, with packed
/// positions (restarting mid-row) and the input a column slice of a wider tensor (the
/// fused q/k/v projection's layout), in f32 and in f16.
#[test]
fn rope_kernel_equals_the_cpu_engines() {
    use burn::tensor::FloatDType;
    use flow_stages::cpu::ops::Rope;
    use flow_stages::gpu::llama::rope_tables;

    let device = burn_device();
    let (tokens, heads, hd) = (23, 3, 16);
    let width = heads * hd;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
        .collect();
    let rope = Rope::with_freqs(&inv, 1.0, 40);
    let pos: Vec<u32> = (0..tokens as u32).map(|i| (i * 7) % 40).collect();
    let x = values(tokens * 3 * width, 5, 2.0);
    let dy = values(tokens * width, 6, 1.0);
    // The middle third of each row: what the kernel sees of a fused projection's output.
    let middle = |rows: &[f32]| -> Vec<f32> {
        rows.chunks(3 * width)
            .flat_map(|row| row[width..2 * width].to_vec())
            .collect()
    };
    let mut want = middle(&x);
    rope.apply(&mut want, &pos, heads, false);
    let mut want_dx = dy.clone();
    rope.apply(&mut want_dx, &pos, heads, true);

    let (cos, sin) = rope_tables(&rope, &pos, &device);
    for (dtype, tol) in [(FloatDType::F32, 1e-6), (FloatDType::F16, 2e-3)] {
        let wide = upload(&x, &[tokens, 3 * width], &device).require_grad();
        // Cast first: the kernel reads the slice strided in either type.
        let xin = wide
            .clone()
            .cast(dtype)
            .slice([0..tokens, width..2 * width]);
        let y = flow_stages::gpu::rope::rope(xin, &cos, &sin);
        let g = total(y.clone().cast(FloatDType::F32) * upload(&dy, &[tokens, width], &device))
            .backward();
        let dwide = download(&wide.grad(&g).expect("x is differentiated"));
        let dx = middle(&dwide);
        let untouched = dwide.chunks(3 * width).all(|row| {
            row[..width]
                .iter()
                .chain(&row[2 * width..])
                .all(|&v| v == 0.0)
        });
        let diffs = [
            ("out", rel_diff(&download(&y.cast(FloatDType::F32)), &want)),
            ("dx", rel_diff(&dx, &want_dx)),
        ];
        eprintln!("{dtype:?}: {diffs:?}");
        assert!(untouched, "{dtype:?}: gradient outside the slice");
        for (name, diff) in diffs {
            // f32: measured equal (the CPU engine's products and sum in the same order); f16:
            // one rounding of the result (2^-11 relative), measured 5.6e-4 of the largest
            // value; a wrong sign, half or position is whole percents.
            assert!(
                diff < tol,
                "{dtype:?}: {name} differs by {diff:e} of its largest value"
            );
        }
    }
}

#[test]
fn split_columns_passes_each_piece_its_columns_and_joins_their_gradients() {
    use flow_stages::gpu::split::split_columns;

    let device = burn_device();
    let (rows, widths) = (7, [3, 5, 2]);
    let cols: usize = widths.iter().sum();
    let y = values(rows * cols, 11, 1.0);
    let weights: Vec<Vec<f32>> = widths
        .iter()
        .zip(12..)
        .map(|(&w, seed)| values(rows * w, seed, 1.0))
        .collect();
    let outer = values(rows * cols, 20, 1.0);
    // The columns of `rows` from `at`, `width` of them.
    let columns = |v: &[f32], at: usize, width: usize| -> Vec<f32> {
        v.chunks(cols)
            .flat_map(|row| row[at..at + width].to_vec())
            .collect()
    };
    // The loss: each piece against its weights (the first piece twice, so its gradient is a
    // sum before its step runs), plus `y` itself against `outer` (a gradient of the split
    // tensor's own, which the joined pieces' gradient is added to).
    let gradient = |split: bool| -> (Vec<Vec<f32>>, Vec<f32>) {
        let y = upload(&y, &[rows, cols], &device).require_grad();
        let pieces: Vec<Tensor<2>> = if split {
            split_columns(y.clone(), &widths)
        } else {
            let mut at = 0;
            widths
                .iter()
                .map(|&w| {
                    at += w;
                    y.clone().slice([0..rows, at - w..at])
                })
                .collect()
        };
        let mut loss = total(y.clone() * upload(&outer, &[rows, cols], &device));
        for (piece, (w, &width)) in pieces.iter().zip(weights.iter().zip(&widths)) {
            loss = loss + total(piece.clone() * upload(w, &[rows, width], &device));
        }
        loss = loss + total(pieces[0].clone().powi_scalar(2));
        let g = loss.backward();
        (
            pieces.iter().map(download).collect(),
            download(&y.grad(&g).expect("y is differentiated")),
        )
    };
    let (pieces, dy) = gradient(true);
    let mut at = 0;
    for (piece, &width) in pieces.iter().zip(&widths) {
        assert_eq!(piece, &columns(&y, at, width), "piece at column {at}");
        at += width;
    }
    // The gradient by hand: the weights side by side, plus `outer`, plus 2 y on the first
    // piece's columns.
    let want: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let (mut piece, mut at) = (0, 0);
            while c >= at + widths[piece] {
                at += widths[piece];
                piece += 1;
            }
            let own = weights[piece][r * widths[piece] + c - at];
            let square = if piece == 0 { 2.0 * y[i] } else { 0.0 };
            own + outer[i] + square
        })
        .collect();
    assert!(rel_diff(&dy, &want) < 1e-6, "{dy:?} against {want:?}");
    // And bit for bit what burn's slices give (their backward: zeros, assign, add).
    assert_eq!(dy, gradient(false).1);
}
