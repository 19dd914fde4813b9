//! Keys of a pipeline's stages as far as the cache knows them.
//!
//! A key depends on the digests of its inputs, which exist only once the producing stages
//! are done; so keys are resolved in topological order, and a stage downstream of a missing
//! one has no key yet.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::key::{KEY_FORMAT, KeyParts, Val};
use crate::pipeline::{Pipeline, Stage};
use crate::store::{Cache, FileHashes, Result, RunRecord};

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

/// How many keys this process has computed ([`key_parts`] calls that found every input):
/// reported in `--json` summaries so that tests can hold the engine to one computation per
/// stage and run, whatever the pipeline's size.
static KEYS_COMPUTED: AtomicUsize = AtomicUsize::new(0);

/// The number of keys computed so far by this process.
pub fn keys_computed() -> usize {
    KEYS_COMPUTED.load(Ordering::Relaxed)
}

/// The key parts of a stage, given its producers' output digests (`output(stage, name)`);
/// Ok(Err(i)) names the first producer whose outputs are not known yet.
pub fn key_parts(
    pipeline: &Pipeline,
    stage: &Stage,
    output: &dyn Fn(usize, &str) -> Option<String>,
    files: &FileHashes,
) -> Result<std::result::Result<KeyParts, usize>> {
    let mut inputs = BTreeMap::new();
    for binding in &stage.inputs {
        let mut digests = Vec::new();
        for src in &binding.sources {
            let Some(digest) = output(src.stage, &src.output) else {
                return Ok(Err(src.stage));
            };
            // The producer's name is part of the input: stages see it (list inputs are
            // directories named after their members; reports label curves with it).
            digests.push(format!("{digest}@{}", pipeline.stages[src.stage].name));
        }
        inputs.insert(binding.path.clone(), digests);
    }
    let mut params = BTreeMap::new();
    // Params that change how a stage runs, not what it makes, stay out of its key.
    let keyed = stage
        .params
        .iter()
        .filter(|(name, _)| !stage.kind.unkeyed.contains(&name.as_str()));
    for (name, value) in keyed {
        let text = match value {
            // External files enter the key by content, URLs as written.
            Val::Files(refs) => {
                let mut parts = Vec::new();
                for f in refs {
                    let shown = serde_json::to_string(&f.shown).expect("strings serialize");
                    match (&f.local, &f.version) {
                        (Some(path), _) => parts.push(format!("{shown}={}", files.hash(path)?)),
                        (None, Some(version)) => parts.push(format!("{shown}#{version}")),
                        (None, None) => parts.push(shown),
                    }
                }
                format!("@files[{}]", parts.join(","))
            }
            other => other.canonical(),
        };
        params.insert(name.clone(), text);
    }
    KEYS_COMPUTED.fetch_add(1, Ordering::Relaxed);
    Ok(Ok(KeyParts {
        format: KEY_FORMAT.to_string(),
        kind: stage.kind.name.to_string(),
        kind_version: stage.kind.version,
        params,
        inputs,
        salt: pipeline.salt.clone(),
    }))
}

/// Resolves every stage's key against the cache, without running or changing anything.
pub fn resolve(pipeline: &Pipeline, cache: &Cache) -> Result<Vec<KeyState>> {
    resolve_with(pipeline, cache, |_, _| Ok(None))
}

/// Like [`resolve`], asking `fallback` (a remote cache, say) for keys the local cache has not
/// done; what it returns counts as done, so downstream keys resolve through it.
pub fn resolve_with<E: From<crate::store::StoreError>>(
    pipeline: &Pipeline,
    cache: &Cache,
    mut fallback: impl FnMut(&Stage, &str) -> std::result::Result<Option<RunRecord>, E>,
) -> std::result::Result<Vec<KeyState>, E> {
    let mut states: Vec<KeyState> = Vec::with_capacity(pipeline.stages.len());
    let files = FileHashes::load(cache);
    for stage in &pipeline.stages {
        let lookup = |i: usize, name: &str| {
            states[i]
                .record()
                .and_then(|r| r.outputs.get(name).cloned())
        };
        let state = match key_parts(pipeline, stage, &lookup, &files)? {
            Ok(parts) => {
                let key = parts.key();
                let record = match cache.done(&key)? {
                    Some(r) => Some(r),
                    None => fallback(stage, &key)?,
                }
                // A record without every output of its kind does not make the key done:
                // downstream keys could not be computed from it.
                .filter(|r| super::has_every_output(&r.outputs, stage.kind));
                KeyState::Known {
                    parts,
                    key,
                    record: record.map(Box::new),
                }
            }
            Err(on) => KeyState::Waiting { on },
        };
        states.push(state);
    }
    files.save()?;
    Ok(states)
}
