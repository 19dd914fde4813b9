//! Remote cache maintenance: `gc` (delete what no kept pipeline references) and `verify`
//! (find damaged and missing objects, and evict the run records that need them).
//!
//! Both run while other machines push. A push uploads blobs, then manifests, then the
//! record that references them, so until its record lands a push's objects look
//! unreferenced. `gc` therefore deletes only objects older than a grace period (as git's
//! `gc.pruneExpire` spares young loose objects), and a push uploads again ("freshens") an
//! old object it reuses, which `gc` checks once more right before deleting it. `verify`
//! looks again at an object it found missing before it calls it missing: it may have
//! arrived after the listing.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use crate::store::Manifest;
use crate::store::hash::is_digest;

use super::{Listed, Remote, RemoteError, Result, manifest_digest};

/// What `verify` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub objects_checked: u64,
    /// Blobs whose bytes do not match their name (deleted).
    pub bad_objects: Vec<String>,
    /// Blobs a manifest names that the remote lacks.
    pub missing_objects: Vec<String>,
    /// Manifests whose bytes do not match their name, or unreadable (deleted).
    pub bad_manifests: Vec<String>,
    /// Manifests a run record names that the remote lacks.
    pub missing_manifests: Vec<String>,
    /// Run records deleted because something they need is damaged or missing (a run
    /// recomputes them, or `flow push` repairs them from a machine that has the data).
    pub evicted_records: Vec<String>,
}

impl VerifyReport {
    /// Whether the remote was whole.
    pub fn is_clean(&self) -> bool {
        self.bad_objects.is_empty()
            && self.missing_objects.is_empty()
            && self.bad_manifests.is_empty()
            && self.missing_manifests.is_empty()
            && self.evicted_records.is_empty()
    }
}

impl Remote {
    /// Deletes every object no live key references and older than `grace_seconds`.
    /// Returns (objects, bytes) removed (or that would be, with `dry_run`).
    pub fn gc(
        &self,
        live_keys: &BTreeSet<String>,
        grace_seconds: u64,
        dry_run: bool,
    ) -> Result<(u64, u64)> {
        let young = |o: &Listed| o.age < grace_seconds;
        let mut doomed: Vec<(String, u64)> = Vec::new();
        let mut live_digests = HashSet::new();
        for o in self.list_aged("runs")? {
            let key = o.rel.trim_end_matches(".json");
            if live_keys.contains(key) || young(&o) {
                // A record flow refuses references nothing.
                if let Ok(Some(r)) = self.record(key) {
                    live_digests.extend(r.outputs.into_values());
                }
            } else {
                doomed.push((format!("runs/{}", o.rel), o.size));
            }
        }
        let mut live_blobs = HashSet::new();
        for o in self.list_aged("artifacts")? {
            let digest = manifest_digest(&o.rel);
            if live_digests.contains(&digest) || young(&o) {
                if let Some(bytes) = self.get_bytes(&format!("artifacts/{}", o.rel))?
                    && let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
                {
                    live_blobs.extend(m.files.into_iter().map(|f| f.blake3));
                }
            } else {
                doomed.push((format!("artifacts/{}", o.rel), o.size));
            }
        }
        for o in self.list_aged("scratch")? {
            let key = o.rel.split('/').next().unwrap_or("");
            if live_keys.contains(key) || young(&o) {
                if let Some(key) = o.rel.strip_suffix("/index.json")
                    && let Ok(index) = self.scratch_index(key)
                {
                    live_blobs.extend(index.into_values());
                }
            } else {
                doomed.push((format!("scratch/{}", o.rel), o.size));
            }
        }
        for o in self.list_aged("objects/blake3")? {
            if !young(&o) && !live_blobs.contains(&o.rel.replace('/', "")) {
                doomed.push((format!("objects/blake3/{}", o.rel), o.size));
            }
        }
        let mut removed = (0, 0);
        for (rel, size) in doomed {
            if !dry_run {
                // Freshened by a push since the listing: it is in use again.
                let age = self.runtime.block_on(self.head_async(&rel))?;
                if age.is_none_or(|m| super::age_seconds(m) < grace_seconds) {
                    continue;
                }
                self.delete(&rel)?;
            }
            removed.0 += 1;
            removed.1 += size;
        }
        Ok(removed)
    }

