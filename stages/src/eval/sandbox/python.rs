//! Finding the interpreter programs run with, and where it reads: what the Landlock ruleset
//! of the `strict` level must allow for Python to start at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::kind::StageError;

/// What Python needs to start besides its own paths: the dynamic loader and libc, the
/// loader's cache, locale data (beneath /usr/lib), and the devices the standard library
/// opens.
const SYSTEM_READABLE: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ld.so.cache",
    "/dev/null",
    "/dev/urandom",
];

/// The system paths of [`SYSTEM_READABLE`] that exist here, resolved.
pub fn system_readable() -> Vec<PathBuf> {
    SYSTEM_READABLE
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect()
}

/// Where the interpreter reads when it starts and imports: its prefixes, its binary's
/// directory and `sys.path` (with `site`, what the `.pth` files add), plus the system
/// paths; resolved, deduplicated, without paths beneath another one of them.
pub fn python_paths(python: &Path, site: bool) -> Result<Vec<PathBuf>, StageError> {
    let code = "import os, sys\nprint('\\n'.join([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)), *sys.path]))";
    let mut cmd = Command::new(python);
    cmd.arg("-I");
    if !site {
        cmd.arg("-S");
    }
    let out = cmd
        .args(["-c", code])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| StageError::io(format!("sandbox: running {}", python.display()), e))?;
    if !out.status.success() {
        return Err(StageError::Failed(format!(
            "sandbox: {} does not run ({}): {}",
            python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut paths = system_readable();
    paths.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(Path::new)
            .filter(|p| p.is_absolute())
            .filter_map(|p| std::fs::canonicalize(p).ok()),
    );
    paths.sort();
    paths.dedup();
    // Sorted, a path beneath another comes after it (and after its other descendants).
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in paths {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Ok(kept)
}

pub fn find_python() -> Result<PathBuf, StageError> {
    find_python_in(&std::env::var_os("PATH").unwrap_or_default())
}

/// The first python3 on `path`, resolved to the interpreter it runs (`sys.executable`).
/// Version managers put a shell-script shim first on PATH (pyenv, asdf): starting Python
/// through pyenv's took 116 ms against 56 ms for the interpreter itself on the 2-core
/// machine, most of a HumanEval program's time, paid for every sample.
fn find_python_in(path: &std::ffi::OsStr) -> Result<PathBuf, StageError> {
    let first = std::env::split_paths(path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
        .ok_or_else(|| StageError::Failed("humaneval needs python3 on PATH".into()))?;
    let resolved = Command::new(&first)
        .args(["-I", "-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute() && p.is_file());
    Ok(resolved.unwrap_or(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shim first on PATH (a shell script that execs the interpreter, as pyenv's does) is
    /// looked through: programs start the interpreter itself.
    #[test]
    fn python_is_resolved_past_a_shim() {
        let real = find_python().expect("python3 on PATH");
        let dir = tempfile::tempdir().unwrap();
        let shim = dir.path().join("python3");
        std::fs::write(
            &shim,
            format!("#!/bin/sh\nexec '{}' \"$@\"\n", real.display()),
        )
        .unwrap();
        std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = std::env::join_paths([dir.path(), Path::new("/usr/bin")]).unwrap();
        let found = find_python_in(&path).unwrap();
        assert_ne!(found, shim, "the shim itself was taken");
        assert_eq!(found, real);
    }
}
