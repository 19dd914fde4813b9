//! Which Slurm job was submitted for which stage of a pipeline: `slurm/<pipeline>.json` in the
//! submitting cache. `flow status` and `flow cancel` read it; the scheduler says the rest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{Cache, Result, fsutil};

/// The last job submitted for each stage.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub jobs: BTreeMap<String, JobEntry>,
}

/// One submitted job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEntry {
    pub job: String,
    /// The stage's recipe (see `slurm::recipes`): equal recipes mean equal work.
    pub recipe: String,
    /// The job's stdout and stderr.
    pub log: String,
    /// Unix seconds.
    pub submitted: u64,
}

impl Ledger {
    /// The pipeline's ledger; empty if it has none (or it is unreadable: it only informs).
    pub fn load(cache: &Cache, pipeline: &str) -> Ledger {
        std::fs::read(cache.slurm_ledger_path(pipeline))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, cache: &Cache, pipeline: &str) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("ledgers serialize");
        fsutil::write_atomic(&cache.slurm_ledger_path(pipeline), &bytes, true)
    }
}
