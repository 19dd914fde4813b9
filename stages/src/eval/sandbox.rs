//! Runs untrusted Python (model-written HumanEval completions) in a sandbox.
//!
//! Each program runs as `python3 -I -B -S program.py` (`-S` unless installed packages are
//! asked for) in a fresh temporary directory, with an environment scrubbed to PATH, HOME,
//! TMPDIR and LANG, and passes only if it ran to its end: the sandbox appends a line that
//! prints a token drawn afresh for the run (128 bits), and a run passes when its exit status
//! is 0 *and* its stdout holds that token as a line. A program that exits early with status 0
//! (`sys.exit(0)`, `raise SystemExit`, `os._exit(0)`, `exit()` before `check` ran) fails, as
//! it does in OpenAI's human-eval. (The token guards against such exits, not against a
//! program that reads its own source to find it.)
//!
//! What is in force depends on the [`Level`] (the eval stage's `sandbox` param), and
//! [`Sandbox::describe`] records it in `metrics.json`:
//! - both levels: the program's own session and process group, killed at the timeout;
//!   rlimits on address space, CPU time, processes, file size and core dumps; the death of
//!   every process of the program if the parent dies (`PR_SET_PDEATHSIG`);
//! - `strict` (the default): also new user, network and PID namespaces (privileges dropped:
//!   as root, rlimits would not bind otherwise; no network at all; the program is init of its
//!   PID namespace, so every process it forks, even one that left the session with
//!   `setsid` or double-forked, dies with it), and Landlock: writes only beneath the
//!   temporary directory, reads and execs only there and beneath what Python needs to start
//!   (its prefix and `sys.path`, the system libraries), no TCP bind or connect (ABI 4+), no
//!   signals to processes outside the sandbox (ABI 6+). If any of these cannot be set up,
//!   [`Sandbox::new`] fails and says what is missing;
//! - `rlimits`: what the kernel allows of the namespaces (all three, or user and network
//!   only, or none), and Landlock limiting writes only (or nothing), as before the levels
//!   existed: reads are limited only under `strict`, so this level is also the way out for
//!   programs that must read elsewhere (installed packages' data, say). Without the PID
//!   namespace a process that leaves the group survives the kill.
//!
//! A sandbox that cannot start a program is an error of the stage, never a failed sample:
//! a broken sandbox must not look like a bad model.
//!
//! Written against raw syscalls (libc) rather than the `landlock` crate because the
//! restriction must be applied between fork and exec, where only async-signal-safe calls
//! are allowed: the ruleset is built in the parent (`landlock.rs`) and only
//! `landlock_restrict_self` runs in the child (`child.rs`).

mod child;
mod landlock;
mod python;

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use self::child::Namespaces;
use self::landlock::Files;
use self::python::{find_python, python_paths, system_readable};
use crate::kind::StageError;

/// Resource limits of one program.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time before the program is killed (CPU time is limited to this + 2 s).
    pub timeout: Duration,
    /// Address-space limit (RLIMIT_AS), so a runaway allocation fails instead of swapping.
    pub memory_bytes: u64,
    /// Process limit (RLIMIT_NPROC), which bounds a fork bomb.
    pub processes: u64,
    /// Largest file the program may write (RLIMIT_FSIZE), its stdout and stderr included.
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

/// How much containment a sandbox insists on: explicit, so that a kernel without
/// namespaces or Landlock never silently runs untrusted code with less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// Namespaces (user, network, PID) and Landlock (reads and writes) or an error.
    #[default]
    Strict,
    /// Whatever the kernel allows on top of the rlimits.
    Rlimits,
}

impl Level {
    /// The names the `sandbox` param accepts.
    pub const NAMES: &'static [&'static str] = &["strict", "rlimits"];

    /// The level of a `sandbox` param value.
    pub fn parse(name: &str) -> Option<Level> {
        match name {
            "strict" => Some(Level::Strict),
            "rlimits" => Some(Level::Rlimits),
            _ => None,
        }
    }

    /// The level's name, as the param and `metrics.json` write it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Strict => "strict",
            Level::Rlimits => "rlimits",
        }
    }
}

/// How a program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0 after its last line ran.
    Passed,
    /// Non-zero exit, a signal, or an exit before the end, with the last line of stderr
    /// (e.g. `AssertionError`) where there is one.
    Failed(String),
    /// Still running at the timeout (then killed).
    TimedOut,
}

