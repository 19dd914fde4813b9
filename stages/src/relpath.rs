//! Relative paths that arrive from outside flow (a remote cache's manifests and checkpoint
//! indexes, a downloaded model's shard index). Each is checked here, once, before it is
//! joined onto a directory: a name that passes can only reach a file below that directory.
//!
//! This lives in the stage library, the lowest crate, so the engine and the stages share one
//! definition of a safe name.

use std::path::{Path, PathBuf};

/// `name` as a path below a directory, or why it is not one. A safe name is relative,
/// `/`-separated and normalized: no empty, `.` or `..` component (so no `//`, leading or
/// trailing `/`), no `\` (a separator elsewhere, and never written by flow) and no NUL.
pub fn checked_rel_path(name: &str) -> Result<&Path, String> {
    let bad = |why: &str| {
        Err(format!(
            "`{name}` is not a relative path inside its directory: {why}"
        ))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.starts_with('/') {
        return bad("it is absolute");
    }
    if name.contains(['\\', '\0']) {
        return bad("it contains `\\` or NUL");
    }
    for part in name.split('/') {
        match part {
            "" => return bad("it has an empty component"),
            "." | ".." => return bad(&format!("it has a `{part}` component")),
            _ => {}
        }
    }
    Ok(Path::new(name))
}

/// `dir/name` for a name that [`checked_rel_path`] accepts: the one way an outside name
/// becomes a path, so the result is always below `dir`.
pub fn join_checked(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let joined = dir.join(checked_rel_path(name)?);
    debug_assert!(joined.starts_with(dir));
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_inside_pass_and_escapes_are_refused() {
        for ok in [
            "a",
            "a/b.txt",
            "model-00001-of-00002.safetensors",
            "..a/b..",
            ".hidden",
        ] {
            assert_eq!(checked_rel_path(ok), Ok(Path::new(ok)), "{ok}");
        }
        let cases = [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("a/../../x", "`..`"),
            ("a/./b", "`.`"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("a\\..\\b", "`\\`"),
            ("a\0b", "NUL"),
        ];
        for (bad, why) in cases {
            let err = checked_rel_path(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_joined_name_stays_below_its_directory() {
        let dir = Path::new("/cache/scratch/k");
        assert_eq!(
            join_checked(dir, "ckpt/step-5").unwrap(),
            Path::new("/cache/scratch/k/ckpt/step-5")
        );
        assert!(join_checked(dir, "../../outside").is_err());
        assert!(join_checked(dir, "/abs/path").is_err());
    }
}
