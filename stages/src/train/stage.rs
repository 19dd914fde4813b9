//! The `train-full` and `train-lora` kinds: one training loop, two ways of choosing what
//! trains. Regularized baselines are `train-full` with `weight_decay`, `attention_dropout`
//! and `hidden_dropout`.
//!
//! The curve output holds `curve.csv`, `summary.json` and a TensorBoard event file of the
//! same rows (see [`super::tensorboard`]); while the loop runs, each step is also appended to
//! a TensorBoard file in the engine's live log directory, when it gives one.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;

use super::branch;
use super::checkpoint::{self, LoopState};
use super::cpu::CpuTrainer;
use super::data::{self, Attention, Order};
use super::memory;
use super::optim::{Optimizer, Rule, StateType};
use super::schedule::{Schedule, cooldown_start, steps_or_fraction};
use super::tensorboard::{self, CurveRow, LiveWriter};
use super::trainer::Trainer;
use crate::cpu::batch::Batch;
use crate::cpu::llama::Dropouts;
use crate::cpu::lora::{Adapters, LoraInit, LoraSpec};
use crate::data::pack::{Packed, PackedRow};
use crate::data::rng::Rng;
use crate::gpu::device::{self, Choice, gib};
use crate::gpu::precision::{self, Precision};
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};
use crate::model::weights::{Proj, Weights};

macro_rules! train_params {
    (lora) => {
        train_params!(@with
            Param { name: "rank", ty: ParamType::Int, default: Default::Required, doc: "r" },
            Param { name: "alpha", ty: ParamType::Float, default: Default::Optional, doc: "scale numerator: the update is (alpha/r) B A [default: 2 * rank]" },
            Param { name: "use_rslora", ty: ParamType::Bool, default: Default::Value("false"), doc: "scale by alpha/sqrt(r) (rsLoRA)" },
            Param { name: "lora_dropout", ty: ParamType::Float, default: Default::Value("0.05"), doc: "dropout on the LoRA input" },
            Param { name: "targets", ty: ParamType::List(&ParamType::Str), default: Default::Value("[\"all\"]"), doc: "projections to adapt: any of q, k, v, o, gate, up, down (or PEFT's module names, q_proj ... down_proj, and Phi-3's qkv_proj, gate_up_proj), or the presets all, attention, mlp; Phi-3's fused modules are adapted whole" },
            Param { name: "init", ty: ParamType::Choice(&["kaiming", "gaussian"]), default: Default::Value("\"kaiming\""), doc: "A's init, as PEFT's (B starts at zero)" },
        )
    };
    () => { train_params!(@with) };
    (@with $($extra:expr),* $(,)?) => {
        &[
            Param { name: "model", ty: ParamType::Input, default: Default::Required, doc: "the model to start from (a `model` stage or another training stage)" },
            Param { name: "data", ty: ParamType::Input, default: Default::Required, doc: "a `pack` stage's rows" },
            Param { name: "heldout", ty: ParamType::Input, default: Default::Optional, doc: "packed rows for the held-out loss (logged every `eval_every` steps and at the end)" },
            Param { name: "optimizer", ty: ParamType::Choice(&["lionw", "adamw"]), default: Default::Value("\"lionw\""), doc: "decoupled LionW (the paper's) or AdamW (PyTorch's)" },
            Param { name: "lr", ty: ParamType::Float, default: Default::Optional, doc: "peak learning rate (give this or `lr_from`)" },
            Param { name: "lr_from", ty: ParamType::Input, default: Default::Optional, doc: "a `select` stage's choice: train at the chosen candidate's lr" },
            Param { name: "beta1", ty: ParamType::Float, default: Default::Value("0.9"), doc: "first moment decay" },
            Param { name: "beta2", ty: ParamType::Float, default: Default::Value("0.95"), doc: "second moment decay (LionW: momentum update)" },
            Param { name: "eps", ty: ParamType::Float, default: Default::Value("1e-8"), doc: "AdamW's epsilon" },
            Param { name: "optimizer_state", ty: ParamType::Choice(crate::train::optim::STATE_TYPES), default: Default::Value("\"f32\""), doc: "type the optimizer's moments are stored in: bf16 halves them (Llama-2-7B full finetuning with LionW then fits an 80 GB GPU); the update computes in f32 and rounds each moment to nearest-even as it stores it" },
            Param { name: "weight_decay", ty: ParamType::Float, default: Default::Value("0.0"), doc: "decoupled weight decay (LionW: times lr/lr_max; AdamW: times lr)" },
            Param { name: "schedule", ty: ParamType::Choice(&["cosine", "trapezoid", "constant"]), default: Default::Value("\"cosine\""), doc: "cosine decay, the CPT trapezoid (warmup, constant, linear cooldown) or constant" },
            Param { name: "warmup", ty: ParamType::Float, default: Default::Value("0.1"), doc: "warmup: a fraction of the steps if < 1, else a step count" },
            Param { name: "cooldown", ty: ParamType::Float, default: Default::Value("0.2"), doc: "trapezoid: cooldown as a fraction of the steps if < 1, else a step count" },
            Param { name: "final_lr_fraction", ty: ParamType::Float, default: Default::Optional, doc: "where the decay ends, as a fraction of lr [default: 0.01 cosine, 0 trapezoid]" },
            Param { name: "clip_grad_norm", ty: ParamType::Float, default: Default::Value("1.0"), doc: "clip gradients to this global L2 norm (0 = off)" },
            Param { name: "global_batch", ty: ParamType::Int, default: Default::Value("8"), doc: "rows per optimizer step" },
            Param { name: "micro_batch", ty: ParamType::Int, default: Default::Optional, doc: "rows per forward/backward pass; gradients accumulate over global_batch/micro_batch passes [default: global_batch]" },
            Param { name: "steps", ty: ParamType::Int, default: Default::Optional, doc: "duration in optimizer steps (give one of steps, tokens, epochs)" },
            Param { name: "tokens", ty: ParamType::Int, default: Default::Optional, doc: "duration in tokens (rows x seq_len), rounded up to whole steps" },
            Param { name: "epochs", ty: ParamType::Float, default: Default::Optional, doc: "duration in passes over the rows, rounded up to whole steps" },
            Param { name: "attention", ty: ParamType::Choice(&["causal", "document"]), default: Default::Value("\"causal\""), doc: "causal over the whole row, or block-diagonal per packed document with positions restarting" },
            Param { name: "attention_dropout", ty: ParamType::Float, default: Default::Value("0.0"), doc: "dropout on attention probabilities" },
            Param { name: "hidden_dropout", ty: ParamType::Float, default: Default::Value("0.0"), doc: "dropout on each block's attention and MLP outputs" },
            Param { name: "log_every", ty: ParamType::Int, default: Default::Value("10"), doc: "log loss, lr, grad norm and tokens/s every N steps" },
            Param { name: "eval_every", ty: ParamType::Int, default: Default::Value("0"), doc: "held-out loss every N steps (0: at the end only)" },
            Param { name: "eval_rows", ty: ParamType::Int, default: Default::Value("64"), doc: "held-out rows per evaluation" },
            Param { name: "checkpoint_every", ty: ParamType::Int, default: Default::Value("50"), doc: "checkpoint into scratch every N steps (a rerun resumes from the last one)" },
            Param { name: "seed", ty: ParamType::Int, default: Default::PipelineSeed, doc: "data order of later epochs, dropout and LoRA init" },
            Param { name: "resume", ty: ParamType::Input, default: Default::Optional, doc: "start from a trunk's checkpoint (cooldown branches; `branch = \"cooldown\"` wires it)" },
            precision::PARAM,
            Param { name: "activation_checkpointing", ty: ParamType::Bool, default: Default::Value("false"), doc: "on a burn device, keep only each block's input and recompute the block in the backward pass (a forward pass more, a block's activations instead of every block's); the same math, so not part of the key" },
            $($extra),*
        ]
    };
}

