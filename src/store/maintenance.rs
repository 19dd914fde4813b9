//! `flow gc` and `flow cache verify`.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::fsutil::{remove_dir_all_if_exists, remove_file_if_exists};
use super::hash::hash_file;
use super::lock::KeyLock;
use super::{Cache, Result, StoreError};

/// What `flow gc` removed (or would remove, in a dry run).
#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub records: usize,
    pub manifests: usize,
    pub objects: usize,
    pub views: usize,
    pub scratch: usize,
    pub logs: usize,
    pub tmp: usize,
    pub bytes: u64,
}

/// What `flow cache verify` found and evicted.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub bytes_checked: u64,
    /// Objects whose bytes do not match their name (removed).
    pub bad_objects: Vec<String>,
    /// Artifacts with a bad or missing manifest, object or view file (views removed).
    pub bad_artifacts: Vec<String>,
    /// Run records whose outputs were damaged (removed: those keys will run again).
    pub evicted_records: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_objects.is_empty()
            && self.bad_artifacts.is_empty()
            && self.evicted_records.is_empty()
    }
}

fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    for e in rd {
        out.push(e.map_err(|e| StoreError::io(dir, e))?);
    }
    out.sort_by_key(|e| e.file_name());
    Ok(out)
}

fn name(e: &fs::DirEntry) -> String {
    e.file_name().to_string_lossy().into_owned()
}

fn tree_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

impl Cache {
    /// Every (hash, path) of the object store.
    fn objects(&self) -> Result<Vec<(String, std::path::PathBuf)>> {
        let mut out = Vec::new();
        for shard in entries(&self.root().join("objects/blake3"))? {
            for obj in entries(&shard.path())? {
                let n = name(&obj);
                if !n.starts_with('.') {
                    out.push((format!("{}{}", name(&shard), n), obj.path()));
                }
            }
        }
        Ok(out)
    }

    /// Every (manifest digest, path); a stray file's name need not be a digest, so its path
    /// is the one listed, never one rebuilt from the name.
    fn manifest_digests(&self) -> Result<Vec<(String, std::path::PathBuf)>> {
        let mut out = Vec::new();
        for shard in entries(&self.root().join("artifacts"))? {
            for m in entries(&shard.path())? {
                if let Some(d) = name(&m).strip_suffix(".json")
                    && !d.starts_with('.')
                {
                    out.push((d.to_string(), m.path()));
                }
            }
        }
        Ok(out)
    }

