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