/// The training kinds' params that are not part of their key: how a run uses memory.
const UNKEYED: &[&str] = &["activation_checkpointing"];

/// Registered as `kind = "train-full"`. Version 4: the padding token's embedding row gets
/// no gradient from its lookups (as transformers' `padding_idx`), which changes what a model
/// whose config names a `pad_token_id` that occurs in its rows learns.
pub static FULL: Kind = Kind {
    name: "train-full",
    version: 4,
    doc: "full finetuning (or pretraining from a fresh model): every weight trains",
    params: train_params!(),
    outputs: &["model", "curve"],
    uses_device: true,
    unkeyed: UNKEYED,
    run: run_full,
};

/// Registered as `kind = "train-lora"`.
pub static LORA: Kind = Kind {
    name: "train-lora",
    version: 3,
    doc: "LoRA: low-rank adapters on the chosen projections train, the base stays frozen; writes the PEFT adapter and the merged model",
    params: train_params!(lora),
    outputs: &["model", "adapter", "curve"],
    uses_device: true,
    unkeyed: UNKEYED,
    run: run_lora,
};

/// Registered as `kind = "train-full-trunk"`: the shared part of full finetuning runs that
/// differ only in duration (see [`super::branch`]). Version 2: as [`FULL`]'s 4.
pub static FULL_TRUNK: Kind = Kind {
    name: "train-full-trunk",
    version: 2,
    doc: "the steps before the cooldown of a `train-full` duration, as a checkpoint that cooldown branches start from (written by `branch = \"cooldown\"`)",
    params: train_params!(),
    outputs: &["checkpoint"],
    uses_device: true,
    unkeyed: UNKEYED,
    run: run_full_trunk,
};

/// Registered as `kind = "train-lora-trunk"`: [`FULL_TRUNK`] for LoRA.
pub static LORA_TRUNK: Kind = Kind {
    name: "train-lora-trunk",
    version: 1,
    doc: "the steps before the cooldown of a `train-lora` duration, as a checkpoint that cooldown branches start from (written by `branch = \"cooldown\"`)",
    params: train_params!(lora),
    outputs: &["checkpoint"],
    uses_device: true,
    unkeyed: UNKEYED,
    run: run_lora_trunk,
};