    /// Re-hashes every remote blob and checks every manifest and record; deletes damaged
    /// blobs and manifests, manifests whose blobs are missing, and the run records that
    /// need any of them, so the next run recomputes (or `flow push` repairs) instead of
    /// pulling bad or missing bytes.
    pub fn verify(&self, scratch: &Path) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut present = HashSet::new();
        let mut bad = HashSet::new();
        let tmp = scratch.join(format!("verify-{}", std::process::id()));
        for (rel, _) in self.list("objects/blake3")? {
            let hash = rel.replace('/', "");
            let object = format!("objects/blake3/{rel}");
            if let Some((found, _)) = self.get_to_file(&object, &tmp)? {
                report.objects_checked += 1;
                if found == hash {
                    present.insert(hash);
                } else {
                    self.delete(&object)?;
                    bad.insert(hash);
                }
            }
            let _ = std::fs::remove_file(&tmp);
        }
        let (mut whole, mut broken) = (HashSet::new(), HashSet::new());
        let mut missing_objects = BTreeSet::new();
        for (rel, _) in self.list("artifacts")? {
            let digest = manifest_digest(&rel);
            let object = format!("artifacts/{rel}");
            let manifest = self.get_bytes(&object)?.and_then(|bytes| {
                (blake3::hash(&bytes).to_hex().as_str() == digest)
                    .then(|| serde_json::from_slice::<Manifest>(&bytes).ok())
                    .flatten()
            });
            let Some(manifest) = manifest else {
                self.delete(&object)?;
                broken.insert(digest.clone());
                report.bad_manifests.push(digest);
                continue;
            };
            let mut complete = true;
            for f in &manifest.files {
                if bad.contains(&f.blake3) {
                    complete = false;
                } else if !present.contains(&f.blake3) {
                    // Listed before it arrived (a push in flight)?
                    if self.exists(&Self::object_rel(&f.blake3))? {
                        present.insert(f.blake3.clone());
                    } else {
                        missing_objects.insert(f.blake3.clone());
                        complete = false;
                    }
                }
            }
            if complete {
                whole.insert(digest);
            } else {
                self.delete(&object)?;
                broken.insert(digest);
            }
        }
        report.missing_objects = missing_objects.into_iter().collect();
        let mut missing_manifests = BTreeSet::new();
        for (rel, _) in self.list("runs")? {
            if !is_record_name(&rel) {
                continue; // not flow's
            }
            let key = rel.trim_end_matches(".json").to_string();
            let damaged = match self.record(&key) {
                Ok(Some(r)) => {
                    let mut damaged = false;
                    for digest in r.outputs.values() {
                        if whole.contains(digest) {
                            continue;
                        }
                        if broken.contains(digest) {
                            damaged = true;
                        } else if !self.exists(&Self::manifest_rel(digest))? {
                            missing_manifests.insert(digest.clone());
                            damaged = true;
                        }
                        // Otherwise it arrived after the scan (a push in flight): the
                        // next verify judges it.
                    }
                    damaged
                }
                Ok(None) => false,
                Err(RemoteError::Invalid { .. }) => true,
                Err(e) => return Err(e),
            };
            if damaged {
                self.delete(&format!("runs/{rel}"))?;
                report.evicted_records.push(key);
            }
        }
        report.missing_manifests = missing_manifests.into_iter().collect();
        report.bad_objects = bad.into_iter().collect();
        report.bad_objects.sort();
        Ok(report)
    }
}

/// Whether a listed run record's name is a key (anything else is not flow's).
pub(super) fn is_record_name(rel: &str) -> bool {
    rel.strip_suffix(".json").is_some_and(is_digest)
}
