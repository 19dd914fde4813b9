//! Content hashes of files outside the cache (Files params), remembered by (size, mtime,
//! inode) so that an unchanged multi-GB input is not re-read on every `flow run`, as git's
//! index does.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::fsutil::write_atomic;
use super::hash::hash_file;
use super::{Cache, Result, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    blake3: String,
}

/// The stat-keyed hash index of external files, stored at `index/files.json`.
pub struct FileHashes {
    path: std::path::PathBuf,
    entries: Mutex<(BTreeMap<String, Entry>, bool)>,
}

/// Files modified this recently are hashed again next time: a write within the same mtime
/// tick as the hashing would otherwise go unnoticed.
const RACY_NS: i128 = 2_000_000_000;

impl FileHashes {
    pub fn load(cache: &Cache) -> FileHashes {
        let path = cache.root().join("index").join("files.json");
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileHashes {
            path,
            entries: Mutex::new((entries, false)),
        }
    }

    /// blake3 of the file's contents, from the index when its stat is unchanged.
    pub fn hash(&self, file: &Path) -> Result<String> {
        let meta = std::fs::metadata(file).map_err(|e| StoreError::io(file, e))?;
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        let key = file.display().to_string();
        let guard = self.entries.lock().expect("file hash index lock");
        if let Some(e) = guard.0.get(&key)
            && e.size == meta.len()
            && e.mtime_ns == mtime_ns
            && e.ino == meta.ino()
        {
            return Ok(e.blake3.clone());
        }
        drop(guard);
        let blake3 = hash_file(file)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now - mtime_ns > RACY_NS {
            let mut guard = self.entries.lock().expect("file hash index lock");
            guard.0.insert(
                key,
                Entry {
                    size: meta.len(),
                    mtime_ns,
                    ino: meta.ino(),
                    blake3: blake3.clone(),
                },
            );
            guard.1 = true;
        }
        Ok(blake3)
    }

    /// Writes the index back if anything was added.
    pub fn save(&self) -> Result<()> {
        let guard = self.entries.lock().expect("file hash index lock");
        if !guard.1 {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&guard.0).expect("maps serialize");
        write_atomic(&self.path, &bytes, false)
    }
}