/// The trunk kind of a training kind (`train-full` -> `train-full-trunk`), for the engine's
/// `branch = "cooldown"`; None for every other kind.
pub fn trunk_kind(kind: &Kind) -> Option<&'static Kind> {
    match kind.name {
        "train-full" => Some(&FULL_TRUNK),
        "train-lora" => Some(&LORA_TRUNK),
        _ => None,
    }
}

#[derive(Deserialize)]
struct TrainParams {
    optimizer: String,
    #[serde(rename = "lr")]
    lr_given: Option<f64>,
    /// `lr_given` or the `lr_from` choice's (see [`super::hparams`]).
    #[serde(skip)]
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    optimizer_state: String,
    weight_decay: f64,
    schedule: String,
    warmup: f64,
    cooldown: f64,
    final_lr_fraction: Option<f64>,
    clip_grad_norm: f64,
    global_batch: i64,
    micro_batch: Option<i64>,
    steps: Option<i64>,
    tokens: Option<i64>,
    epochs: Option<f64>,
    attention: String,
    attention_dropout: f64,
    hidden_dropout: f64,
    log_every: i64,
    eval_every: i64,
    eval_rows: i64,
    checkpoint_every: i64,
    seed: i64,
    precision: String,
    activation_checkpointing: bool,
    // train-lora
    rank: Option<i64>,
    alpha: Option<f64>,
    use_rslora: Option<bool>,
    lora_dropout: Option<f64>,
    targets: Option<Vec<String>>,
    init: Option<String>,
}

/// Where a run stops and what it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The whole duration (or, with `resume`, the rest of it): the model and curve.
    Whole,
    /// Up to the duration's cooldown start: the checkpoint.
    Trunk,
}

fn run_full(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    train(ctx, false, Phase::Whole)
}

fn run_lora(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    train(ctx, true, Phase::Whole)
}

fn run_full_trunk(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    train(ctx, false, Phase::Trunk)
}

fn run_lora_trunk(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    train(ctx, true, Phase::Trunk)
}

fn bad(msg: impl Into<String>) -> StageError {
    StageError::Params(msg.into())
}

/// The LoRA target list, presets expanded.
fn lora_targets(names: &[String]) -> Result<Vec<Proj>, StageError> {
    let mut out = Vec::new();
    for n in names {
        let add: Vec<Proj> = match n.as_str() {
            "all" => Proj::ALL.to_vec(),
            "attention" => vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            "mlp" => vec![Proj::Gate, Proj::Up, Proj::Down],
            // PEFT's module names too, Phi-3's fused ones included.
            "qkv_proj" => vec![Proj::Q, Proj::K, Proj::V],
            "gate_up_proj" => vec![Proj::Gate, Proj::Up],
            other => vec![
                Proj::parse(other)
                    .or_else(|| Proj::parse(other.strip_suffix("_proj")?))
                    .ok_or_else(|| {
                        bad(format!(
                            "targets: unknown projection `{other}` (q, k, v, o, gate, up, down or PEFT's q_proj ... down_proj, qkv_proj, gate_up_proj; the presets all, attention, mlp)"
                        ))
                    })?,
            ],
        };
        out.extend(add);
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(bad("targets: name at least one projection"));
    }
    Ok(out)
}

/// Appends lines to the stage's log.
struct Log(std::fs::File);

impl Log {
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.0, "{text}");
    }
}

/// Appends one step's scalars to the live TensorBoard file, if there is one; on an I/O
/// error the live file is dropped (and the log says so): watching is not worth a failed run.
fn live_event(live: &mut Option<LiveWriter>, log: &mut Log, step: u64, scalars: &[(&str, f64)]) {
    if let Some(w) = live
        && let Err(e) = w.scalars(step, scalars)
    {
        log.line(&format!(
            "live TensorBoard events off: {}: {e}",
            w.path().display()
        ));
        *live = None;
    }
}

fn input_dir<'a>(ctx: &'a StageContext, name: &str) -> Option<&'a Path> {
    ctx.artifact(name).map(|a| a.dir.as_path())
}

