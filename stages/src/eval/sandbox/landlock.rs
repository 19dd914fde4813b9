//! The Landlock ruleset of one run, through raw syscalls (include/uapi/linux/landlock.h).
//!
//! The ruleset is built in the parent, where allocating and opening paths is allowed; only
//! `landlock_restrict_self` runs in the child between fork and exec (see `child.rs`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::kind::StageError;

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: u32 = 1;
const FS_EXECUTE: u64 = 1 << 0;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_REMOVE_DIR: u64 = 1 << 4;
const FS_REMOVE_FILE: u64 = 1 << 5;
const FS_MAKE_ALL: u64 = 0x7f << 6; // char, dir, reg, sock, fifo, block, sym
const FS_REFER: u64 = 1 << 13; // ABI 2
const FS_TRUNCATE: u64 = 1 << 14; // ABI 3
/// The rights Landlock accepts on a rule for a file (not a directory).
const FS_FILE_RIGHTS: u64 = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE;
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

/// What Landlock restricts in a run: the sandbox's level and the kernel decide which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// No Landlock (the kernel lacks it, or the `rlimits` level found it unusable).
    Unrestricted,
    /// Writes only beneath the program's directory; reads anywhere.
    Writes,
    /// Writes beneath the program's directory; reads and execs only there and beneath the
    /// paths Python needs to start (its prefix, the system libraries).
    ReadsAndWrites,
}

impl Files {
    /// How `metrics.json` names it.
    pub fn describe(self) -> &'static str {
        match self {
            Files::Unrestricted => "off",
            Files::Writes => "writes only in the program's directory",
            Files::ReadsAndWrites => {
                "writes only in the program's directory; reads and execs only there and in python's paths"
            }
        }
    }
}

/// The kernel's Landlock ABI version (0: none, or disabled).
pub fn abi() -> i64 {
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

/// Builds the ruleset of one run: everything beneath `dir`, and with
/// [`Files::ReadsAndWrites`] reads and execs beneath each of `readable` (None for
/// [`Files::Unrestricted`]). The descriptor is close-on-exec, as Landlock makes it.
pub fn ruleset(
    abi: i64,
    files: Files,
    dir: &Path,
    readable: &[std::path::PathBuf],
) -> Result<Option<OwnedFd>, StageError> {
    if files == Files::Unrestricted || abi < 1 {
        return Ok(None);
    }
    let mut fs = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_ALL;
    if abi >= 2 {
        fs |= FS_REFER;
    }
    if abi >= 3 {
        fs |= FS_TRUNCATE;
    }
    if files == Files::ReadsAndWrites {
        fs |= FS_EXECUTE | FS_READ_FILE | FS_READ_DIR;
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
    let size: usize = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => 24,
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
        return Err(os_error("landlock_create_ruleset"));
    }
    // SAFETY: a fresh descriptor we own.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    allow(&ruleset, dir, fs)?;
    if files == Files::ReadsAndWrites {
        let read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR;
        for path in readable {
            // /dev/null is opened for writing too (subprocess.DEVNULL, say).
            let rights = if path == Path::new("/dev/null") {
                read | FS_WRITE_FILE
            } else {
                read
            };
            allow(&ruleset, path, rights)?;
        }
    }
    Ok(Some(ruleset))
}

/// Adds a path-beneath rule (only the file rights when `path` is not a directory).
fn allow(ruleset: &OwnedFd, path: &Path, rights: u64) -> Result<(), StageError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| StageError::Failed(format!("sandbox: path has a NUL: {}", path.display())))?;
    // SAFETY: a valid C string; O_PATH opens no data.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_error(&format!("opening {}", path.display())));
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let rights = if path.is_dir() {
        rights
    } else {
        rights & FS_FILE_RIGHTS
    };
    let rule = PathBeneathAttr {
        allowed_access: rights,
        parent_fd: fd.as_raw_fd(),
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
        return Err(os_error(&format!("landlock_add_rule {}", path.display())));
    }
    Ok(())
}

fn os_error(what: &str) -> StageError {
    StageError::Failed(format!(
        "sandbox: {what}: {}",
        std::io::Error::last_os_error()
    ))
}
