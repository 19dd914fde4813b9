//! Keys of a pipeline's stages as far as the cache knows them.
//!
//! A key depends on the digests of its inputs, which exist only once the producing stages
//! are done; so keys are resolved in topological order, and a stage downstream of a missing
//! one has no key yet.

use std::collections::BTreeMap;

use crate::key::{KEY_FORMAT, KeyParts};
use crate::pipeline::{Pipeline, Stage};
use crate::store::{Cache, Result, RunRecord};

/// What the cache knows of one stage.
#[derive(Debug, Clone)]
pub enum KeyState {
    /// Inputs are known, so the key is; `record` is Some when it is done.
    Known {
        parts: KeyParts,
        key: String,
        record: Option<Box<RunRecord>>,
    },
    /// Waits for this upstream stage (index) to run first.
    Waiting { on: usize },
}

impl KeyState {
    pub fn key(&self) -> Option<&str> {
        match self {
            KeyState::Known { key, .. } => Some(key),
            KeyState::Waiting { .. } => None,
        }
    }

    pub fn record(&self) -> Option<&RunRecord> {
        match self {
            KeyState::Known { record, .. } => record.as_deref(),
            KeyState::Waiting { .. } => None,
        }
    }
}

/// The key parts of a stage, given its producers' output digests; Err(i) names the first
/// producer whose outputs are not known yet.
pub fn key_parts(
    pipeline: &Pipeline,
    stage: &Stage,
    outputs: &dyn Fn(usize) -> Option<BTreeMap<String, String>>,
) -> std::result::Result<KeyParts, usize> {
    let mut inputs = BTreeMap::new();
    for binding in &stage.inputs {
        let mut digests = Vec::new();
        for src in &binding.sources {
            let outs = outputs(src.stage).ok_or(src.stage)?;
            let digest = outs.get(&src.output).ok_or(src.stage)?;
            // The producer's name is part of the input: stages see it (list inputs are
            // directories named after their members; reports label curves with it).
            digests.push(format!("{digest}@{}", pipeline.stages[src.stage].name));
        }
        inputs.insert(binding.path.clone(), digests);
    }
    Ok(KeyParts {
        format: KEY_FORMAT.to_string(),
        kind: stage.kind.name.to_string(),
        kind_version: stage.kind.version,
        params: stage
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.canonical()))
            .collect(),
        inputs,
        salt: pipeline.salt.clone(),
    })
}

/// Resolves every stage's key against the cache, without running or changing anything.
pub fn resolve(pipeline: &Pipeline, cache: &Cache) -> Result<Vec<KeyState>> {
    let mut states: Vec<KeyState> = Vec::with_capacity(pipeline.stages.len());
    for stage in &pipeline.stages {
        let lookup = |i: usize| states[i].record().map(|r| r.outputs.clone());
        let state = match key_parts(pipeline, stage, &lookup) {
            Ok(parts) => {
                let key = parts.key();
                let record = cache.done(&key)?.map(Box::new);
                KeyState::Known { parts, key, record }
            }
            Err(on) => KeyState::Waiting { on },
        };
        states.push(state);
    }
    Ok(states)
}