fn train(ctx: &StageContext, lora: bool, phase: Phase) -> Result<StageOutcome, StageError> {
    crate::cpu::alloc::keep_freed_memory();
    let p: TrainParams = ctx.typed_params()?;
    let mut log = Log(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.log)
        .map_err(|e| StageError::io(format!("opening {}", ctx.log.display()), e))?);
    let model_dir = input_dir(ctx, "model").ok_or_else(|| bad("missing `model` input"))?;
    let data_dir = input_dir(ctx, "data").ok_or_else(|| bad("missing `data` input"))?;
    let p = TrainParams {
        lr: super::hparams::learning_rate(ctx, p.lr_given)?,
        ..p
    };
    let (global, micro) = check_numbers(&p)?;
    // The device, and whether it computes in the asked type, before anything loads.
    let precision = Precision::parse(&p.precision)?;
    let choice = device::select(ctx.device)?;
    precision.check(&choice)?;
    let state_type = StateType::parse(&p.optimizer_state)?;
    state_type.check(&choice)?;
    let packed = Packed::open(data_dir)?;
    let seq_len = packed.summary.seq_len;
    let footprint = fits(&p, lora, &choice, model_dir, seq_len)?;
    let base = Weights::load(model_dir)?;
    let reader = packed.reader()?;
    if reader.rows == 0 {
        return Err(StageError::Failed(format!(
            "{}: no rows to train on",
            data_dir.display()
        )));
    }
    if seq_len > base.arch.positions {
        return Err(bad(format!(
            "rows of {seq_len} tokens exceed the {} positions the model runs at ({})",
            base.arch.positions,
            base.arch.positions_source()
        )));
    }
    let max_id = base.config.vocab_size;
    let rows_total = reader.rows as u64;
    let tokens_per_step = (global * seq_len) as u64;
    let steps = duration_steps(&p, rows_total, global as u64, tokens_per_step)?;
    let schedule = schedule_of(&p, steps);
    // A trunk stops where its duration's cooldown starts; with `resume` a run starts from a
    // trunk's checkpoint. Both are sound only when the steps before the cooldown are the same
    // for every duration (see super::branch).
    let shares_trunk = phase == Phase::Trunk || ctx.artifact("resume").is_some();
    if shares_trunk {
        branch::check_schedule(&p.schedule, p.warmup).map_err(|e| {
            bad(format!(
                "{}: {e}",
                if phase == Phase::Trunk {
                    "trunk"
                } else {
                    "resume"
                }
            ))
        })?;
    }
    let cooldown_from = cooldown_start(steps, p.cooldown);
    let stop = match phase {
        Phase::Whole => steps,
        Phase::Trunk => cooldown_from,
    };
    let fingerprint = shares_trunk.then(|| branch::fingerprint(ctx, lora));
    let attention = if p.attention == "document" {
        Attention::Document
    } else {
        Attention::Causal
    };
    let rng = Rng::new(p.seed as u64);
    let adapters = if lora {
        Some(adapters_of(&p, &base, &rng)?)
    } else {
        None
    };
    let rule = rule_of(&p);
    let sizes: Vec<usize> = match &adapters {
        Some(a) => a.tensors.iter().map(|t| t.data.len()).collect(),
        None => base.tensors.iter().map(|t| t.data.len()).collect(),
    };
    let opt = Optimizer::new(rule, p.weight_decay as f32, p.lr as f32, &sizes)
        .with_state_type(state_type);
    let threads = ctx.threads.max(1);
    let positions = seq_len.max(1);
    let lora_rank = adapters.as_ref().map(|a| a.spec.rank);
    let device_name = choice.describe();
    let on_cpu = matches!(choice, Choice::Cpu);
    let mut trainer: Box<dyn Trainer> = match choice {
        Choice::Cpu => Box::new(CpuTrainer::new(
            base.clone(),
            adapters,
            opt,
            positions,
            threads,
        )),
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        Choice::Burn(dev, _) => Box::new(
            crate::gpu::trainer::BurnTrainer::new(base.clone(), adapters, &opt, dev, precision)
                .with_activation_checkpointing(p.activation_checkpointing),
        ),
    };
    if p.activation_checkpointing && on_cpu {
        log.line("activation_checkpointing applies to burn devices; the CPU engine keeps its activations");
    }
    if let Some(f) = &footprint {
        log.line(&format!(
            "device memory: at least {:.1} GiB ({})",
            gib(f.total()),
            f.describe()
        ));
    }
    let mut state = resume(
        ctx,
        trainer.as_mut(),
        fingerprint.as_ref(),
        cooldown_from,
        &mut log,
    )?;
    let heldout = data::heldout_rows(input_dir(ctx, "heldout"), p.eval_rows.max(1) as usize)?;
    log.line(&format!(
        "training {} ({} params{}) for {}: {global} rows x {seq_len} tokens per step, micro-batch {micro}, {threads} threads, device {device_name}, precision {}, optimizer state {}",
        if lora { "LoRA" } else { "all weights" },
        trainer.trainable_count(),
        if lora { " trainable" } else { "" },
        match phase {
            Phase::Whole => format!("{steps} steps"),
            Phase::Trunk => format!("the trunk of a {steps}-step run, up to its cooldown at step {stop}"),
        },
        precision.name(),
        state_type.name(),
    ));
    ctx.progress.set_length(stop);
    ctx.progress.set_position(state.step);
    let mut live = live_writer(ctx, state.step + 1, &mut log);

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| StageError::Failed(format!("starting {threads} threads: {e}")))?;
    let eval =
        |trainer: &dyn Trainer, rows: &[PackedRow]| mean_loss(trainer, rows, micro, attention);
    let mut order = Order::new(reader.rows, rng.fork("order").next_u64());
    let clock = Instant::now();
    let start_step = state.step;
    let mut window = (Instant::now(), 0u64);
    let mut last_loss = f64::NAN;
    let result: Result<(), StageError> = pool.install(|| {
        for step in state.step..stop {
            let step_clock = Instant::now();
            let lr = schedule.lr(p.lr, step, steps);
            let rows = data::read_rows(&reader, &mut order, step * global as u64, global)?;
            let (batches, targets) = data::step_batches(&rows, micro, attention, max_id, data_dir, step)?;
            let loss = accumulate_step(trainer.as_mut(), &batches, targets, &p, &rng, step);
            if !loss.is_finite() {
                return Err(StageError::Failed(format!(
                    "the loss is {loss} at step {} (lr {lr:.3e}); checkpoints up to step {} are kept in {}",
                    step + 1,
                    state.step,
                    ctx.scratch.display()
                )));
            }
            let update = trainer.apply(lr as f32, p.clip_grad_norm);
            let norm = update.grad_norm;
            if update.skipped {
                log.line(&format!(
                    "step {}: f16 gradients overflowed (norm {norm}); step skipped, loss scale now {}",
                    step + 1,
                    trainer.loss_scale().unwrap_or(1.0)
                ));
            }
            state.step = step + 1;
            state.tokens += tokens_per_step;
            last_loss = loss;
            let heldout_loss = match &heldout {
                Some(rows) if p.eval_every > 0 && state.step.is_multiple_of(p.eval_every as u64) => {
                    Some(eval(trainer.as_ref(), rows))
                }
                _ => None,
            };
            state.curve.push(format!(
                "{},{},{lr:e},{loss},{norm},{}",
                state.step,
                state.tokens,
                heldout_loss.map(|h| h.to_string()).unwrap_or_default()
            ));
            let mut scalars = vec![
                ("loss", loss),
                ("lr", lr),
                ("grad_norm", norm),
                (
                    "tokens_per_s",
                    tokens_per_step as f64 / step_clock.elapsed().as_secs_f64().max(1e-9),
                ),
            ];
            if let Some(h) = heldout_loss {
                scalars.push(("heldout_loss", h));
            }
            live_event(&mut live, &mut log, state.step, &scalars);
            window.1 += tokens_per_step;
            if state.step.is_multiple_of(p.log_every.max(1) as u64) || state.step == stop {
                let tps = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
                log.line(&format!(
                    "step {}/{stop} loss {loss:.4} lr {lr:.3e} grad_norm {norm:.4} tokens/s {tps:.0}{}",
                    state.step,
                    heldout_loss.map(|h| format!(" heldout {h:.4}")).unwrap_or_default()
                ));
                window = (Instant::now(), 0);
            }
            ctx.progress.set_position(state.step);
            ctx.progress.set_message(&format!("loss {loss:.3}"));
            if p.checkpoint_every > 0 && state.step.is_multiple_of(p.checkpoint_every as u64) && state.step < stop {
                let (tensors, opt) = trainer.snapshot();
                checkpoint::save(ctx.scratch, &tensors, &opt, &state)?;
            }
        }
        Ok(())
    });
    result?;
    let secs = clock.elapsed().as_secs_f64();
    let ran = state.step - start_step;
    // Skipped steps are in the curve (a non-finite grad_norm), resumed parts included.
    let skipped = skipped_steps(&state.curve);
    let tps = (ran * tokens_per_step) as f64 / secs.max(1e-9);
    let mut outcome = StageOutcome::default();
    outcome
        .metrics
        .insert("final_loss".into(), json!(last_loss));
    if precision == Precision::F16 {
        outcome
            .metrics
            .insert("skipped_steps".into(), json!(skipped));
        log.line(&format!(
            "{skipped} of {} steps skipped by f16 loss scaling",
            state.step
        ));
    }
    outcome
        .metrics
        .insert("tokens_per_s".into(), json!(tps.round()));
    if phase == Phase::Trunk {
        let out = ctx.output("checkpoint")?;
        let (tensors, opt) = trainer.snapshot();
        checkpoint::save(out, &tensors, &opt, &state)?;
        branch::write_trunk(
            out,
            fingerprint.as_ref().expect("a trunk has a fingerprint"),
        )?;
        log.line(&format!(
            "trunk done at step {stop}: {ran} steps in {secs:.1}s ({tps:.0} tokens/s)"
        ));
        outcome.metrics.insert("steps".into(), json!(stop));
        outcome.metrics.insert("tokens".into(), json!(state.tokens));
        return Ok(outcome);
    }
    let final_heldout = heldout
        .as_ref()
        .map(|rows| pool.install(|| eval(trainer.as_ref(), rows)));
    let trainable_params = trainer.trainable_count();
    if let (Some(h), Some(last)) = (final_heldout, state.curve.last_mut())
        && last.ends_with(',')
    {
        last.push_str(&h.to_string());
        live_event(&mut live, &mut log, state.step, &[("heldout_loss", h)]);
    }

    // Outputs.
    write_model(ctx, model_dir, trainer)?;
    let summary = json!({
        "method": if lora { "lora" } else { "full" },
        "steps": steps,
        "tokens": state.tokens,
        "seq_len": seq_len,
        "global_batch": global,
        "final_loss": last_loss,
        "heldout_loss": final_heldout,
        "trainable_params": trainable_params,
        "lr": p.lr,
        "rank": lora_rank,
        "precision": precision.name(),
        "optimizer_state": state_type.name(),
        "skipped_steps": skipped,
    });
    write_curve(ctx.output("curve")?, &state.curve, &summary)?;
    log.line(&format!(
        "done: {ran} steps in {secs:.1}s ({tps:.0} tokens/s)"
    ));
    if let Some(h) = final_heldout {
        outcome.metrics.insert("heldout_loss".into(), json!(h));
    }
    outcome.metrics.insert("steps".into(), json!(steps));
    outcome.metrics.insert("tokens".into(), json!(state.tokens));
    Ok(outcome)
}

