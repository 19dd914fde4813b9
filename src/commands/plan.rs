//! `flow plan`: what would run and why (never run, changed, removed, upstream first), with
//! each training stage's budget in steps and tokens.

use std::io::Write;
use std::process::ExitCode;

use flow::exec::plan::{KeyState, resolve};
use flow::key::short;
use flow::pipeline::Pipeline;
use flow::store::KeyLock;
use flow::ui::Status;
use serde_json::json;

use super::{CmdResult, Context};
use crate::PipelineArgs;

impl Context {
    pub fn plan(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        // One write per 64 KiB, not per line: plans of 100,000 stages print 100,000 lines.
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        // Never dropped, like the pipeline: freeing 100,000 records and key parts at exit
        // was 11% of planning 100,000 done stages.
        let states = std::mem::ManuallyDrop::new(resolve(&pipeline, &cache)?);
        let index = cache.read_index(&pipeline.name);
        let (mut would, mut cached) = (0, 0);
        for (stage, state) in pipeline.stages.iter().zip(states.iter()) {
            let (status, reason) = match state {
                KeyState::Known {
                    record: Some(_), ..
                } => (Status::Cached, String::new()),
                KeyState::Known { parts, key, .. } => {
                    let reason = if KeyLock::is_held(&cache, key) {
                        "running in another flow process".to_string()
                    } else {
                        match index.get(&stage.name) {
                            Some(old) if old == key => {
                                "missing: its record or outputs were removed".into()
                            }
                            Some(old) => match cache.read_record(old)? {
                                Some(r) => {
                                    format!("changed: {}", parts.differences(&r.parts).join("; "))
                                }
                                None => format!(
                                    "changed: earlier key {} is no longer cached",
                                    short(old)
                                ),
                            },
                            None => "missing: never run".to_string(),
                        }
                    };
                    (Status::WouldRun, reason)
                }
                KeyState::Waiting { on } => (
                    Status::WouldRun,
                    format!("upstream `{}` would run first", pipeline.stages[*on].name),
                ),
            };
            match status {
                Status::Cached => cached += 1,
                _ => would += 1,
            }
            let budget = training_budget(&pipeline, stage);
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({"event": "stage", "stage": stage.name, "status": status.as_str(),
                           "key": state.key(), "reason": reason, "budget": budget})
                )?;
            } else if status != Status::Cached || self.verbose {
                let k = state.key().map(short).unwrap_or("?");
                let budget = budget.map(|b| format!("  [{b}]")).unwrap_or_default();
                writeln!(
                    out,
                    "{:>9}  {}  {k}  {reason}{budget}",
                    status.as_str(),
                    stage.name
                )?;
            }
        }
        let savings = branching_savings(&pipeline);
        if json {
            let mut summary = json!({"event": "summary", "would_run": would, "cached": cached});
            if let Some((planned, scratch)) = savings {
                summary["train_tokens"] = json!(planned);
                summary["train_tokens_from_scratch"] = json!(scratch);
            }
            writeln!(out, "{summary}")?;
        } else {
            writeln!(out, "{would} would run, {cached} cached")?;
            if let Some((planned, scratch)) = savings {
                writeln!(
                    out,
                    "training: {} tokens with cooldown branches, {} with every duration from scratch ({:.0}%)",
                    human(planned as f64),
                    human(scratch as f64),
                    100.0 * planned as f64 / scratch.max(1) as f64
                )?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// The kinds that train, with their cooldown trunks.
const TRAINING_KINDS: [&str; 4] = [
    "train-full",
    "train-lora",
    "train-full-trunk",
    "train-lora-trunk",
];

fn int(stage: &flow::pipeline::Stage, k: &str) -> Option<i64> {
    match stage.params.get(k) {
        Some(flow::key::Val::Int(v)) => Some(*v),
        _ => None,
    }
}

fn float(stage: &flow::pipeline::Stage, k: &str) -> Option<f64> {
    match stage.params.get(k) {
        Some(flow::key::Val::Int(v)) => Some(*v as f64),
        Some(flow::key::Val::Float(v)) => Some(*v),
        _ => None,
    }
}

/// The stage an input param of `stage` reads (the first source).
fn input_stage<'a>(
    pipeline: &'a Pipeline,
    stage: &flow::pipeline::Stage,
    path: &str,
) -> Option<&'a flow::pipeline::Stage> {
    stage
        .inputs
        .iter()
        .find(|b| b.path == path)
        .and_then(|b| b.sources.first())
        .map(|s| &pipeline.stages[s.stage])
}

