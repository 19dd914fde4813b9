//! The token artifact format, written by `tokenize` and read by `pack` (and evaluation):
//!
//! ```text
//! tokens.bin      all token ids, little-endian u16 (vocab <= 65536) or u32, documents back to back
//! docs.bin        u64 LE offsets (in tokens) of each document's start, plus the total at the end
//! prompt_len.bin  u32 LE per document: how many leading tokens are prompt (0 for plain text)
//! meta.json       dtype, vocab_size, docs, tokens, bos_id, eos_id, pad_id, template
//! ```
//! Every file is plain little-endian arrays so that any reader (numpy.memmap included) can map
//! it without parsing.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kind::StageError;

/// `meta.json` of a token artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenMeta {
    /// "u16" or "u32".
    pub dtype: String,
    pub vocab_size: u32,
    pub docs: u64,
    pub tokens: u64,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    /// The chat template used for prompt/response records.
    pub template: String,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::io(format!("writing {}", path.display()), e)
}

/// Streams documents into a token artifact directory.
pub struct TokenWriter {
    dir: PathBuf,
    wide: bool,
    tokens: BufWriter<File>,
    docs: BufWriter<File>,
    prompt: BufWriter<File>,
    count: u64,
    ndocs: u64,
}

impl TokenWriter {
    pub fn create(dir: &Path, vocab_size: u32) -> Result<TokenWriter, StageError> {
        let open = |name: &str| -> Result<BufWriter<File>, StageError> {
            let p = dir.join(name);
            File::create(&p)
                .map(|f| BufWriter::with_capacity(1 << 20, f))
                .map_err(|e| StageError::io(format!("creating {}", p.display()), e))
        };
        Ok(TokenWriter {
            dir: dir.to_path_buf(),
            wide: vocab_size > 65536,
            tokens: open("tokens.bin")?,
            docs: open("docs.bin")?,
            prompt: open("prompt_len.bin")?,
            count: 0,
            ndocs: 0,
        })
    }

    /// Appends one document.
    pub fn push(&mut self, ids: &[u32], prompt_len: u32) -> Result<(), StageError> {
        let path = self.dir.join("tokens.bin");
        self.docs
            .write_all(&self.count.to_le_bytes())
            .map_err(io(&path))?;
        self.prompt
            .write_all(&prompt_len.to_le_bytes())
            .map_err(io(&path))?;
        if self.wide {
            for id in ids {
                self.tokens
                    .write_all(&id.to_le_bytes())
                    .map_err(io(&path))?;
            }
        } else {
            for id in ids {
                self.tokens
                    .write_all(&(*id as u16).to_le_bytes())
                    .map_err(io(&path))?;
            }
        }
        self.count += ids.len() as u64;
        self.ndocs += 1;
        Ok(())
    }

    /// Writes the closing offset and `meta.json`.
    pub fn finish(mut self, mut meta: TokenMeta) -> Result<TokenMeta, StageError> {
        let path = self.dir.join("docs.bin");
        self.docs
            .write_all(&self.count.to_le_bytes())
            .map_err(io(&path))?;
        for w in [&mut self.tokens, &mut self.docs, &mut self.prompt] {
            w.flush().map_err(io(&path))?;
        }
        meta.dtype = if self.wide { "u32" } else { "u16" }.into();
        meta.docs = self.ndocs;
        meta.tokens = self.count;
        let text = serde_json::to_string_pretty(&meta).expect("meta serializes");
        let mpath = self.dir.join("meta.json");
        std::fs::write(&mpath, text).map_err(io(&mpath))?;
        Ok(meta)
    }
}

/// A token artifact opened for reading through memory maps.
pub struct TokenFile {
    pub meta: TokenMeta,
    tokens: Option<memmap2::Mmap>,
    docs: Option<memmap2::Mmap>,
    prompt: Option<memmap2::Mmap>,
}

fn map(path: &Path) -> Result<Option<memmap2::Mmap>, StageError> {
    let f =
        File::open(path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(None); // mapping an empty file fails on Linux
    }
    // SAFETY: artifacts are read-only cache files, never modified while in use.
    unsafe { memmap2::Mmap::map(&f) }
        .map(Some)
        .map_err(|e| StageError::io(format!("mapping {}", path.display()), e))
}

fn bytes(m: &Option<memmap2::Mmap>) -> &[u8] {
    m.as_deref().unwrap_or(&[])
}

impl TokenFile {
    pub fn open(dir: &Path) -> Result<TokenFile, StageError> {
        let mpath = dir.join("meta.json");
        let text = std::fs::read_to_string(&mpath)
            .map_err(|e| StageError::io(format!("reading {}", mpath.display()), e))?;
        let meta: TokenMeta = serde_json::from_str(&text).map_err(|e| {
            StageError::Failed(format!("{}: not a token artifact: {e}", mpath.display()))
        })?;
        let tf = TokenFile {
            tokens: map(&dir.join("tokens.bin"))?,
            docs: map(&dir.join("docs.bin"))?,
            prompt: map(&dir.join("prompt_len.bin"))?,
            meta,
        };
        let width = if tf.meta.dtype == "u32" { 4 } else { 2 };
        if bytes(&tf.tokens).len() as u64 != tf.meta.tokens * width
            || bytes(&tf.docs).len() as u64 != (tf.meta.docs + 1) * 8
            || bytes(&tf.prompt).len() as u64 != tf.meta.docs * 4
        {
            return Err(StageError::Failed(format!(
                "{}: file sizes disagree with meta.json",
                dir.display()
            )));
        }
        Ok(tf)
    }

    pub fn docs(&self) -> usize {
        self.meta.docs as usize
    }

    fn offset(&self, i: usize) -> usize {
        let b = &bytes(&self.docs)[i * 8..i * 8 + 8];
        u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize
    }

    /// Token range of document `i`.
    pub fn doc_range(&self, i: usize) -> std::ops::Range<usize> {
        self.offset(i)..self.offset(i + 1)
    }

    pub fn prompt_len(&self, i: usize) -> u32 {
        let b = &bytes(&self.prompt)[i * 4..i * 4 + 4];
        u32::from_le_bytes(b.try_into().expect("4 bytes"))
    }

    /// Appends document `i`'s tokens to `out`.
    pub fn extend_doc(&self, i: usize, out: &mut Vec<u32>) {
        let r = self.doc_range(i);
        let t = bytes(&self.tokens);
        if self.meta.dtype == "u32" {
            out.extend(
                t[r.start * 4..r.end * 4]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4"))),
            );
        } else {
            out.extend(
                t[r.start * 2..r.end * 2]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes(c.try_into().expect("2")) as u32),
            );
        }
    }

    pub fn doc(&self, i: usize) -> Vec<u32> {
        let mut v = Vec::new();
        self.extend_doc(i, &mut v);
        v
    }
}