/// The numbers a stage's kind cannot check by type: a positive learning rate, dropouts in
/// [0, 1), a global batch that the micro-batch divides. Returns (global, micro) batch rows.
fn check_numbers(p: &TrainParams) -> Result<(usize, usize), StageError> {
    if p.lr <= 0.0 || !p.lr.is_finite() {
        return Err(bad(format!("lr must be positive (got {})", p.lr)));
    }
    for (name, v) in [
        ("attention_dropout", p.attention_dropout),
        ("hidden_dropout", p.hidden_dropout),
    ] {
        if !(0.0..1.0).contains(&v) {
            return Err(bad(format!("{name} must be in [0, 1) (got {v})")));
        }
    }
    let global = p.global_batch;
    let micro = p.micro_batch.unwrap_or(global);
    if global < 1 || micro < 1 || global % micro != 0 {
        return Err(bad(format!(
            "global_batch ({global}) must be a positive multiple of micro_batch ({micro})"
        )));
    }
    Ok((global as usize, micro as usize))
}

/// The live TensorBoard writer, from step `first` on, where the run asks for live curves.
/// They are for watching: a failure to write them is logged, never fatal.
fn live_writer(ctx: &StageContext, first: u64, log: &mut Log) -> Option<LiveWriter> {
    let dir = ctx.live_logs?;
    match LiveWriter::create(dir, first) {
        Ok(w) => {
            log.line(&format!("live TensorBoard events: {}", w.path().display()));
            Some(w)
        }
        Err(e) => {
            log.line(&format!(
                "live TensorBoard events off: {}: {e}",
                dir.display()
            ));
            None
        }
    }
}

