//! File hashing with blake3.

use std::io::Read;
use std::path::Path;

use super::{Result, StoreError};

/// Bytes read per call: large enough for blake3 to hash many chunks in parallel SIMD lanes.
const BUFFER: usize = 1 << 20;

/// blake3 of a file's contents in hex, streamed through a 1 MiB buffer. Not memory-mapped:
/// mapped pages of a multi-GB output would count against the stage's resident memory.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| StoreError::io(path, e))?;
    hash_open_file(&mut file, path)
}

/// The blake3 of an open file from where it is read to its end (`path` is for errors):
/// hashing and then uploading through one descriptor sends the bytes that were hashed.
pub fn hash_open_file(file: &mut std::fs::File, path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Whether `s` is a blake3 digest as flow writes them: exactly 64 lowercase hex digits.
/// Names that come from outside (remote objects, job specs) are checked with this before
/// they become paths.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
