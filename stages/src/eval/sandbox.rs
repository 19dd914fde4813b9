//! Runs untrusted Python (model-written HumanEval completions) in a sandbox.
//!
//! Each program runs as `python3 -I -B -S program.py` (`-S` unless installed packages are
//! asked for) in a fresh temporary directory, with:
//! - its own session and process group, killed as a whole at the timeout and after exit;
//! - rlimits on address space, CPU time, processes, file size and core dumps;
//! - a new user and network namespace where the kernel allows it (no network at all, and
//!   the process loses its privileges: as root, rlimits would not bind otherwise);
//! - Landlock where the kernel has it: writes only beneath the temporary directory, no TCP
//!   bind or connect (ABI 4+), no signals to processes outside the sandbox (ABI 6+);
//! - an environment scrubbed to PATH, HOME, TMPDIR and LANG.
//!
//! Written against raw syscalls (libc) rather than the `landlock` crate because the
//! restriction must be applied between fork and exec, where only async-signal-safe calls
//! are allowed: the ruleset is built in the parent and only `landlock_restrict_self` runs
//! in the child.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kind::StageError;

/// Resource limits of one program.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub processes: u64,
    pub file_bytes: u64,
    /// Whether programs see installed packages: Python's `site` (site-packages and the
    /// `.pth` files, which run code at every start). Off (`python3 -S`), a program has the
    /// standard library only, all HumanEval's problems need, and starts in a fifth of the
    /// time where a `.pth` imports something (10 ms against 48 ms on the 2-core machine).
    pub site_packages: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            timeout: Duration::from_secs(3),
            memory_bytes: 1 << 30,
            processes: 32,
            file_bytes: 16 << 20,
            site_packages: false,
        }
    }
}

/// How a program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Non-zero exit or a signal, with the last line of stderr (e.g. `AssertionError`).
    Failed(String),
    TimedOut,
}

/// One run: the outcome and the path the program had (for audits of leftovers).
#[derive(Debug, Clone)]
pub struct Execution {
    pub outcome: Outcome,
    pub program: PathBuf,
}

/// A configured sandbox; probes once what the kernel allows.
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    namespaces: bool,
    landlock_abi: i64,
}

// Landlock's ABI (include/uapi/linux/landlock.h).
const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_ALL: u64 = 0x7f << 6; // char, dir, reg, sock, fifo, block, sym
const FS_REFER: u64 = 1 << 13; // ABI 2
const FS_TRUNCATE: u64 = 1 << 14; // ABI 3
const NET_BIND_TCP: u64 = 1;
const NET_CONNECT_TCP: u64 = 2;
const SCOPE_ABSTRACT_UNIX: u64 = 1;
const SCOPE_SIGNAL: u64 = 2;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

fn landlock_abi() -> i64 {
    // SAFETY: the documented version query: null attribute, size 0.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    abi.max(0)
}

/// How a run that could not even start in the sandbox fails (so the probe can tell it).
const SETUP_FAILED: &str = "sandbox setup: ";

impl Sandbox {
    /// Finds python3 and probes namespaces and Landlock by running `pass` in the sandbox.
    pub fn new(limits: Limits) -> Result<Sandbox, StageError> {
        let python = find_python()?;
        let mut sandbox = Sandbox {
            python,
            limits,
            namespaces: true,
            landlock_abi: landlock_abi(),
        };
        // Namespaces go only when the kernel refuses them (the spawn fails): a probe that
        // times out on a loaded machine said nothing about them, and turning them off then
        // made one run's metrics differ from another's (seen with a test run beside a study).
        let mut outcome = Outcome::TimedOut;
        for _ in 0..4 {
            outcome = sandbox.run("pass\n")?.outcome;
            match &outcome {
                Outcome::Passed => return Ok(sandbox),
                Outcome::Failed(why) if sandbox.namespaces && why.starts_with(SETUP_FAILED) => {
                    sandbox.namespaces = false;
                }
                _ => {}
            }
        }
        Err(StageError::Failed(format!(
            "python3 cannot run in the sandbox: {outcome:?}"
        )))
    }

