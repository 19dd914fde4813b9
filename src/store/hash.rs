//! File hashing with blake3.

use std::path::Path;

use super::{Result, StoreError};

/// blake3 of a file's contents in hex. Large files are memory-mapped (blake3 falls back to
/// buffered reads for small ones), so no file is ever read into memory whole.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap(path)
        .map_err(|e| StoreError::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}
