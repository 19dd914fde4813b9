//! Process helpers shared by the engine and the stages that spawn programs.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the spawned process die when the spawning thread's process dies (even by kill -9),
/// so a killed run leaves no writer behind that could race the next attempt of the same key.
///
/// Linux delivers the signal when the *thread* that spawned the child exits: spawn from a
/// thread that waits for the child.
pub fn kill_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "parent exited before the command started",
                ));
            }
            Ok(())
        });
    }
}

/// A command running in a process group of its own, with everything it starts: the group
/// is killed as a whole when the command ends, when this handle is dropped, and when this
/// process dies, even by `kill -9`.
///
/// `PR_SET_PDEATHSIG` reaches only the direct child: a command's own children (`cmd &`,
/// a server a script starts) used to survive a killed run and keep writing its
/// `$FLOW_SCRATCH` while the rerun wrote there too. The group is guarded by a second
/// process in it, `sh` blocked reading a pipe that only this process holds open: the
/// kernel closes the pipe however this process ends, the read returns, and the guard kills
/// its group (itself included). A process that leaves the group (`setsid`) is out of reach
/// of this; the HumanEval sandbox, which runs untrusted code, uses a PID namespace instead.
pub struct GroupChild {
    leader: std::process::Child,
    guard: Option<std::process::Child>,
    pgid: libc::pid_t,
}

impl GroupChild {
    /// Starts `cmd` as the leader of a new process group and its guard beside it.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<GroupChild> {
        cmd.process_group(0);
        kill_with_parent(cmd);
        let leader = cmd.spawn()?;
        let pgid = leader.id() as libc::pid_t;
        let mut guard = Command::new("/bin/sh");
        // `read` returns at end of file: when the last holder of the pipe's write end,
        // this process, is gone. `kill -9 0` signals the guard's own process group.
        guard
            .args(["-c", "read -r _; kill -9 0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(pgid);
        let guard = match guard.spawn() {
            Ok(g) => g,
            Err(e) => {
                // SAFETY: signalling the group we just created.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return Err(e);
            }
        };
        Ok(GroupChild {
            leader,
            guard: Some(guard),
            pgid,
        })
    }

    /// Waits for the leader, then kills what it left running in its group.
    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.leader.wait();
        self.kill_group();
        status
    }

    fn kill_group(&mut self) {
        // SAFETY: signalling the process group this handle created; the leader is not
        // reaped before this (wait then kill would race a reused pid only after the reap,
        // and the group id stays ours while the guard, a member, lives).
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        if self.guard.is_some() {
            self.kill_group();
            let _ = self.leader.wait();
        }
    }
}