    /// What containment is active, for the metrics file.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "python": self.python.display().to_string(),
            "namespaces": if self.namespaces { "user+net (no network)" } else { "unavailable" },
            "landlock_abi": self.landlock_abi,
            "timeout_s": self.limits.timeout.as_secs_f64(),
            "memory_bytes": self.limits.memory_bytes,
            "processes": self.limits.processes,
            "site_packages": self.limits.site_packages,
        })
    }

    /// Builds the Landlock ruleset allowing writes beneath `dir` only (None without Landlock).
    fn ruleset(&self, dir: &Path) -> Result<Option<OwnedFd>, StageError> {
        let abi = self.landlock_abi;
        if abi < 1 {
            return Ok(None);
        }
        let mut fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL;
        if abi >= 2 {
            fs |= FS_REFER;
        }
        if abi >= 3 {
            fs |= FS_TRUNCATE;
        }
        let attr = RulesetAttr {
            handled_access_fs: fs,
            handled_access_net: if abi >= 4 {
                NET_BIND_TCP | NET_CONNECT_TCP
            } else {
                0
            },
            scoped: if abi >= 6 {
                SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL
            } else {
                0
            },
        };
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => 24,
        };
        let err = |what: &str| {
            StageError::Failed(format!(
                "sandbox: {what}: {}",
                std::io::Error::last_os_error()
            ))
        };
        // SAFETY: attr outlives the call; size never exceeds the struct.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(err("landlock_create_ruleset"));
        }
        // SAFETY: a fresh descriptor we own.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| StageError::Failed("sandbox: temp path has a NUL".into()))?;
        // SAFETY: a valid C string; O_PATH opens no data.
        let dir_fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if dir_fd < 0 {
            return Err(err("open temp dir"));
        }
        // SAFETY: as above.
        let dir_fd = unsafe { OwnedFd::from_raw_fd(dir_fd) };
        let rule = PathBeneathAttr {
            allowed_access: fs,
            parent_fd: dir_fd.as_raw_fd(),
        };
        // SAFETY: both descriptors are open; rule outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                RULE_PATH_BENEATH,
                &rule as *const PathBeneathAttr,
                0u32,
            )
        };
        if rc < 0 {
            return Err(err("landlock_add_rule"));
        }
        Ok(Some(ruleset))
    }

    /// Runs one program to completion, timeout or kill; never leaves a process behind.
    pub fn run(&self, program: &str) -> Result<Execution, StageError> {
        let io = |what: &str, e| StageError::io(format!("sandbox: {what}"), e);
        let dir = tempfile::Builder::new()
            .prefix("flow-sandbox-")
            .tempdir()
            .map_err(|e| io("creating a temp dir", e))?;
        let path = dir.path().join("program.py");
        std::fs::write(&path, program).map_err(|e| io("writing the program", e))?;
        let stderr_path = dir.path().join("stderr.txt");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| io("stderr file", e))?;
        let ruleset = self.ruleset(dir.path())?;
        let ruleset_fd = ruleset.as_ref().map(|f| f.as_raw_fd());
        let limits = self.limits;
        let namespaces = self.namespaces;
        let mut cmd = Command::new(&self.python);
        cmd.arg("-I").arg("-B");
        if !limits.site_packages {
            cmd.arg("-S");
        }
        cmd.arg(&path)
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: only async-signal-safe calls (setsid, setrlimit, unshare, prctl, syscall)
        // run between fork and exec; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let cpu = limits.timeout.as_secs() + 2;
                for (resource, value) in [
                    (libc::RLIMIT_AS, limits.memory_bytes),
                    (libc::RLIMIT_CPU, cpu),
                    (libc::RLIMIT_NPROC, limits.processes),
                    (libc::RLIMIT_FSIZE, limits.file_bytes),
                    (libc::RLIMIT_CORE, 0),
                ] {
                    let lim = libc::rlimit {
                        rlim_cur: value,
                        rlim_max: value,
                    };
                    if libc::setrlimit(resource, &lim) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if namespaces && libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = ruleset_fd {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if namespaces => {
                // The probe in `new` turns namespaces off when the kernel refuses them.
                return Ok(Execution {
                    outcome: Outcome::Failed(format!("{SETUP_FAILED}{e}")),
                    program: path,
                });
            }
            Err(e) => return Err(io("starting python3", e)),
        };
        drop(ruleset);
        let pgid = child.id() as i32;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| io("waiting", e))? {
                break Some(status);
            }
            if start.elapsed() >= limits.timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        // The whole group goes, whether the leader exited or timed out.
        // SAFETY: signalling our child's process group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        // Wait (up to 2 s) until the group is gone, so no straggler outlives the call.
        let killed = Instant::now();
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(-pgid, 0) } == 0 && killed.elapsed() < Duration::from_secs(2) {
            let _ = child.try_wait();
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = match status {
            None => {
                let _ = child.wait();
                Outcome::TimedOut
            }
            Some(s) if s.success() => Outcome::Passed,
            Some(s) => {
                let mut text = String::new();
                if let Ok(f) = std::fs::File::open(&stderr_path) {
                    let _ = f.take(64 << 10).read_to_string(&mut text);
                }
                let last = text.lines().rev().find(|l| !l.trim().is_empty());
                Outcome::Failed(match (last, s.code()) {
                    (Some(l), _) => l.chars().take(200).collect(),
                    (None, Some(c)) => format!("exit status {c}"),
                    (None, None) => format!("killed ({s})"),
                })
            }
        };
        Ok(Execution {
            outcome,
            program: path,
        })
    }
}

fn find_python() -> Result<PathBuf, StageError> {
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
