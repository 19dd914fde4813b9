//! Artifacts: a directory of files stored as content-addressed blobs plus a manifest whose
//! blake3 is the artifact's digest.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsutil::{remove_dir_all_if_exists, remove_file_if_exists, unique_suffix, write_atomic};
use super::hash::hash_file;
use super::{Cache, Result, StoreError};

const MANIFEST_FORMAT: &str = "flow-artifact-v1";

/// The list of an artifact's files, sorted by path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub files: Vec<ManifestEntry>,
}

/// One file of an artifact. Both names are checked when a manifest is parsed (see
/// `checked`): a manifest read from disk or a remote can never name a file outside its view.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    /// Relative, `/`-separated, normalized.
    #[serde(deserialize_with = "super::checked::rel_path")]
    pub path: String,
    pub size: u64,
    #[serde(deserialize_with = "super::checked::blake3")]
    pub blake3: String,
}

impl Manifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A file of an artifact whose bytes no longer match the manifest.
#[derive(Debug, Clone)]
pub struct BadFile {
    pub path: String,
    pub expected: String,
    /// None when the file is missing.
    pub found: Option<String>,
}

impl Cache {
    /// Moves a finished output directory into the cache and returns its digest. The
    /// directory's files become the objects (hard links, no copy) and the directory itself
    /// becomes the artifact's view.
    pub fn ingest(&self, dir: &Path) -> Result<String> {
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(dir).sort_by_file_name().min_depth(1) {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(dir).to_path_buf();
                StoreError::io(&path, e.into())
            })?;
            let ft = entry.file_type();
            if ft.is_dir() {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(dir)
                .expect("walkdir yields children")
                .to_string_lossy()
                .replace('\\', "/");
            if !ft.is_file() {
                return Err(StoreError::invalid(
                    entry.path(),
                    format!(
                        "output `{rel}` is a symlink or special file; outputs must be regular files"
                    ),
                ));
            }
            let path = entry.path();
            let hash = hash_file(path)?;
            let size = entry
                .metadata()
                .map_err(|e| StoreError::io(path, e.into()))?
                .len();
            self.adopt_object(path, &hash)?;
            files.push(ManifestEntry {
                path: rel,
                size,
                blake3: hash,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            files,
        };
        let bytes = serde_json::to_vec(&manifest).expect("manifests serialize");
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let mpath = self.manifest_path(&digest)?;
        if !mpath.exists() {
            write_atomic(&mpath, &bytes, true)?;
        }
        let view = self.view_path(&digest);
        if view.is_dir() && !self.check_artifact(&digest)?.is_empty() {
            // An earlier copy of the same artifact was damaged: these fresh files replace it.
            remove_dir_all_if_exists(&view)?;
        }
        if !view.is_dir() && fs::rename(dir, &view).is_ok() {
            return Ok(digest);
        }
        // The same artifact is already in place, intact (made by another key or process).
        remove_dir_all_if_exists(dir)?;
        Ok(digest)
    }

    /// Makes the file at `path` (already hashed) the object for `hash`, or, if that object
    /// exists, replaces the file by a link to it, so identical outputs share storage.
    fn adopt_object(&self, path: &Path, hash: &str) -> Result<()> {
        let object = self.object_path(hash)?;
        let parent = object.parent().expect("objects have a parent");
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o444))
            .map_err(|e| StoreError::io(path, e))?;
        if object.exists() {
            // Share the stored copy only if it is still intact; a damaged one is replaced
            // by these fresh bytes instead of spreading into a new artifact.
            let (from, to) = if hash_file(&object)? == hash {
                (object.as_path(), path)
            } else {
                (path, object.as_path())
            };
            let tmp = to.with_file_name(format!(".relink-{}", unique_suffix()));
            fs::hard_link(from, &tmp).map_err(|e| StoreError::io(from, e))?;
            fs::rename(&tmp, to).map_err(|e| StoreError::io(to, e))?;
            return Ok(());
        }
        fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io(path, e))?;
        match fs::hard_link(path, &object) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::io(&object, e)),
        }
    }

    /// Stores a manifest fetched from elsewhere (the caller checked its digest).
    pub fn put_manifest(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.manifest_path(digest)?;
        if path.exists() {
            return Ok(());
        }
        write_atomic(&path, bytes, true)
    }

    /// Moves a verified download (a temp file under `tmp/`) into the object store.
    pub fn adopt_download(&self, tmp: &Path, hash: &str) -> Result<()> {
        let object = self.object_path(hash)?;
        let parent = object.parent().expect("objects have a parent");
        fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))
            .map_err(|e| StoreError::io(tmp, e))?;
        fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io(tmp, e))?;
        fs::rename(tmp, &object).map_err(|e| StoreError::io(&object, e))
    }

    /// Reads and checks a manifest (its bytes must hash to its name).
    pub fn read_manifest(&self, digest: &str) -> Result<Option<Manifest>> {
        let path = self.manifest_path(digest)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        if blake3::hash(&bytes).to_hex().as_str() != digest {
            return Err(StoreError::invalid(
                &path,
                "manifest does not match its digest",
            ));
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::invalid(&path, format!("unreadable manifest: {e}")))
    }

    /// Re-hashes an artifact's view against its manifest. Returns the files that differ
    /// (empty when the artifact is intact); a missing manifest counts as one bad file.
    pub fn check_artifact(&self, digest: &str) -> Result<Vec<BadFile>> {
        let manifest = match self.read_manifest(digest) {
            Ok(Some(m)) => m,
            Ok(None) | Err(StoreError::Invalid { .. }) => {
                return Ok(vec![BadFile {
                    path: "(manifest)".into(),
                    expected: digest.into(),
                    found: None,
                }]);
            }
            Err(e) => return Err(e),
        };
        let view = self.view_path(digest);
        let mut bad = Vec::new();
        for f in &manifest.files {
            let path = view.join(&f.path);
            let found = if path.is_file() {
                Some(hash_file(&path)?)
            } else {
                None
            };
            if found.as_deref() != Some(f.blake3.as_str()) {
                bad.push(BadFile {
                    path: f.path.clone(),
                    expected: f.blake3.clone(),
                    found,
                });
            }
        }
        Ok(bad)
    }

    /// Drops a damaged artifact: its view, and every object among `bad` whose bytes no longer
    /// match its name. What produced it must then run again.
    pub fn evict_artifact(&self, digest: &str, bad: &[BadFile]) -> Result<()> {
        for f in bad {
            let object = self.object_path(&f.expected)?;
            if object.exists() && hash_file(&object)? != f.expected {
                remove_file_if_exists(&object)?;
            }
        }
        remove_dir_all_if_exists(&self.view_path(digest))
    }

    /// Builds the view of an artifact from its manifest and objects, verifying every object
    /// on the way. Ok(false) when something is missing or damaged (the artifact must be
    /// recomputed); damaged objects are removed.
    pub fn materialize(&self, digest: &str) -> Result<bool> {
        if self.view_path(digest).is_dir() {
            return Ok(true);
        }
        let Ok(Some(manifest)) = self.read_manifest(digest) else {
            return Ok(false);
        };
        let staging = self.tmp_dir().join(format!("view-{}", unique_suffix()));
        let result = self.link_view(&manifest, &staging);
        match result {
            Ok(true) => {
                if fs::rename(&staging, self.view_path(digest)).is_err() {
                    remove_dir_all_if_exists(&staging)?;
                }
                Ok(self.view_path(digest).is_dir())
            }
            other => {
                remove_dir_all_if_exists(&staging)?;
                other
            }
        }
    }

    fn link_view(&self, manifest: &Manifest, staging: &Path) -> Result<bool> {
        for f in &manifest.files {
            let object = self.object_path(&f.blake3)?;
            if !object.is_file() {
                return Ok(false);
            }
            if hash_file(&object)? != f.blake3 {
                remove_file_if_exists(&object)?;
                return Ok(false);
            }
            let dest: PathBuf = staging.join(&f.path);
            let parent = dest.parent().expect("joined path has a parent");
            fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
            fs::hard_link(&object, &dest).map_err(|e| StoreError::io(&dest, e))?;
        }
        fs::create_dir_all(staging).map_err(|e| StoreError::io(staging, e))?;
        Ok(true)
    }
}