/// The mean loss per target of `rows`, `micro` rows at a time, without training (the
/// held-out loss).
fn mean_loss(trainer: &dyn Trainer, rows: &[PackedRow], micro: usize, attention: Attention) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(micro) {
        let (s, k) = trainer.eval(&data::batch(chunk, attention));
        sum += s;
        n += k;
    }
    sum / n.max(1) as f64
}

/// A step's gradients, summed into the trainer over its micro-batches (each scaled by the
/// step's `targets`, each with dropout masks from its own seed: the stage seed, the step and
/// the micro-batch). Returns the step's mean loss per target.
fn accumulate_step(
    trainer: &mut dyn Trainer,
    batches: &[Batch],
    targets: usize,
    p: &TrainParams,
    rng: &Rng,
    step: u64,
) -> f64 {
    let scale = 1.0 / targets as f32;
    let mut loss_sum = 0.0;
    for (k, b) in batches.iter().enumerate() {
        let drop = Dropouts {
            attention: p.attention_dropout as f32,
            hidden: p.hidden_dropout as f32,
            lora: trainer.lora_dropout(),
            seed: rng.fork(&format!("dropout-{step}-{k}")).next_u64(),
        };
        let any = drop.attention > 0.0 || drop.hidden > 0.0 || drop.lora > 0.0;
        let (s, _) = trainer.accumulate(b, scale, any.then_some(drop));
        loss_sum += s;
    }
    loss_sum / targets as f64
}