/// One run: the outcome and the path the program had (for audits of leftovers).
#[derive(Debug, Clone)]
pub struct Execution {
    /// How it ended.
    pub outcome: Outcome,
    /// Where `program.py` was (removed since): the processes' command lines name it.
    pub program: PathBuf,
}

/// A configured sandbox; probes once what the kernel allows.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    level: Level,
    namespaces: Namespaces,
    landlock_abi: i64,
    files: Files,
    /// Where programs may read and exec besides their directory (with reads limited).
    readable: Vec<PathBuf>,
}

/// What the probe runs: Python's start and the standard modules HumanEval's problems
/// import (hashlib loads libcrypto), so that limited reads are known to be enough.
const PROBE: &str = "import collections, copy, functools, hashlib, heapq, itertools, math, random, re, string, typing\nhashlib.md5(b'flow').hexdigest()\n";

/// Why a run did not produce an outcome: starting it failed (what the probe tries the next
/// configuration on), or something else did.
enum RunError {
    Spawn(std::io::Error),
    Other(StageError),
}

impl From<StageError> for RunError {
    fn from(e: StageError) -> RunError {
        RunError::Other(e)
    }
}

/// Appended to every program: only a run that reaches it prints the token, and only a run
/// that printed it passes. The leading newline ends a last line without one.
fn epilogue(token: &str) -> String {
    format!(
        "\n# flow's sandbox: reached only when everything above ran to its end.\n__import__('os').write(1, b'\\n{token}\\n')\n"
    )
}

/// A fresh 128-bit token in hex, from the kernel's random source. It never enters an
/// outcome, so results stay deterministic.
fn token() -> Result<String, StageError> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most the rest of the buffer.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(StageError::io("sandbox: getrandom", e));
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether stdout (its last 64 KiB) holds the token as a line of its own.
fn printed(stdout: &Path, token: &str) -> bool {
    let Ok(mut f) = std::fs::File::open(stdout) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))
        .is_err()
    {
        return false;
    }
    let mut tail = Vec::new();
    if f.take(64 << 10).read_to_end(&mut tail).is_err() {
        return false;
    }
    tail.split(|&b| b == b'\n').any(|l| l == token.as_bytes())
}

