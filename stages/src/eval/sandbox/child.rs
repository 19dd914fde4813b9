//! What runs between fork and exec (`Command::pre_exec`): the process setup of a sandboxed
//! program, including the fork that makes it the first process (PID 1) of its own PID
//! namespace.
//!
//! The parent is multi-threaded, so only async-signal-safe calls are made here and nothing
//! allocates (`io::Error::last_os_error` does not).
//!
//! With a PID namespace, the process std forked (the *keeper*, `child.id()` to the parent)
//! forks once more: the grandchild is the namespace's init and execs Python; when it dies,
//! the kernel kills every process left in the namespace, whatever session or group it made
//! for itself, and reports init's death only once they are all gone. The keeper
//! - closes every descriptor >= 3, among them std's close-on-exec error pipe (held open, it
//!   would make `spawn` wait for the keeper's exit; the grandchild keeps its own copy, so an
//!   exec failure is still reported);
//! - on SIGTERM (the parent's timeout) kills init with SIGKILL, so that the tree goes while
//!   the keeper can still reap it (this machine's PID 1 reaps no orphans: an init whose
//!   keeper died first would stay a zombie);
//! - waits for init, reaps it and exits with its status (or dies of its signal).
//!
//! Init has `PR_SET_PDEATHSIG = SIGKILL`: if the keeper is killed outright (or the parent
//! dies: the keeper has the same setting), the namespace goes too.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use super::Limits;

/// Which namespaces a run gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespaces {
    /// None (the `rlimits` level where the kernel refuses them).
    None,
    /// A new user namespace (privileges dropped) and network namespace (no network).
    UserNet,
    /// Those and a PID namespace whose init is the program: the whole tree dies with it.
    UserNetPid,
}

impl Namespaces {
    /// How `metrics.json` names them.
    pub fn describe(self) -> &'static str {
        match self {
            Namespaces::None => "unavailable",
            Namespaces::UserNet => "user+net (no network)",
            Namespaces::UserNetPid => {
                "user+net+pid (no network; the process tree dies with the program)"
            }
        }
    }
}

/// Everything the child needs, computed in the parent (copied into the closure).
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub limits: Limits,
    pub namespaces: Namespaces,
    /// The Landlock ruleset to restrict to, open in the parent (close-on-exec).
    pub ruleset: Option<RawFd>,
    /// The parent's pid: the child exits if it was orphaned before its death signal was set.
    pub parent: libc::pid_t,
}

/// The keeper's view of init: its pid, and whether it has been waited for (after which
/// SIGTERM must not signal the number, which may belong to another process by then).
/// Each keeper is a forked copy of the parent: these statics are its own.
static INIT: AtomicI32 = AtomicI32::new(0);
static INIT_DONE: AtomicBool = AtomicBool::new(false);

fn last() -> io::Error {
    io::Error::last_os_error()
}

/// Sets the process up; returns in the process that is to exec Python.
///
/// # Safety
/// Call only in a freshly forked child (a `pre_exec` closure) whose descriptors in `setup`
/// are open.
pub unsafe fn enter(setup: &Setup) -> io::Result<()> {
    // SAFETY (all blocks below): plain syscalls on values of this process, no allocation.
    unsafe {
        if libc::setsid() < 0 {
            return Err(last());
        }
        die_with_parent(setup.parent)?;
        let limits = setup.limits;
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
                return Err(last());
            }
        }
        match setup.namespaces {
            Namespaces::None => {}
            Namespaces::UserNet => {
                if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) < 0 {
                    return Err(last());
                }
            }
            Namespaces::UserNetPid => {
                let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNET | libc::CLONE_NEWPID;
                if libc::unshare(flags) < 0 {
                    return Err(last());
                }
                become_init()?;
            }
        }
        if let Some(fd) = setup.ruleset {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(last());
            }
            if libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) < 0 {
                return Err(last());
            }
        }
        Ok(())
    }
}