/// Where a training stage's steps lie when the rows' length is known from the `pack` stage
/// that feeds it (durations in steps or tokens): the steps it trains, from where (its
/// `resume` trunk's end) to where (its cooldown start, for a trunk), of how many in all.
#[derive(Debug, Clone, Copy)]
struct Span {
    from: u64,
    to: u64,
    total: u64,
    tokens_per_step: u64,
}

fn span(pipeline: &Pipeline, stage: &flow::pipeline::Stage) -> Option<Span> {
    if !TRAINING_KINDS.contains(&stage.kind.name) {
        return None;
    }
    let global = int(stage, "global_batch")? as u64;
    let seq = int(input_stage(pipeline, stage, "data")?, "seq_len")? as u64;
    let tokens_per_step = global * seq;
    let total = match (int(stage, "steps"), int(stage, "tokens")) {
        (Some(s), _) => s as u64,
        (_, Some(t)) => (t as u64).div_ceil(tokens_per_step.max(1)),
        _ => return None,
    };
    let cooldown = float(stage, "cooldown").unwrap_or(0.0);
    let to = if stage.kind.name.ends_with("-trunk") {
        flow_stages::train::schedule::cooldown_start(total, cooldown)
    } else {
        total
    };
    let from = match input_stage(pipeline, stage, "resume") {
        Some(trunk) => span(pipeline, trunk)?.to,
        None => 0,
    };
    Some(Span {
        from,
        to,
        total,
        tokens_per_step,
    })
}

/// Tokens the pipeline's training stages train as planned, and what they would train with
/// every duration from scratch; None unless some stage is a cooldown branch and every
/// span is known.
fn branching_savings(pipeline: &Pipeline) -> Option<(u64, u64)> {
    let (mut planned, mut scratch, mut branched) = (0u64, 0u64, false);
    for stage in &pipeline.stages {
        if !TRAINING_KINDS.contains(&stage.kind.name) {
            continue;
        }
        let s = span(pipeline, stage)?;
        planned += (s.to - s.from.min(s.to)) * s.tokens_per_step;
        if !stage.kind.name.ends_with("-trunk") {
            scratch += s.total * s.tokens_per_step;
        }
        branched |= stage.kind.name.ends_with("-trunk");
    }
    branched.then_some((planned, scratch))
}

fn human(t: f64) -> String {
    if t >= 1e9 {
        format!("{:.2}B", t / 1e9)
    } else if t >= 1e6 {
        format!("{:.1}M", t / 1e6)
    } else {
        format!("{t:.0}")
    }
}

/// What a training stage will do, for `flow plan`: its duration in tokens, steps and
/// epochs where the rows' length is known from the `pack` stage that feeds it; for a trunk
/// or a cooldown branch, the steps it trains of its duration.
fn training_budget(pipeline: &Pipeline, stage: &flow::pipeline::Stage) -> Option<String> {
    if !TRAINING_KINDS.contains(&stage.kind.name) {
        return None;
    }
    let global = int(stage, "global_batch")?;
    if let Some(s) = span(pipeline, stage)
        && (s.from > 0 || s.to < s.total)
    {
        let what = if s.to < s.total {
            "trunk"
        } else {
            "cooldown branch"
        };
        return Some(format!(
            "{what}: steps {}..{} of {} = {} tokens",
            s.from,
            s.to,
            s.total,
            human(((s.to - s.from.min(s.to)) * s.tokens_per_step) as f64)
        ));
    }
    let seq = input_stage(pipeline, stage, "data").and_then(|s| int(s, "seq_len"));
    let per_step = seq.map(|s| (global * s) as f64);
    let text = match (
        int(stage, "steps"),
        int(stage, "tokens"),
        stage.params.get("epochs"),
    ) {
        (Some(steps), _, _) => match per_step {
            Some(t) => format!(
                "{steps} steps x {global} rows x {} = {} tokens",
                seq?,
                human(steps as f64 * t)
            ),
            None => format!("{steps} steps of {global} rows"),
        },
        (_, Some(tokens), _) => match per_step {
            Some(t) => format!(
                "{} tokens = {} steps x {global} rows x {}",
                human(tokens as f64),
                (tokens as f64 / t).ceil(),
                seq?
            ),
            None => format!("{} tokens", human(tokens as f64)),
        },
        (_, _, Some(flow::key::Val::Float(e))) => format!("{e} epochs, {global} rows per step"),
        (_, _, Some(flow::key::Val::Int(e))) => format!("{e} epochs, {global} rows per step"),
        _ => return None,
    };
    Some(text)
}