/// Whether our child `pid` has exited, without reaping it (so its pid, which is also its
/// process group's id, stays ours to signal).
fn exited(pid: libc::pid_t) -> Result<bool, StageError> {
    // SAFETY: waitid writes the siginfo; WNOWAIT leaves the child waitable.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc < 0 {
            return Err(StageError::io(
                "sandbox: waiting",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(info.si_pid() != 0)
    }
}

/// What to say after what `strict` could not set up.
const OPT_OUT: &str =
    "; `sandbox = \"rlimits\"` opts in to running with what the kernel allows instead";

impl Sandbox {
    /// Finds python3 and probes the kernel by running [`PROBE`] in the sandbox: `strict`
    /// fails naming what is unavailable, `rlimits` takes the most protection that works.
    pub fn new(limits: Limits, level: Level) -> Result<Sandbox, StageError> {
        Sandbox::with_python(find_python()?, limits, level)
    }

    /// [`Sandbox::new`] with a given interpreter (tests give a broken one).
    #[doc(hidden)]
    pub fn with_python(
        python: PathBuf,
        limits: Limits,
        level: Level,
    ) -> Result<Sandbox, StageError> {
        let readable = python_paths(&python, limits.site_packages)?;
        let mut sandbox = Sandbox {
            python,
            limits,
            level,
            namespaces: Namespaces::UserNetPid,
            landlock_abi: landlock::abi(),
            files: Files::ReadsAndWrites,
            readable,
        };
        match level {
            Level::Strict => sandbox.probe_strict()?,
            Level::Rlimits => sandbox.probe_rlimits()?,
        }
        Ok(sandbox)
    }

    /// A strict sandbox that was never probed, reading only the system paths besides its
    /// interpreter's directory: what the tests of setup errors in [`Sandbox::run`] need.
    #[doc(hidden)]
    pub fn unprobed(python: PathBuf, limits: Limits) -> Sandbox {
        let mut readable = system_readable();
        readable.extend(
            python
                .parent()
                .filter(|d| d.is_dir())
                .map(Path::to_path_buf),
        );
        Sandbox {
            python,
            limits,
            level: Level::Strict,
            namespaces: Namespaces::UserNetPid,
            landlock_abi: landlock::abi(),
            files: Files::ReadsAndWrites,
            readable,
        }
    }

    /// Runs the probe, again after timeouts (a loaded machine says nothing about the
    /// kernel): the outcome, or the error that kept it from starting.
    fn probe(&self, program: &str) -> Result<Result<Outcome, std::io::Error>, StageError> {
        let mut outcome = Outcome::TimedOut;
        for _ in 0..4 {
            outcome = match self.execute(program) {
                Ok(e) => e.outcome,
                Err(RunError::Spawn(e)) => return Ok(Err(e)),
                Err(RunError::Other(e)) => return Err(e),
            };
            if outcome != Outcome::TimedOut {
                break;
            }
        }
        Ok(Ok(outcome))
    }

    /// Probes the full setup; fails naming what of it is unavailable.
    fn probe_strict(&self) -> Result<(), StageError> {
        let fail = |what: String| Err(StageError::Failed(format!("sandbox: {what}{OPT_OUT}")));
        if self.landlock_abi < 1 {
            return fail(
                "level `strict` needs Landlock, which this kernel does not offer (not built in, or not in its `lsm=` list)".into(),
            );
        }
        match self.probe(PROBE)? {
            Ok(Outcome::Passed) => Ok(()),
            Ok(other) => fail(format!(
                "python3 ({}) does not run in the strict sandbox (reads limited to {}): {other:?}",
                self.python.display(),
                self.readable_list()
            )),
            Err(e) => {
                // Which part failed: the namespaces alone, or Landlock on top of them?
                let bare = Sandbox {
                    files: Files::Unrestricted,
                    ..self.clone()
                };
                match bare.probe("pass\n")? {
                    Err(ns) => fail(format!(
                        "python3 cannot start in new user, network and PID namespaces: {ns}"
                    )),
                    Ok(_) => fail(format!("Landlock could not be applied: {e}")),
                }
            }
        }
    }

    /// Takes the first configuration that runs the probe, from the most protection to the
    /// least (reads are never limited at this level).
    fn probe_rlimits(&mut self) -> Result<(), StageError> {
        let files: &[Files] = if self.landlock_abi >= 1 {
            &[Files::Writes, Files::Unrestricted]
        } else {
            &[Files::Unrestricted]
        };
        let mut last = String::new();
        for namespaces in [
            Namespaces::UserNetPid,
            Namespaces::UserNet,
            Namespaces::None,
        ] {
            for &f in files {
                self.namespaces = namespaces;
                self.files = f;
                match self.probe(PROBE)? {
                    Ok(Outcome::Passed) => return Ok(()),
                    Ok(other) => last = format!("{other:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
        }
        Err(StageError::Failed(format!(
            "sandbox: python3 ({}) cannot run in the sandbox, even with rlimits only: {last}",
            self.python.display()
        )))
    }

    /// The readable paths, for messages.
    fn readable_list(&self) -> String {
        let paths: Vec<String> = self
            .readable
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        paths.join(", ")
    }

    /// What containment is in force, for the metrics file.
    pub fn describe(&self) -> serde_json::Value {
        let pid = self.namespaces == Namespaces::UserNetPid;
        let reads = self.files == Files::ReadsAndWrites;
        serde_json::json!({
            "level": self.level.name(),
            "python": self.python.display().to_string(),
            "namespaces": self.namespaces.describe(),
            "network": if self.namespaces != Namespaces::None {
                "none (own namespace)"
            } else if self.landlock_abi >= 4 && self.files != Files::Unrestricted {
                "no TCP (Landlock)"
            } else {
                "the host's"
            },
            "kill": if pid { "the PID namespace: every process of the program" } else { "the process group" },
            "landlock_abi": self.landlock_abi,
            "landlock": self.files.describe(),
            "reads_limited": reads,
            "readable": if reads { self.readable.iter().map(|p| p.display().to_string()).collect() } else { Vec::new() },
            "passes": "exit status 0 and the run's token printed after the program's last line",
            "timeout_s": self.limits.timeout.as_secs_f64(),
            "memory_bytes": self.limits.memory_bytes,
            "processes": self.limits.processes,
            "site_packages": self.limits.site_packages,
        })
    }

    /// Runs one program to completion, timeout or kill; never leaves a process behind (with
    /// the PID namespace). A program that cannot be started is an error, not an outcome.
    pub fn run(&self, program: &str) -> Result<Execution, StageError> {
        self.execute(program).map_err(|e| match e {
            RunError::Spawn(e) => StageError::Failed(format!(
                "sandbox: starting {} (namespaces {}, Landlock {}) failed: {e}",
                self.python.display(),
                self.namespaces.describe(),
                self.files.describe()
            )),
            RunError::Other(e) => e,
        })
    }

    fn execute(&self, program: &str) -> Result<Execution, RunError> {
        let io = |what: &str, e| RunError::Other(StageError::io(format!("sandbox: {what}"), e));
        let token = token()?;
        let dir = tempfile::Builder::new()
            .prefix("flow-sandbox-")
            .tempdir()
            .map_err(|e| io("creating a temp dir", e))?;
        let path = dir.path().join("program.py");
        std::fs::write(&path, format!("{program}{}", epilogue(&token)))
            .map_err(|e| io("writing the program", e))?;
        let stdout_path = dir.path().join("stdout.txt");
        let stdout = std::fs::File::create(&stdout_path).map_err(|e| io("stdout file", e))?;
        let stderr_path = dir.path().join("stderr.txt");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| io("stderr file", e))?;
        let ruleset = landlock::ruleset(self.landlock_abi, self.files, dir.path(), &self.readable)?;
        let setup = child::Setup {
            limits: self.limits,
            namespaces: self.namespaces,
            ruleset: ruleset.as_ref().map(|f| f.as_raw_fd()),
            parent: std::process::id() as libc::pid_t,
        };
        let mut cmd = Command::new(&self.python);
        cmd.arg("-I").arg("-B");
        if !self.limits.site_packages {
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
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: `child::enter` makes only async-signal-safe calls and allocates nothing;
        // the ruleset descriptor stays open until spawn has returned.
        unsafe {
            cmd.pre_exec(move || child::enter(&setup));
        }
        let mut child = cmd.spawn().map_err(RunError::Spawn)?;
        drop(ruleset);
        let pid = child.id() as libc::pid_t;
        let start = Instant::now();
        let finished = loop {
            if exited(pid)? {
                break true;
            }
            if start.elapsed() >= self.limits.timeout {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if !finished && self.namespaces == Namespaces::UserNetPid {
            // The keeper kills init on SIGTERM and exits once the namespace is empty.
            // SAFETY: signalling our unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let asked = Instant::now();
            while !exited(pid)? && asked.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // The whole group goes, whether the leader exited or timed out (without a PID
        // namespace the only kill; with one, what is left if the keeper did not exit).
        // SAFETY: signalling the process group of our unreaped child.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let status = child.wait().map_err(|e| io("waiting", e))?;
        // Wait (up to 2 s) until the group is gone, so no straggler outlives the call.
        let killed = Instant::now();
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(-pid, 0) } == 0 && killed.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = if !finished {
            Outcome::TimedOut
        } else if status.success() && printed(&stdout_path, &token) {
            Outcome::Passed
        } else if status.success() {
            Outcome::Failed("exited with status 0 before the end of the program".into())
        } else {
            let mut text = String::new();
            if let Ok(f) = std::fs::File::open(&stderr_path) {
                let _ = f.take(64 << 10).read_to_string(&mut text);
            }
            let last = text.lines().rev().find(|l| !l.trim().is_empty());
            Outcome::Failed(match (last, status.code()) {
                (Some(l), _) => l.chars().take(200).collect(),
                (None, Some(c)) => format!("exit status {c}"),
                (None, None) => format!("killed ({status})"),
            })
        };
        Ok(Execution {
            outcome,
            program: path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every configuration the `rlimits` level can fall back to judges programs alike: a
    /// program that ran to its end passes, an early exit with status 0 fails, a loop times
    /// out (the fallbacks are not what this kernel picks, so they are tried here directly).
    #[test]
    fn every_fallback_configuration_judges_alike() {
        let limits = Limits {
            timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        let strongest = Sandbox::new(limits, Level::Rlimits).unwrap();
        for (namespaces, files) in [
            (Namespaces::UserNet, Files::Writes),
            (Namespaces::None, Files::Writes),
            (Namespaces::None, Files::Unrestricted),
        ] {
            let sb = Sandbox {
                namespaces,
                files,
                ..strongest.clone()
            };
            let what = format!("{namespaces:?} {files:?}");
            assert_eq!(sb.run(PROBE).unwrap().outcome, Outcome::Passed, "{what}");
            let early = sb.run("import sys\nsys.exit(0)\n").unwrap().outcome;
            assert!(matches!(early, Outcome::Failed(_)), "{what}: {early:?}");
            let looping = sb.run("while True:\n    pass\n").unwrap().outcome;
            assert_eq!(looping, Outcome::TimedOut, "{what}");
        }
    }

    /// Tokens are fresh for every run and of the full length.
    #[test]
    fn tokens_are_fresh_128_bit_hex() {
        let (a, b) = (token().unwrap(), token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