/// SIGKILL when the parent (thread) dies; exits at once if it already has.
unsafe fn die_with_parent(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain syscalls.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
            return Err(last());
        }
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    Ok(())
}

/// Forks init of the new PID namespace; returns in init, never in the keeper.
unsafe fn become_init() -> io::Result<()> {
    // SAFETY: plain syscalls; the handler only reads atomics and calls kill.
    unsafe {
        // Installed before the fork, so it is in place once `spawn` returns (after init's
        // exec): the parent's SIGTERM can never find the default action.
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut()) < 0 {
            return Err(last());
        }
        // A pipe whose write end only the keeper holds: init tells from it whether the
        // keeper died before init's death signal was set.
        let mut alive: [RawFd; 2] = [-1; 2];
        if libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(last());
        }
        // SIGTERM waits until the keeper knows init's pid.
        let mut term: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut term);
        libc::sigaddset(&mut term, libc::SIGTERM);
        libc::sigprocmask(libc::SIG_BLOCK, &term, std::ptr::null_mut());
        let pid = libc::fork();
        if pid <= 0 {
            // Init, or no fork: SIGTERM unblocked (exec keeps the mask, and resets the
            // inherited handler).
            let e = last();
            libc::sigprocmask(libc::SIG_UNBLOCK, &term, std::ptr::null_mut());
            if pid < 0 {
                libc::close(alive[0]);
                libc::close(alive[1]);
                return Err(e);
            }
            libc::close(alive[1]);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(last());
            }
            let mut poll = libc::pollfd {
                fd: alive[0],
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, 0) != 0 {
                libc::_exit(1); // the keeper is gone (hang-up) or poll failed
            }
            libc::close(alive[0]);
            return Ok(());
        }
        INIT.store(pid, Ordering::SeqCst);
        libc::sigprocmask(libc::SIG_UNBLOCK, &term, std::ptr::null_mut());
        libc::close(alive[0]);
        close_from_3_except(alive[1]);
        keep(pid)
    }
}

/// The keeper's SIGTERM: kill init (and so the namespace) unless it was waited for.
extern "C" fn on_term(_: libc::c_int) {
    let init = INIT.load(Ordering::SeqCst);
    if init > 0 && !INIT_DONE.load(Ordering::SeqCst) {
        // SAFETY: kill is async-signal-safe; init is our unreaped child.
        unsafe {
            libc::kill(init, libc::SIGKILL);
        }
    }
}

/// Closes every descriptor from 3 up, but `keep`.
unsafe fn close_from_3_except(keep: RawFd) {
    // SAFETY: plain syscalls on this process's descriptors.
    unsafe {
        let ranges = [(3, keep - 1), (keep + 1, libc::c_int::MAX)];
        for (first, last) in ranges {
            if first > last {
                continue;
            }
            let rc = libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32);
            if rc < 0 {
                // Kernels before 5.9: one by one, up to the descriptor limit.
                let mut lim: libc::rlimit = std::mem::zeroed();
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(1 << 20) as libc::c_int
                } else {
                    1024
                };
                for fd in first..=last.min(top) {
                    libc::close(fd);
                }
            }
        }
    }
}

/// Waits for init without reaping it (so SIGTERM never signals a reused pid), then reaps it
/// and ends the keeper the way init ended.
unsafe fn keep(init: libc::pid_t) -> ! {
    // SAFETY: plain syscalls; the siginfo is written by the kernel.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        loop {
            let rc = libc::waitid(
                libc::P_PID,
                init as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            );
            if rc == 0 {
                break;
            }
            if last().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(127);
            }
        }
        INIT_DONE.store(true, Ordering::SeqCst);
        let mut status = 0;
        while libc::waitpid(init, &mut status, 0) < 0 && last().raw_os_error() == Some(libc::EINTR)
        {
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = if libc::WIFSIGNALED(status) {
            libc::WTERMSIG(status)
        } else {
            libc::SIGKILL
        };
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
        libc::_exit(128 + sig)
    }
}
