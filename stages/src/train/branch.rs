//! Cooldown branches: the paper's protocol of training each method once and re-running only
//! the cooldown for each shorter duration.
//!
//! With the trapezoid schedule and a warmup given in steps, the learning rate of every step
//! before a duration's cooldown starts is the same for all durations (warmup, then the
//! peak), and so are the data order and the dropout streams (both pure functions of the
//! step). A run of any duration is therefore, up to its cooldown start, a prefix of the
//! longest run. A *trunk* stage (`train-full-trunk`, `train-lora-trunk`) trains that shared
//! part up to one duration's cooldown start and outputs the checkpoint; the next trunk
//! stage continues from it, and a *branch* (an ordinary `train-full`/`train-lora` stage
//! with `resume` set) starts from it and runs only its cooldown. The branch ends in the
//! same bits as training that duration from scratch.
//!
//! The engine writes the trunk stages and the `resume` edges from `branch = "cooldown"`;
//! this module holds what the stages check when they run: a trunk checkpoint may only be
//! continued by a stage that would have trained the same steps the same way.

use std::path::Path;

use serde_json::{Map, Value};

use super::checkpoint::{self, Checkpoint};
use crate::kind::{StageContext, StageError};

/// The params that say how long a run is: every other param shapes the steps before the
/// cooldown, these only where it ends.
pub const DURATION_PARAMS: [&str; 3] = ["steps", "tokens", "epochs"];

/// Params that only shape the cooldown or the run's bookkeeping (logs and scratch
/// checkpoints), so a trunk may be continued by stages that differ in them.
const FREE_PARAMS: [&str; 8] = [
    "steps",
    "tokens",
    "epochs",
    "cooldown",
    "final_lr_fraction",
    "log_every",
    "checkpoint_every",
    "activation_checkpointing",
];

/// The file a trunk's checkpoint artifact carries beside the checkpoint: what trained it.
pub const TRUNK_FILE: &str = "trunk.json";

/// The input artifacts whose contents shape the trajectory (by digest); `lr_from` is a
/// selection's choice, where the learning rate comes from.
const TRAJECTORY_INPUTS: [&str; 4] = ["model", "data", "heldout", "lr_from"];

/// What a run's steps before its cooldown depend on: the method, every param but the
/// [`FREE_PARAMS`], and the digests of the model, data and held-out rows. A trunk records
/// it; whatever continues the trunk must have the same.
pub fn fingerprint(ctx: &StageContext, lora: bool) -> Value {
    let mut params = Map::new();
    if let Value::Object(all) = ctx.params {
        for (k, v) in all {
            if !FREE_PARAMS.contains(&k.as_str()) {
                params.insert(k.clone(), v.clone());
            }
        }
    }
    let mut inputs = Map::new();
    for name in TRAJECTORY_INPUTS {
        if let Some(a) = ctx.artifact(name) {
            inputs.insert(name.to_string(), Value::String(a.digest.clone()));
        }
    }
    serde_json::json!({
        "method": if lora { "lora" } else { "full" },
        "params": params,
        "inputs": inputs,
    })
}

/// Checks that a run may share its pre-cooldown steps with others: the trapezoid schedule
/// with a warmup of whole steps (a fraction of the duration would differ per duration).
pub fn check_schedule(schedule: &str, warmup: f64) -> Result<(), String> {
    if schedule != "trapezoid" {
        return Err(format!(
            "cooldown branches need schedule = \"trapezoid\" (got \"{schedule}\"): only its steps before the cooldown are the same for every duration"
        ));
    }
    if warmup > 0.0 && warmup < 1.0 {
        return Err(format!(
            "cooldown branches need `warmup` as a step count (got the fraction {warmup}, which differs per duration)"
        ));
    }
    Ok(())
}

/// Writes the trunk record beside the checkpoint in a trunk's output.
pub fn write_trunk(out: &Path, fingerprint: &Value) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(fingerprint).expect("json serializes");
    std::fs::write(out.join(TRUNK_FILE), text)
        .map_err(|e| StageError::io(format!("writing {TRUNK_FILE}"), e))
}

/// Reads the `resume` input: its trunk record must match `own` (see [`fingerprint`]) and its
/// checkpoint must lie at or before `latest_step` (the stage's cooldown start), else the
/// result would not be the from-scratch run's. Errors name what differs.
pub fn read_resume(
    ctx: &StageContext,
    own: &Value,
    latest_step: u64,
) -> Result<Option<(Checkpoint, String)>, StageError> {
    let Some(input) = ctx.artifact("resume") else {
        return Ok(None);
    };
    let path = input.dir.join(TRUNK_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        StageError::Failed(format!(
            "resume: {} is not a trunk's checkpoint ({}: {e})",
            input.stage,
            path.display()
        ))
    })?;
    let theirs: Value = serde_json::from_str(&text)
        .map_err(|e| StageError::Failed(format!("resume: {}: {e}", path.display())))?;
    let differences = differences(&theirs, own);
    if !differences.is_empty() {
        return Err(StageError::Params(format!(
            "resume: {} was trained differently from this stage, so continuing it would not give this stage's run: {}",
            input.stage,
            differences.join("; ")
        )));
    }
    let ck = checkpoint::read_artifact(&input.dir)?;
    if ck.state.step > latest_step {
        return Err(StageError::Params(format!(
            "resume: {} stops at step {}, after this stage's cooldown starts (step {latest_step}): a trunk must end at or before the cooldown of what continues it",
            input.stage, ck.state.step
        )));
    }
    Ok(Some((ck, input.stage.clone())))
}

/// "lr: 0.001 in the trunk, 0.0003 here" for each leaf that differs.
fn differences(theirs: &Value, ours: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into("", theirs, ours, &mut out);
    out
}

fn diff_into(at: &str, theirs: &Value, ours: &Value, out: &mut Vec<String>) {
    match (theirs, ours) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                diff_into(
                    &path,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{at}: {a} in the trunk, {b} here")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_leaf() {
        let a = serde_json::json!({"method": "full", "params": {"lr": 0.001, "seed": 1}, "inputs": {"data": "x"}});
        let b = serde_json::json!({"method": "full", "params": {"lr": 0.0003, "seed": 1}, "inputs": {"data": "y"}});
        assert_eq!(
            differences(&a, &b),
            vec![
                "inputs.data: \"x\" in the trunk, \"y\" here",
                "params.lr: 0.001 in the trunk, 0.0003 here"
            ]
        );
        assert!(differences(&a, &a).is_empty());
    }

    #[test]
    fn only_trapezoid_with_whole_step_warmup_branches() {
        assert!(check_schedule("trapezoid", 10.0).is_ok());
        assert!(check_schedule("trapezoid", 0.0).is_ok());
        assert!(check_schedule("trapezoid", 0.1).is_err());
        assert!(check_schedule("cosine", 10.0).is_err());
    }
}
