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
        if json {
            writeln!(
                out,
                "{}",
                json!({"event": "summary", "would_run": would, "cached": cached})
            )?;
        } else {
            writeln!(out, "{would} would run, {cached} cached")?;
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// What a training stage will do, for `flow plan`: its duration in tokens, steps and
/// epochs where the rows' length is known from the `pack` stage that feeds it.
fn training_budget(pipeline: &Pipeline, stage: &flow::pipeline::Stage) -> Option<String> {
    if !matches!(stage.kind.name, "train-full" | "train-lora") {
        return None;
    }
    let int = |s: &flow::pipeline::Stage, k: &str| match s.params.get(k) {
        Some(flow::key::Val::Int(v)) => Some(*v),
        _ => None,
    };
    let global = int(stage, "global_batch")?;
    let seq = stage
        .inputs
        .iter()
        .find(|b| b.path == "data")
        .and_then(|b| b.sources.first())
        .and_then(|s| int(&pipeline.stages[s.stage], "seq_len"));
    let human = |t: f64| {
        if t >= 1e9 {
            format!("{:.2}B", t / 1e9)
        } else if t >= 1e6 {
            format!("{:.1}M", t / 1e6)
        } else {
            format!("{t:.0}")
        }
    };
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
