//! Hyperparameters a training stage takes from another stage's output instead of its own
//! table: the learning rate a `select` stage chose (`lr_from`), so that a sweep's best LR
//! feeds the runs after it without being copied by hand.

use serde_json::Value;

use crate::kind::{StageContext, StageError};
use crate::select::CHOICE_FILE;

/// The peak learning rate: `lr` as given, or the `lr` of the candidate that the `lr_from`
/// choice names. Exactly one of the two must be given.
pub fn learning_rate(ctx: &StageContext, lr: Option<f64>) -> Result<f64, StageError> {
    match (lr, ctx.artifact("lr_from")) {
        (Some(lr), None) => Ok(lr),
        (Some(_), Some(from)) => Err(StageError::Params(format!(
            "give `lr` or `lr_from`, not both (`lr_from` is `{}`)",
            from.stage
        ))),
        (None, None) => Err(StageError::Params(
            "give `lr` (the peak learning rate) or `lr_from` (a `select` stage whose chosen candidate is a training curve)".into(),
        )),
        (None, Some(from)) => {
            let path = from.dir.join(CHOICE_FILE);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                StageError::Failed(format!(
                    "`lr_from` = `{}` has no readable {CHOICE_FILE} ({e}): it must be a `select` stage",
                    from.stage
                ))
            })?;
            let choice: Value = serde_json::from_str(&text).map_err(|e| {
                StageError::Failed(format!("`lr_from` = `{}`: {CHOICE_FILE}: {e}", from.stage))
            })?;
            let chosen = &choice["chosen"];
            match chosen["lr"].as_f64() {
                Some(lr) if lr.is_finite() && lr > 0.0 => Ok(lr),
                _ => Err(StageError::Failed(format!(
                    "`lr_from` = `{}`: its chosen candidate `{}` has no learning rate (select among training stages' `curve` outputs, whose summary.json has `lr`)",
                    from.stage,
                    chosen["stage"].as_str().unwrap_or("?")
                ))),
            }
        }
    }
}