/// Where training starts: the stage's own newest usable scratch checkpoint (damaged ones
/// skipped, and said so in the log), else with `fingerprint` (a trunk or a `resume` run)
/// the trunk's checkpoint at the cooldown, else step 0. Restores the trainer to it.
fn resume(
    ctx: &StageContext,
    trainer: &mut dyn Trainer,
    fingerprint: Option<&serde_json::Value>,
    cooldown_from: u64,
    log: &mut Log,
) -> Result<LoopState, StageError> {
    let loaded = checkpoint::load(ctx.scratch)?;
    let resuming_from = loaded.checkpoint.as_ref().map(|ck| {
        ck.dir.file_name().map_or_else(
            || ck.dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    for why in &loaded.skipped {
        match &resuming_from {
            Some(name) => log.line(&format!("{why}; resuming from {name}")),
            None => log.line(why),
        }
    }
    if resuming_from.is_none() && !loaded.skipped.is_empty() {
        log.line("no checkpoint is usable (every one was damaged); training starts from step 0");
    }
    // The stage's own scratch checkpoint first (it continues the trunk, if there is one).
    let (start, from) = match loaded.checkpoint {
        Some(ck) => (Some(ck), None),
        None => match fingerprint {
            Some(f) => match branch::read_resume(ctx, f, cooldown_from)? {
                Some((ck, stage)) => (Some(ck), Some(stage)),
                None => (None, None),
            },
            None => (None, None),
        },
    };
    let Some(ck) = start else {
        return Ok(LoopState {
            step: 0,
            tokens: 0,
            curve: Vec::new(),
        });
    };
    trainer
        .restore(ck.trainable, ck.opt)
        .map_err(|e| StageError::Failed(format!("{}: {e}", ck.dir.display())))?;
    let state = ck.state;
    match from {
        Some(stage) => log.line(&format!(
            "starting at step {} from the checkpoint of trunk {stage}",
            state.step
        )),
        None => log.line(&format!(
            "resumed from checkpoint at step {} ({})",
            state.step,
            ck.dir.display()
        )),
    }
    Ok(state)
}

/// The trained model (merged, for LoRA, beside the PEFT adapter), with the base's
/// tokenizer.
fn write_model(
    ctx: &StageContext,
    model_dir: &Path,
    trainer: Box<dyn Trainer>,
) -> Result<(), StageError> {
    let model_out = ctx.output("model")?;
    let tokenizer = model_dir.join("tokenizer.json");
    let (weights, adapters) = trainer.finish();
    match &adapters {
        Some(a) => {
            a.save(ctx.output("adapter")?, None)?;
            a.merge(&weights).save(model_out, Some(2 << 30))?;
        }
        None => weights.save(model_out, Some(2 << 30))?,
    }
    if tokenizer.is_file() {
        std::fs::copy(&tokenizer, model_out.join("tokenizer.json"))
            .map_err(|e| StageError::io("copying tokenizer.json", e))?;
    }
    Ok(())
}

/// The curve output: `curve.csv`, the same rows as a TensorBoard event file, and the run's
/// summary.
fn write_curve(
    curve_dir: &Path,
    curve: &[String],
    summary: &serde_json::Value,
) -> Result<(), StageError> {
    let mut csv = String::from("step,tokens,lr,loss,grad_norm,heldout_loss\n");
    for line in curve {
        csv.push_str(line);
        csv.push('\n');
    }
    std::fs::write(curve_dir.join("curve.csv"), csv)
        .map_err(|e| StageError::io("writing curve.csv", e))?;
    let mut rows = Vec::with_capacity(curve.len());
    for line in curve {
        rows.push(CurveRow::parse(line).ok_or_else(|| {
            StageError::Failed(format!(
                "curve row `{line}` is not step,tokens,lr,loss,grad_norm,heldout_loss"
            ))
        })?);
    }
    std::fs::write(
        curve_dir.join(tensorboard::CURVE_FILE),
        tensorboard::curve_events(&rows),
    )
    .map_err(|e| StageError::io(format!("writing {}", tensorboard::CURVE_FILE), e))?;
    std::fs::write(
        curve_dir.join("summary.json"),
        serde_json::to_string_pretty(summary).expect("json"),
    )
    .map_err(|e| StageError::io("writing summary.json", e))
}

/// The run's length in optimizer steps from its one duration param: `steps`, `tokens`
/// (rounded up to whole steps of `tokens_per_step`) or `epochs` over `rows` rows.
fn duration_steps(
    p: &TrainParams,
    rows: u64,
    global: u64,
    tokens_per_step: u64,
) -> Result<u64, StageError> {
    match (p.steps, p.tokens, p.epochs) {
        (Some(s), None, None) if s > 0 => Ok(s as u64),
        (None, Some(t), None) if t > 0 => Ok((t as u64).div_ceil(tokens_per_step)),
        (None, None, Some(e)) if e > 0.0 => Ok(((e * rows as f64) / global as f64).ceil() as u64),
        _ => Err(bad(
            "give exactly one positive duration: `steps`, `tokens` or `epochs`",
        )),
    }
}

/// The learning-rate schedule the params give, over `steps`.
fn schedule_of(p: &TrainParams, steps: u64) -> Schedule {
    match p.schedule.as_str() {
        "cosine" => Schedule::Cosine {
            warmup: steps_or_fraction(p.warmup, steps),
            final_fraction: p.final_lr_fraction.unwrap_or(0.01),
        },
        "trapezoid" => Schedule::Trapezoid {
            warmup: steps_or_fraction(p.warmup, steps),
            cooldown: steps_or_fraction(p.cooldown, steps),
            final_fraction: p.final_lr_fraction.unwrap_or(0.0),
        },
        _ => Schedule::Constant {
            warmup: steps_or_fraction(p.warmup, steps),
        },
    }
}

/// Fresh LoRA adapters as the params describe them (rank, alpha, rsLoRA, dropout, targets,
/// A's init), seeded from the stage's generator.
fn adapters_of(p: &TrainParams, base: &Weights, rng: &Rng) -> Result<Adapters, StageError> {
    let rank = p.rank.unwrap_or(0);
    if rank < 1 {
        return Err(bad(format!("rank must be positive (got {rank})")));
    }
    let ld = p.lora_dropout.unwrap_or(0.05);
    if !(0.0..1.0).contains(&ld) {
        return Err(bad(format!("lora_dropout must be in [0, 1) (got {ld})")));
    }
    let spec = LoraSpec {
        rank: rank as usize,
        alpha: p.alpha.unwrap_or(2.0 * rank as f64),
        rslora: p.use_rslora.unwrap_or(false),
        dropout: ld as f32,
        targets: lora_targets(p.targets.as_deref().unwrap_or(&["all".to_string()]))?,
    };
    crate::cpu::lora::modules(&base.config, &base.arch, &spec.targets).map_err(bad)?;
    let init = if p.init.as_deref() == Some("gaussian") {
        LoraInit::Gaussian
    } else {
        LoraInit::Kaiming
    };
    Ok(Adapters::init(
        &base.config,
        &spec,
        init,
        rng.fork("lora-init").next_u64(),
    ))
}

/// On a burn device, what training needs at least ([`memory::footprint`], from the model's
/// config alone) against what the device has, before any weight loads; None on the CPU.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
fn fits(
    p: &TrainParams,
    lora: bool,
    choice: &Choice,
    model_dir: &Path,
    seq_len: usize,
) -> Result<Option<memory::Footprint>, StageError> {
    match choice {
        Choice::Cpu => Ok(None),
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        Choice::Burn(device, name) => {
            let config = crate::model::config::ModelConfig::read(&model_dir.join("config.json"))?;
            let footprint = footprint_of(p, lora, &config, seq_len)?;
            let what = format!(
                "training ({}; precision, optimizer_state, activation_checkpointing, micro_batch \
                 or LoRA lower it)",
                footprint.describe()
            );
            device::check_fits(device, name, footprint.total(), &what)?;
            Ok(Some(footprint))
        }
    }
}

/// The device memory a training stage with `params` (as the stage gets them, defaults
/// filled in) needs at least for a model of `config` on rows of `seq_len` tokens: what it
/// checks against the device before loading. Public so that a profile can be checked
/// against a GPU's memory stage by stage without running it (the paper profile's test).
pub fn device_memory(
    params: &serde_json::Value,
    lora: bool,
    config: &crate::model::config::ModelConfig,
    seq_len: usize,
) -> Result<memory::Footprint, StageError> {
    let p: TrainParams = serde_json::from_value(params.clone())
        .map_err(|e| StageError::Params(format!("training params: {e}")))?;
    footprint_of(&p, lora, config, seq_len)
}

fn footprint_of(
    p: &TrainParams,
    lora: bool,
    config: &crate::model::config::ModelConfig,
    seq_len: usize,
) -> Result<memory::Footprint, StageError> {
    let targets = if lora {
        lora_targets(p.targets.as_deref().unwrap_or(&["all".to_string()]))?
    } else {
        Vec::new()
    };
    let rank = p.rank.unwrap_or(1).max(1) as usize;
    let micro = p.micro_batch.unwrap_or(p.global_batch).max(1);
    Ok(memory::footprint(&memory::Setup {
        config,
        lora: lora.then_some((rank, targets.as_slice())),
        rule: &rule_of(p),
        state_type: StateType::parse(&p.optimizer_state)?,
        precision: Precision::parse(&p.precision)?,
        checkpointing: p.activation_checkpointing,
        attention_dropout: p.attention_dropout > 0.0,
        micro: micro as usize,
        seq: seq_len,
        accumulates: p.global_batch > micro,
    }))
}

/// The optimizer's update rule with its hyperparameters.
fn rule_of(p: &TrainParams) -> Rule {
    if p.optimizer == "adamw" {
        Rule::AdamW {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            eps: p.eps as f32,
        }
    } else {
        Rule::LionW {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
        }
    }
}

/// Steps whose update was skipped (f16 gradients overflowed): their curve rows carry the
/// non-finite gradient norm.
fn skipped_steps(curve: &[String]) -> usize {
    curve
        .iter()
        .filter_map(|line| CurveRow::parse(line))
        .filter(|row| !row.grad_norm.is_finite())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Targets by flow's short names, PEFT's module names (Phi-3's fused ones meaning their
    /// parts) and presets mean the same projections.
    #[test]
    fn lora_targets_take_short_and_peft_names() {
        let names = |v: &[&str]| lora_targets(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(names(&["q_proj", "v"]).unwrap(), [Proj::Q, Proj::V]);
        assert_eq!(
            names(&["qkv_proj", "o_proj"]).unwrap(),
            names(&["attention"]).unwrap()
        );
        assert_eq!(
            names(&["gate_up_proj", "down_proj"]).unwrap(),
            names(&["mlp"]).unwrap()
        );
        let e = names(&["qkv"]).unwrap_err().to_string();
        assert!(e.contains("unknown projection `qkv`"), "{e}");
    }
}
