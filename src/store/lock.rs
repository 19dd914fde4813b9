//! Per-key locks with flock(2): the kernel drops them when the holder dies, however it dies,
//! so a stale lock of a killed process is taken over without any cleanup.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};

use super::{Cache, Result, StoreError};

/// An exclusive lock on one key, held until dropped.
pub struct KeyLock {
    _file: File,
}

impl KeyLock {
    /// Takes the key's lock, calling `on_wait` with the holder's description first if another
    /// process has it.
    pub fn acquire(cache: &Cache, key: &str, on_wait: impl FnOnce(&str)) -> Result<KeyLock> {
        let path = cache.lock_path(key);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                on_wait(holder.trim());
                file.lock().map_err(|e| StoreError::io(&path, e))?;
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io(&path, e)),
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(
            file,
            "pid {} on {}",
            std::process::id(),
            hostname().unwrap_or_else(|| "?".into())
        );
        Ok(KeyLock { _file: file })
    }

    /// Whether some process holds the key's lock right now (for `flow status`).
    pub fn is_held(cache: &Cache, key: &str) -> bool {
        let Ok(file) = File::open(cache.lock_path(key)) else {
            return false;
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(_) => true,
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}
