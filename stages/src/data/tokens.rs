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
    /// None when the tokenizer has no BOS (Qwen).
    pub bos_id: Option<u32>,
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

/// A token artifact opened for reading. Document offsets and prompt lengths (12 bytes per
/// document) are loaded; tokens are read on demand with `pread`, so a reader's memory stays
/// small however large the corpus (mapped pages would count as resident memory).
pub struct TokenFile {
    pub meta: TokenMeta,
    tokens: File,
    offsets: Vec<u64>,
    prompt: Vec<u32>,
}

fn read_le<const N: usize, T>(path: &Path, from: fn([u8; N]) -> T) -> Result<Vec<T>, StageError> {
    let bytes = std::fs::read(path)
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunks_exact")))
        .collect())
}

impl TokenFile {
    pub fn open(dir: &Path) -> Result<TokenFile, StageError> {
        let mpath = dir.join("meta.json");
        let text = std::fs::read_to_string(&mpath)
            .map_err(|e| StageError::io(format!("reading {}", mpath.display()), e))?;
        let meta: TokenMeta = serde_json::from_str(&text).map_err(|e| {
            StageError::Failed(format!("{}: not a token artifact: {e}", mpath.display()))
        })?;
        let tpath = dir.join("tokens.bin");
        let tokens = File::open(&tpath)
            .map_err(|e| StageError::io(format!("opening {}", tpath.display()), e))?;
        let tokens_len = tokens.metadata().map(|m| m.len()).unwrap_or(0);
        let offsets = read_le(&dir.join("docs.bin"), u64::from_le_bytes)?;
        let prompt = read_le(&dir.join("prompt_len.bin"), u32::from_le_bytes)?;
        let width = if meta.dtype == "u32" { 4 } else { 2 };
        if tokens_len != meta.tokens * width
            || offsets.len() as u64 != meta.docs + 1
            || prompt.len() as u64 != meta.docs
            || offsets.last() != Some(&meta.tokens)
        {
            return Err(StageError::Failed(format!(
                "{}: file sizes disagree with meta.json",
                dir.display()
            )));
        }
        Ok(TokenFile {
            meta,
            tokens,
            offsets,
            prompt,
        })
    }

    pub fn docs(&self) -> usize {
        self.meta.docs as usize
    }

    /// Token range of document `i`.
    pub fn doc_range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i] as usize..self.offsets[i + 1] as usize
    }

    pub fn prompt_len(&self, i: usize) -> u32 {
        self.prompt[i]
    }

    /// Appends tokens `range` (positions in the whole token stream) to `out`.
    pub fn extend_range(
        &self,
        range: std::ops::Range<usize>,
        out: &mut Vec<u32>,
    ) -> Result<(), StageError> {
        use std::os::unix::fs::FileExt;
        let wide = self.meta.dtype == "u32";
        let width = if wide { 4 } else { 2 };
        let mut buf = vec![0u8; range.len() * width];
        self.tokens
            .read_exact_at(&mut buf, (range.start * width) as u64)
            .map_err(|e| StageError::io("reading tokens.bin", e))?;
        if wide {
            out.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4"))),
            );
        } else {
            out.extend(
                buf.chunks_exact(2)
                    .map(|c| u16::from_le_bytes(c.try_into().expect("2")) as u32),
            );
        }
        Ok(())
    }

    /// Appends document `i`'s tokens to `out`.
    pub fn extend_doc(&self, i: usize, out: &mut Vec<u32>) -> Result<(), StageError> {
        self.extend_range(self.doc_range(i), out)
    }

    pub fn doc(&self, i: usize) -> Vec<u32> {
        let mut v = Vec::new();
        self.extend_doc(i, &mut v).expect("tokens.bin is readable");
        v
    }
}
