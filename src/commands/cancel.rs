//! `flow cancel`: cancel the pipeline's queued and running Slurm jobs.

use std::process::ExitCode;

use flow::slurm;
use serde_json::json;

use super::{CmdResult, Context};
use crate::PipelineArgs;

impl Context {
    pub fn cancel(&self, p: &PipelineArgs, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let ids = slurm::cancel(&pipeline, &cache)?;
        if json {
            println!("{}", json!({"event": "cancelled", "jobs": ids}));
        } else if ids.is_empty() {
            println!("no queued or running jobs of {}", pipeline.name);
        } else {
            println!("cancelled {} job(s): {}", ids.len(), ids.join(" "));
        }
        Ok(ExitCode::SUCCESS)
    }
}
