//! The local cache: content-addressed blobs, artifact manifests, materialized views, run
//! records, per-key scratch directories, logs and locks.
//!
//! ```text
//! objects/blake3/ab/cdef...    file contents, named by their blake3, read-only
//! artifacts/ab/<digest>.json   manifests: sorted (path, size, blake3); digest = blake3(manifest)
//! views/<digest>/              the artifact as a directory of hard links to the objects
//! runs/<key>.json              run records, written last: a key is done iff its record exists
//! scratch/<key>/               checkpoints of unfinished runs; removed after the record
//! logs/<key>.log               one log per key, appended by each attempt
//! logs/tb/<pipeline>/<stage>/  live TensorBoard event files, by name (kept by `flow gc`)
//! locks/<key>.lock             flock(2) per key: one writer per key across processes
//! index/<pipeline>.json        the last key of each stage, so `plan` can say what changed
//! tmp/                         staging; anything here is garbage once its lock is free
//! ```
//! Every write goes to `tmp/` or a temp name first and is renamed into place, so a process
//! killed at any instant leaves either the old state or the new one.

mod artifact;
pub(crate) mod checked;
mod filehash;
pub mod fsutil;
pub mod hash;
mod lock;
mod maintenance;
mod record;

use std::path::{Path, PathBuf};

pub use artifact::{Manifest, ManifestEntry};
pub use filehash::FileHashes;
pub use lock::KeyLock;
pub use maintenance::{GcReport, VerifyReport};
pub use record::{RECORD_FORMAT, RunRecord};

/// Why a cache operation failed; always names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A cache root and the paths inside it.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) a cache at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        for sub in [
            "objects/blake3",
            "artifacts",
            "views",
            "runs",
            "scratch",
            "logs",
            "locks",
            "index",
            "tmp",
        ] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| StoreError::io(&p, e))?;
        }
        let root = root.canonicalize().map_err(|e| StoreError::io(root, e))?;
        Ok(Cache { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `hash` is stored. Err unless `hash` is a blake3 digest: the name is
    /// sliced into a path, and anything else could panic or point outside the cache.
    pub fn object_path(&self, hash: &str) -> Result<PathBuf> {
        let objects = self.root.join("objects/blake3");
        let hash = checked::digest_in(&objects, hash)?;
        Ok(objects.join(&hash[..2]).join(&hash[2..]))
    }

    /// Where the manifest of artifact `digest` is stored; Err unless `digest` is a digest.
    pub fn manifest_path(&self, digest: &str) -> Result<PathBuf> {
        let artifacts = self.root.join("artifacts");
        let digest = checked::digest_in(&artifacts, digest)?;
        Ok(artifacts.join(&digest[..2]).join(format!("{digest}.json")))
    }

    /// The directory holding an artifact's files (exists once materialized).
    pub fn view_path(&self, digest: &str) -> PathBuf {
        self.root.join("views").join(digest)
    }

    pub fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("runs").join(format!("{key}.json"))
    }

    pub fn scratch_path(&self, key: &str) -> PathBuf {
        self.root.join("scratch").join(key)
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{key}.log"))
    }

    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    pub fn index_path(&self, pipeline: &str) -> PathBuf {
        self.root
            .join("index")
            .join(format!("{}.json", safe_name(pipeline)))
    }

    /// The Slurm jobs submitted for a pipeline (see `slurm::ledger`).
    pub fn slurm_ledger_path(&self, pipeline: &str) -> PathBuf {
        self.root
            .join("slurm")
            .join(format!("{}.json", safe_name(pipeline)))
    }

    /// Where a pipeline's Slurm job logs go (on the shared filesystem the jobs see).
    pub fn slurm_log_dir(&self, pipeline: &str) -> PathBuf {
        self.root
            .join("logs")
            .join("slurm")
            .join(safe_name(pipeline))
    }

    /// Where a stage's live logs go (TensorBoard event files while it trains), so that
    /// `tensorboard --logdir <cache>/logs/tb` names each run `<pipeline>/<stage>`. By name,
    /// not key: a rerun or a resume of the stage adds to the same run directory. Sweep
    /// members keep their names (`lora[rank=16]`: brackets, `=` and `,` are fine in Linux
    /// file names); only what would change the path's shape is replaced (see [`dir_name`]).
    pub fn live_log_dir(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.root
            .join("logs")
            .join("tb")
            .join(dir_name(pipeline))
            .join(dir_name(stage))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Whether a key is done: its run record exists and its output views are in place.
    /// Cheap (a few stats and one small read): this is what a fully cached run does per stage.
    pub fn done(&self, key: &str) -> Result<Option<RunRecord>> {
        let Some(record) = self.read_record(key)? else {
            return Ok(None);
        };
        let complete = record
            .outputs
            .values()
            .all(|digest| self.view_path(digest).is_dir());
        Ok(complete.then_some(record))
    }

    /// The last key each stage of a pipeline had, as written by its last run.
    pub fn read_index(&self, pipeline: &str) -> std::collections::BTreeMap<String, String> {
        std::fs::read(self.index_path(pipeline))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records the current key of each stage (best effort: only `plan`'s hints depend on it).
    pub fn write_index(
        &self,
        pipeline: &str,
        keys: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let mut index = self.read_index(pipeline);
        index.extend(keys.iter().map(|(k, v)| (k.clone(), v.clone())));
        let bytes = serde_json::to_vec_pretty(&index).expect("maps serialize");
        fsutil::write_atomic(&self.index_path(pipeline), &bytes, false)
    }
}

/// A pipeline or stage name as a file name: anything but `[A-Za-z0-9_-]` becomes `_` (a
/// sweep value with `/` must not make a path, nor `%` a Slurm filename pattern).
pub fn safe_name(pipeline: &str) -> String {
    pipeline
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A name as one path component that still reads as the name: `/`, `\`, NUL and other
/// control characters become `_`, a name that is empty or all dots (`.`, `..`, which would
/// point elsewhere) gets a `_` in front, and one longer than 200 bytes (file names stop at
/// 255) is cut there and ends in `~` and 16 hex digits of its blake3, so it stays distinct.
/// Unlike [`safe_name`] it keeps `[`, `]`, `=`, `,` and spaces: `lora[rank=16]` stays
/// `lora[rank=16]`.
pub fn dir_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if out.chars().all(|c| c == '.') {
        out.insert(0, '_');
    }
    if out.len() > 200 {
        let mut cut = 183;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let hash = blake3::hash(name.as_bytes()).to_hex();
        out.truncate(cut);
        out.push('~');
        out.push_str(&hash[..16]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::dir_name;

    #[test]
    fn dir_names_keep_sweep_names_and_stay_one_component() {
        assert_eq!(dir_name("lora[rank=16,lr=0.001]"), "lora[rank=16,lr=0.001]");
        assert_eq!(dir_name("math cpt"), "math cpt");
        assert_eq!(dir_name("a/b\\c\0d\ne"), "a_b_c_d_e");
        assert_eq!(dir_name(""), "_");
        assert_eq!(dir_name(".."), "_..");
        assert_eq!(dir_name("..a"), "..a");
        let long = format!("lora[targets={}]", "é".repeat(300));
        let (a, b) = (dir_name(&long), dir_name(&format!("{long}x")));
        assert!(a.len() <= 200 && a.starts_with("lora[targets=é"), "{a}");
        assert_ne!(a, b, "cut names stay distinct");
    }
}
