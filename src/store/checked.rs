//! Field checks applied while manifests and run records are parsed, wherever they come from
//! (the local cache, a remote one): a digest or key is exactly 64 lowercase hex digits and a
//! manifest path stays inside its artifact. Checking at parse time means no code holding a
//! [`super::Manifest`] or [`super::RunRecord`] can be handed a name that escapes the cache.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, Error};

use super::hash::is_digest;

/// Why `s` is refused as a digest.
fn not_a_digest(s: &str) -> String {
    format!("`{s}` is not a blake3 digest (64 lowercase hex digits)")
}

fn digest_or<E: Error>(field: &str, s: String) -> Result<String, E> {
    if is_digest(&s) {
        Ok(s)
    } else {
        Err(E::custom(format!("{field} {}", not_a_digest(&s))))
    }
}

/// `name` if it is a blake3 digest, else an error naming the directory it was meant for:
/// digests are sliced into cache paths (`ab/cdef...`).
pub(super) fn digest_in<'a>(dir: &Path, name: &'a str) -> super::Result<&'a str> {
    if is_digest(name) {
        Ok(name)
    } else {
        Err(super::StoreError::invalid(dir, not_a_digest(name)))
    }
}

/// A manifest entry's (or a checkpoint index entry's) `blake3`.
pub(crate) fn blake3<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    digest_or("blake3", String::deserialize(d)?)
}

/// A run record's `key`.
pub(super) fn key<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    digest_or("key", String::deserialize(d)?)
}

/// A run record's `outputs`: output name -> artifact digest.
pub(super) fn outputs<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    for (name, digest) in &map {
        digest_or::<D::Error>(&format!("outputs.{name}"), digest.clone())?;
    }
    Ok(map)
}

/// A manifest entry's `path`: relative and normalized, so joined onto a view it stays there.
pub(super) fn rel_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    flow_stages::relpath::checked_rel_path(&s)
        .map_err(|e| D::Error::custom(format!("path {e}")))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::super::{Cache, Manifest};

    fn manifest(path: &str, blake3: &str) -> String {
        serde_json::json!({"format": "flow-artifact-v1",
                           "files": [{"path": path, "size": 1, "blake3": blake3}]})
        .to_string()
    }

    #[test]
    fn a_manifest_naming_a_path_outside_or_a_non_digest_does_not_parse() {
        let good = "ab".repeat(32);
        assert!(serde_json::from_str::<Manifest>(&manifest("a/b.txt", &good)).is_ok());
        let cases = [
            ("../x", good.as_str(), "path `../x`"),
            ("/etc/passwd", good.as_str(), "absolute"),
            ("a.txt", "ab/../../x", "blake3 `ab/../../x`"),
            ("a.txt", "a", "not a blake3 digest"),
            ("a.txt", &good.to_uppercase(), "not a blake3 digest"),
        ];
        for (path, blake3, why) in cases {
            let err = serde_json::from_str::<Manifest>(&manifest(path, blake3)).unwrap_err();
            assert!(err.to_string().contains(why), "{path} {blake3}: {err}");
        }
    }

    #[test]
    fn object_and_manifest_paths_refuse_non_digests_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        for bad in [
            "",
            "a",
            "aé",
            "ab/home/u/.aws/credentials",
            &"AB".repeat(32),
        ] {
            assert!(cache.object_path(bad).is_err(), "{bad}");
            assert!(cache.manifest_path(bad).is_err(), "{bad}");
        }
        let good = "0f".repeat(32);
        let object = cache.object_path(&good).unwrap();
        assert!(object.starts_with(cache.root().join("objects/blake3/0f")));
    }
}
