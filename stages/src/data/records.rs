//! The normalized record format every data stage exchanges: `records.jsonl`, one JSON object
//! per line, tagged by `type`, plus `summary.json`.
//!
//! | type | fields | made from |
//! |---|---|---|
//! | `text` | `text` | CPT corpora (OpenWebMath `text`, StarCoder `content`, plain text) |
//! | `pair` | `prompt`, `response` | IFT data (MetaMathQA, Magicoder) |
//! | `gsm8k` | `question`, `answer` | GSM8K (`#### N` final answer in `answer`) |
//! | `code` | `task_id`, `prompt`, `canonical_solution`, `test`, `entry_point` | HumanEval |
//! | `choice` | `style`, `contexts`, `continuations`, `gold` | HellaSwag, ARC, WinoGrande |
//!
//! A `choice` item has either one context and k continuations (HellaSwag, ARC) or k contexts
//! and one continuation (WinoGrande, where the option sits in the context); `gold` indexes the
//! side that has k entries.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kind::StageError;

/// One normalized record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Text {
        text: String,
    },
    Pair {
        prompt: String,
        response: String,
    },
    Gsm8k {
        question: String,
        answer: String,
    },
    Code {
        task_id: String,
        prompt: String,
        canonical_solution: String,
        test: String,
        entry_point: String,
    },
    Choice {
        style: String,
        contexts: Vec<String>,
        continuations: Vec<String>,
        gold: usize,
    },
}

impl Record {
    /// The record as (prompt, response) when it can be trained on: text has no prompt.
    /// GSM8K and code items train as question -> worked answer and prompt -> solution.
    pub fn as_training(&self) -> Option<(&str, &str)> {
        match self {
            Record::Text { text } => Some(("", text)),
            Record::Pair { prompt, response } => Some((prompt, response)),
            Record::Gsm8k { question, answer } => Some((question, answer)),
            Record::Code {
                prompt,
                canonical_solution,
                ..
            } => Some((prompt, canonical_solution)),
            Record::Choice { .. } => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Record::Text { .. } => "text",
            Record::Pair { .. } => "pair",
            Record::Gsm8k { .. } => "gsm8k",
            Record::Code { .. } => "code",
            Record::Choice { .. } => "choice",
        }
    }

    /// The JSON line (no newline); also what dedup and the split hash.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }
}

/// Name of the records file inside a records artifact.
pub const RECORDS_FILE: &str = "records.jsonl";
/// Name of the summary file inside every data artifact.
pub const SUMMARY_FILE: &str = "summary.json";

/// Streams records into `dir/records.jsonl`, remembering each line's byte offset (so a later
/// pass can reorder lines without holding them in memory).
pub struct RecordWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pub offsets: Vec<u64>,
    pos: u64,
    counts: std::collections::BTreeMap<&'static str, u64>,
}

impl RecordWriter {
    pub fn create(dir: &Path) -> Result<RecordWriter, StageError> {
        let path = dir.join(RECORDS_FILE);
        let file = File::create(&path)
            .map_err(|e| StageError::io(format!("creating {}", path.display()), e))?;
        Ok(RecordWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            offsets: Vec::new(),
            pos: 0,
            counts: Default::default(),
        })
    }

    pub fn write(&mut self, record: &Record) -> Result<(), StageError> {
        self.write_line(&record.to_line(), record.type_name())
    }

    /// Writes an already serialized record line (without newline).
    pub fn write_line(&mut self, line: &str, type_name: &'static str) -> Result<(), StageError> {
        self.offsets.push(self.pos);
        self.out
            .write_all(line.as_bytes())
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|e| StageError::io(format!("writing {}", self.path.display()), e))?;
        self.pos += line.len() as u64 + 1;
        *self.counts.entry(type_name).or_default() += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Flushes; returns the count of records per type.
    pub fn finish(mut self) -> Result<std::collections::BTreeMap<&'static str, u64>, StageError> {
        self.out
            .flush()
            .map_err(|e| StageError::io(format!("writing {}", self.path.display()), e))?;
        Ok(self.counts)
    }
}

/// Streams the records of a records artifact directory, with 1-based line numbers.
pub fn read_records(
    dir: &Path,
) -> Result<impl Iterator<Item = Result<(usize, Record), StageError>>, StageError> {
    let path = dir.join(RECORDS_FILE);
    let file =
        File::open(&path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    let reader = BufReader::with_capacity(1 << 20, file);
    Ok(reader.lines().enumerate().map(move |(i, line)| {
        let line = line.map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        let record = serde_json::from_str(&line).map_err(|e| {
            StageError::Failed(format!(
                "{}:{}: not a flow record: {e}",
                path.display(),
                i + 1
            ))
        })?;
        Ok((i + 1, record))
    }))
}

/// Writes `summary.json` into an artifact directory.
pub fn write_summary(dir: &Path, summary: &serde_json::Value) -> Result<(), StageError> {
    let path = dir.join(SUMMARY_FILE);
    let text = serde_json::to_string_pretty(summary).expect("JSON serializes");
    std::fs::write(&path, text + "\n")
        .map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}
