//! Run records: the proof that a key is done, written last.

use std::collections::BTreeMap;
use std::fs;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::fsutil::{remove_file_if_exists, write_atomic};
use super::{Cache, Result, StoreError};
use crate::key::KeyParts;

/// What a finished stage produced, and everything its key was made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: String,
    /// Checked when parsed, like `outputs`: both become paths in the cache.
    #[serde(deserialize_with = "super::checked::key")]
    pub key: String,
    pub parts: KeyParts,
    /// The pipeline and stage that first produced it (informational: keys are shared).
    pub pipeline: String,
    pub stage: String,
    /// Input param path -> producing stage names, for `explain`.
    pub input_stages: BTreeMap<String, Vec<String>>,
    /// Output name -> artifact digest.
    #[serde(deserialize_with = "super::checked::outputs")]
    pub outputs: BTreeMap<String, String>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Unix seconds when the run started, and how long it took.
    pub started_at: u64,
    pub duration_s: f64,
    pub flow_version: String,
}

pub const RECORD_FORMAT: &str = "flow-run-v1";

/// The fields of a [`RunRecord`] a run needs of a cached stage; serde skips the rest
/// unparsed.
#[derive(Deserialize)]
struct RecordHead {
    format: String,
    #[serde(deserialize_with = "super::checked::key")]
    key: String,
    #[serde(deserialize_with = "super::checked::outputs")]
    outputs: BTreeMap<String, String>,
}

/// What [`Cache::read_record_as`] checks a parsed record by.
trait Filed {
    fn key(&self) -> &str;
    fn format(&self) -> &str;
}

impl Filed for RunRecord {
    fn key(&self) -> &str {
        &self.key
    }
    fn format(&self) -> &str {
        &self.format
    }
}

impl Filed for RecordHead {
    fn key(&self) -> &str {
        &self.key
    }
    fn format(&self) -> &str {
        &self.format
    }
}

impl Cache {
    /// The record of a key, if the key is done. A record that cannot be parsed is treated as
    /// absent (and replaced by the next run), never trusted.
    /// A name that is not a key (one listed by a remote, say) has no record.
    pub fn read_record(&self, key: &str) -> Result<Option<RunRecord>> {
        self.read_record_as::<RunRecord>(key)
    }

    /// Only the outputs of a key's record, if the key is done: what a run needs of a cached
    /// stage. Parsing skips the key parts and metrics, which a no-op run of 100,000 stages
    /// would otherwise build and drop for nothing. Same acceptance rules as [`Self::read_record`].
    pub fn read_outputs(&self, key: &str) -> Result<Option<BTreeMap<String, String>>> {
        Ok(self.read_record_as::<RecordHead>(key)?.map(|r| r.outputs))
    }

    /// Reads `runs/<key>.json` as `T` (the whole record or its head), accepted only when it
    /// parses, is filed under its own key and has this build's record format.
    fn read_record_as<T: DeserializeOwned + Filed>(&self, key: &str) -> Result<Option<T>> {
        if !super::hash::is_digest(key) {
            return Ok(None);
        }
        let path = self.record_path(key);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice::<T>(&bytes)
                .ok()
                .filter(|r| r.key() == key && r.format() == RECORD_FORMAT)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// Commits a key: atomically and durably. Call only after every output is ingested.
    /// A record whose key is not a digest is refused: the key names the file.
    pub fn write_record(&self, record: &RunRecord) -> Result<()> {
        if !super::hash::is_digest(&record.key) {
            return Err(StoreError::invalid(
                &self.root().join("runs"),
                format!("record key `{}` is not a flow key", record.key),
            ));
        }
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        write_atomic(&self.record_path(&record.key), &bytes, true)
    }

    /// Forgets that a key is done (its outputs were found damaged).
    pub fn remove_record(&self, key: &str) -> Result<()> {
        remove_file_if_exists(&self.record_path(key))
    }

    /// Every key with a record.
    pub fn record_keys(&self) -> Result<Vec<String>> {
        let dir = self.root().join("runs");
        let mut keys = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".json")
                && !key.starts_with('.')
            {
                keys.push(key.to_string());
            }
        }
        keys.sort();
        Ok(keys)
    }
}