    /// Deletes everything not reachable from `live_keys` (their records, manifests, objects
    /// and views), plus the scratch of keys not in `live_scratch`, and stale staging files.
    /// Keys being run right now (lock held) are never touched.
    pub fn gc(
        &self,
        live_keys: &BTreeSet<String>,
        live_scratch: &BTreeSet<String>,
        dry_run: bool,
    ) -> Result<GcReport> {
        let mut report = GcReport::default();
        let busy = |key: &str| KeyLock::is_held(self, key);
        let remove_file = |p: &Path, report_bytes: &mut u64| -> Result<()> {
            *report_bytes += fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            if dry_run {
                Ok(())
            } else {
                remove_file_if_exists(p)
            }
        };
        let remove_dir = |p: &Path, report_bytes: &mut u64| -> Result<()> {
            *report_bytes += tree_size(p);
            if dry_run {
                Ok(())
            } else {
                remove_dir_all_if_exists(p)
            }
        };

        let mut live_digests = HashSet::new();
        for key in self.record_keys()? {
            if live_keys.contains(&key) || busy(&key) {
                if let Some(r) = self.read_record(&key)? {
                    live_digests.extend(r.outputs.values().cloned());
                }
            } else {
                let mut ignored = 0;
                remove_file(&self.record_path(&key), &mut ignored)?;
                report.records += 1;
            }
        }
        let mut live_objects = HashSet::new();
        for (digest, path) in self.manifest_digests()? {
            if live_digests.contains(&digest) {
                if let Ok(Some(m)) = self.read_manifest(&digest) {
                    live_objects.extend(m.files.into_iter().map(|f| f.blake3));
                }
            } else {
                let mut ignored = 0;
                remove_file(&path, &mut ignored)?;
                report.manifests += 1;
            }
        }
        for (hash, path) in self.objects()? {
            if !live_objects.contains(&hash) {
                remove_file(&path, &mut report.bytes)?;
                report.objects += 1;
            }
        }
        for view in entries(&self.root().join("views"))? {
            if !live_digests.contains(&name(&view)) {
                let mut ignored = 0; // hard links to objects already counted
                remove_dir(&view.path(), &mut ignored)?;
                report.views += 1;
            }
        }
        for s in entries(&self.root().join("scratch"))? {
            let key = name(&s);
            if !live_scratch.contains(&key) && !busy(&key) {
                remove_dir(&s.path(), &mut report.bytes)?;
                report.scratch += 1;
            }
        }
        for log in entries(&self.root().join("logs"))? {
            // Only plain files are per-key logs. The directories are kept: `tb/` holds the
            // live TensorBoard runs by pipeline and stage name (what someone may be
            // watching, and a run by name outlives any one key; `rm -r logs/tb` clears it),
            // `slurm/` the job logs of a pipeline.
            if !log.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let n = name(&log);
            let key = n.trim_end_matches(".log");
            if !live_keys.contains(key) && !live_scratch.contains(key) && !busy(key) {
                remove_file(&log.path(), &mut report.bytes)?;
                report.logs += 1;
            }
        }
        for t in entries(&self.tmp_dir())? {
            let n = name(&t);
            let owner_alive = n
                .split(['.', '-'])
                .filter_map(|p| p.parse::<u32>().ok())
                .any(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let key = n.split('.').next().unwrap_or("");
            if !owner_alive && !busy(key) {
                remove_dir(&t.path(), &mut report.bytes)?;
                report.tmp += 1;
            }
        }
        Ok(report)
    }

    /// Re-hashes every object, manifest and view; evicts what is damaged and the run records
    /// that depended on it, so the next run recomputes them instead of using bad bytes.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut bad_objects = HashSet::new();
        for (hash, path) in self.objects()? {
            report.objects_checked += 1;
            report.bytes_checked += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if hash_file(&path)? != hash {
                remove_file_if_exists(&path)?;
                bad_objects.insert(hash.clone());
                report.bad_objects.push(hash);
            }
        }
        let mut bad_artifacts = HashSet::new();
        for (digest, path) in self.manifest_digests()? {
            let manifest = match self.read_manifest(&digest) {
                Ok(Some(m)) => m,
                _ => {
                    remove_file_if_exists(&path)?;
                    bad_artifacts.insert(digest);
                    continue;
                }
            };
            let view = self.view_path(&digest);
            let mut ok = true;
            for f in &manifest.files {
                let object = self.object_path(&f.blake3)?;
                if bad_objects.contains(&f.blake3) || !object.is_file() {
                    ok = false;
                    break;
                }
                // A view file is normally the object itself (same inode); anything else is
                // hashed on its own.
                let vf = view.join(&f.path);
                if view.is_dir() {
                    let same = match (fs::metadata(&vf), fs::metadata(&object)) {
                        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                        _ => false,
                    };
                    if !same && (!vf.is_file() || hash_file(&vf)? != f.blake3) {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                remove_dir_all_if_exists(&view)?;
                // Rewritten by the next ingest of the recomputed artifact.
                remove_file_if_exists(&path)?;
                bad_artifacts.insert(digest);
            }
        }
        for key in self.record_keys()? {
            let Some(r) = self.read_record(&key)? else {
                remove_file_if_exists(&self.record_path(&key))?;
                report.evicted_records.push(key);
                continue;
            };
            if r.outputs.values().any(|d| bad_artifacts.contains(d)) {
                self.remove_record(&key)?;
                report.evicted_records.push(key);
            }
        }
        report.bad_artifacts = bad_artifacts.into_iter().collect();
        report.bad_artifacts.sort();
        Ok(report)
    }
}
