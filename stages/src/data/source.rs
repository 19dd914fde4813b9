//! The `source` kind: data files in, normalized records out, streamed (no file is held in
//! memory whole), with a stable train/eval split by record hash, dedup, shuffle and limit.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use super::formats::{FORMATS, Fields, convert};
use super::records::{Record, RecordWriter, write_summary};
use super::rng::Rng;
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "source"`.
pub static KIND: Kind = Kind {
    name: "source",
    version: 1,
    doc: "reads .parquet, .txt, .jsonl and .json files (optionally .gz) in a named format into normalized records",
    params: &[
        Param {
            name: "files",
            ty: ParamType::Files,
            default: Default::Required,
            doc: "paths or globs relative to the pipeline file (contents enter the cache key), or s3://, http(s):// and hf://datasets/OWNER/NAME[@REV]/PATH URLs",
        },
        Param {
            name: "format",
            ty: ParamType::Choice(FORMATS),
            default: Default::Value("\"text\""),
            doc: "how rows become records: text, pair, gsm8k, metamathqa, magicoder, humaneval, hellaswag, arc, winogrande",
        },
        Param {
            name: "field",
            ty: ParamType::Str,
            default: Default::Value("\"text\""),
            doc: "the text field of JSON rows for format = \"text\" (StarCoder: \"content\")",
        },
        Param {
            name: "prompt_field",
            ty: ParamType::Str,
            default: Default::Value("\"prompt\""),
            doc: "prompt field for format = \"pair\"",
        },
        Param {
            name: "response_field",
            ty: ParamType::Str,
            default: Default::Value("\"response\""),
            doc: "response field for format = \"pair\"",
        },
        Param {
            name: "text_unit",
            ty: ParamType::Choice(&["paragraph", "line", "file"]),
            default: Default::Value("\"paragraph\""),
            doc: ".txt files: one record per blank-line-separated paragraph, per line, or per file (a whole file is held in memory: for small files)",
        },
        Param {
            name: "eval_fraction",
            ty: ParamType::Float,
            default: Default::Value("0.0"),
            doc: "share of records (by record hash, stable across runs) sent to the `eval` output",
        },
        Param {
            name: "limit",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "keep at most this many train records (after shuffling)",
        },
        Param {
            name: "dedup",
            ty: ParamType::Bool,
            default: Default::Value("false"),
            doc: "drop records identical to an earlier one",
        },
        Param {
            name: "shuffle",
            ty: ParamType::Bool,
            default: Default::Value("false"),
            doc: "shuffle the train records with the seed",
        },
        Param {
            name: "on_bad_row",
            ty: ParamType::Choice(&["error", "skip"]),
            default: Default::Value("\"error\""),
            doc: "a malformed row fails the stage (naming file, line and field) or is counted and skipped",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "shuffle seed",
        },
    ],
    outputs: &["train", "eval"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    files: Vec<String>,
    format: String,
    field: String,
    prompt_field: String,
    response_field: String,
    text_unit: String,
    eval_fraction: f64,
    limit: Option<i64>,
    dedup: bool,
    shuffle: bool,
    on_bad_row: String,
    seed: i64,
}

/// Counts and the first messages of skipped rows, for the summary.
#[derive(Default)]
struct Tally {
    rows: u64,
    bad: u64,
    bad_examples: Vec<String>,
    duplicates: u64,
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    if !(0.0..1.0).contains(&p.eval_fraction) {
        return Err(StageError::Params(format!(
            "eval_fraction must be in [0, 1), got {}",
            p.eval_fraction
        )));
    }
    let fields = Fields {
        text: p.field.clone(),
        prompt: p.prompt_field.clone(),
        response: p.response_field.clone(),
    };
    let train_dir = ctx.output("train")?;
    let eval_dir = ctx.output("eval")?;
    let mut train = RecordWriter::create(train_dir)?;
    let mut eval = RecordWriter::create(eval_dir)?;
    let mut tally = Tally::default();
    let mut seen: HashSet<u128> = HashSet::new();
    // Without a shuffle, the limit can stop the read early.
    let early_limit = if p.shuffle { None } else { p.limit };
    let threshold = (p.eval_fraction * (u64::MAX as f64)) as u64;
    ctx.progress.set_length(p.files.len() as u64);

    'files: for (i, file) in p.files.iter().enumerate() {
        ctx.progress.set_position(i as u64);
        ctx.progress.set_message(file);
        let local = if file.contains("://") {
            super::remote::fetch(file, &ctx.scratch.join("downloads"))?
        } else {
            Path::new(file).to_path_buf()
        };
        let mut sink = |line: usize, row: Row| -> Result<bool, StageError> {
            tally.rows += 1;
            let converted = match row {
                Row::Text(text) => Ok(Record::Text { text }),
                Row::Json(value) => convert(&p.format, &value, &fields)
                    .map_err(|e| format!("field `{}`: {}", e.field, e.message)),
                Row::Bad(message) => Err(message),
            };
            let record = match converted {
                Ok(r) => r,
                Err(message) => {
                    let msg = format!("{file}:{line}: {message}");
                    if p.on_bad_row != "skip" {
                        return Err(StageError::Failed(msg));
                    }
                    tally.bad += 1;
                    if tally.bad_examples.len() < 10 {
                        tally.bad_examples.push(msg);
                    }
                    return Ok(true);
                }
            };
            let line_text = record.to_line();
            let hash = blake3::hash(line_text.as_bytes());
            if p.dedup {
                let short = u128::from_le_bytes(hash.as_bytes()[..16].try_into().expect("16"));
                if !seen.insert(short) {
                    tally.duplicates += 1;
                    return Ok(true);
                }
            }
            let h = u64::from_le_bytes(hash.as_bytes()[16..24].try_into().expect("8"));
            if h < threshold {
                eval.write_line(&line_text, record.type_name())?;
            } else {
                train.write_line(&line_text, record.type_name())?;
            }
            Ok(early_limit.is_none_or(|l| (train.len() as i64) < l))
        };
        if !read_rows(&local, &p, &mut sink)? {
            break 'files;
        }
    }
    ctx.progress.set_position(p.files.len() as u64);

    let train_count = train.len();
    if train_count == 0 {
        return Err(StageError::Failed(format!(
            "no records: {} rows read from {} file(s), {} bad, {} duplicates",
            tally.rows,
            p.files.len(),
            tally.bad,
            tally.duplicates
        )));
    }
    let offsets = std::mem::take(&mut train.offsets);
    let train_types = train.finish()?;
    let eval_count = eval.len();
    let eval_types = eval.finish()?;
    let kept = if p.shuffle {
        reorder(train_dir, offsets, p.seed as u64, p.limit)?
    } else {
        train_count
    };
    let summary = json!({
        "files": p.files,
        "format": p.format,
        "rows": tally.rows,
        "bad_rows": tally.bad,
        "bad_row_examples": tally.bad_examples,
        "duplicates": tally.duplicates,
        "train": kept,
        "train_types": train_types,
        "eval": eval_count,
        "eval_types": eval_types,
    });
    write_summary(train_dir, &summary)?;
    write_summary(eval_dir, &summary)?;
    let mut outcome = StageOutcome::default();
    for key in ["rows", "bad_rows", "duplicates", "train", "eval"] {
        outcome.metrics.insert(key.into(), summary[key].clone());
    }
    Ok(outcome)
}

/// One raw row of an input file.
enum Row {
    Text(String),
    Json(Value),
    Bad(String),
}

/// Opens a file, transparently decompressing `.gz`.
fn open(path: &Path) -> Result<Box<dyn Read>, StageError> {
    let f =
        File::open(path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    })
}

/// Streams the rows of one file into `sink` (1-based line or item numbers). Returns false
/// when the sink asked to stop.
fn read_rows(
    path: &Path,
    p: &Params,
    sink: &mut dyn FnMut(usize, Row) -> Result<bool, StageError>,
) -> Result<bool, StageError> {
    let name = path.to_string_lossy();
    let inner = name.strip_suffix(".gz").unwrap_or(&name);
    let ext = Path::new(inner)
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let io = |e: std::io::Error| StageError::io(format!("reading {}", path.display()), e);
    let reader = BufReader::with_capacity(1 << 20, open(path)?);
    match ext.as_str() {
        "jsonl" | "ndjson" => {
            for (i, line) in reader.lines().enumerate() {
                let line = line.map_err(io)?;
                if line.trim().is_empty() {
                    continue;
                }
                let row = match serde_json::from_str::<Value>(&line) {
                    Ok(v) => Row::Json(v),
                    Err(e) => Row::Bad(format!("malformed JSON: {e}")),
                };
                if !sink(i + 1, row)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        "json" => read_json_array(reader, path, sink),
        "parquet" => read_parquet(path, sink),
        "txt" | "text" | "md" | "py" => {
            if p.format != "text" {
                return Err(StageError::Params(format!(
                    "{}: plain text files need format = \"text\" (got \"{}\")",
                    path.display(),
                    p.format
                )));
            }
            read_text(reader, &p.text_unit, sink).map_err(io)
        }
        other => Err(StageError::Params(format!(
            "{}: unsupported file type `.{other}` (supported: .parquet, and .txt, .jsonl, .json, each optionally .gz)",
            path.display()
        ))),
    }
}

/// Parquet rows (as written by pyarrow and the Hugging Face Hub), streamed row group by row
/// group; row numbers stand in for line numbers.
fn read_parquet(
    path: &Path,
    sink: &mut dyn FnMut(usize, Row) -> Result<bool, StageError>,
) -> Result<bool, StageError> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |e: parquet::errors::ParquetError| {
        StageError::Failed(format!(
            "{}: not a readable parquet file: {e}",
            path.display()
        ))
    };
    let file =
        File::open(path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(bad)?;
        if !sink(i + 1, Row::Json(row.to_json_value()))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Plain text as records by paragraph, line or whole file.
fn read_text(
    reader: impl BufRead,
    unit: &str,
    sink: &mut dyn FnMut(usize, Row) -> Result<bool, StageError>,
) -> std::io::Result<bool> {
    let mut buf = String::new();
    let mut start = 1;
    let mut flush = |buf: &mut String, line: usize| -> std::io::Result<bool> {
        let text = buf.trim_matches('\n').to_string();
        buf.clear();
        if text.trim().is_empty() {
            return Ok(true);
        }
        sink(line, Row::Text(text)).map_err(std::io::Error::other)
    };
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        match unit {
            "line" => {
                buf.push_str(&line);
                if !flush(&mut buf, i + 1)? {
                    return Ok(false);
                }
            }
            "paragraph" if line.trim().is_empty() => {
                if !flush(&mut buf, start)? {
                    return Ok(false);
                }
                start = i + 2;
            }
            _ => {
                buf.push_str(&line);
                buf.push('\n');
            }
        }
    }
    flush(&mut buf, start)
}

/// A top-level JSON array, streamed element by element (serde's SeqAccess), so a large
/// `.json` file is never parsed into memory whole. Item numbers stand in for line numbers.
fn read_json_array(
    reader: impl Read,
    path: &Path,
    sink: &mut dyn FnMut(usize, Row) -> Result<bool, StageError>,
) -> Result<bool, StageError> {
    use serde::de::{Deserializer, SeqAccess, Visitor};

    struct Each<'a> {
        sink: &'a mut dyn FnMut(usize, Row) -> Result<bool, StageError>,
        stopped: bool,
        error: Option<StageError>,
    }
    impl<'de> Visitor<'de> for &mut Each<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while let Some(v) = seq.next_element::<Value>()? {
                i += 1;
                match (self.sink)(i, Row::Json(v)) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.stopped = true;
                        // Skip the rest without materializing it.
                        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                        return Ok(());
                    }
                    Err(e) => {
                        self.error = Some(e);
                        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
    }
    let mut each = Each {
        sink,
        stopped: false,
        error: None,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    de.deserialize_seq(&mut each).map_err(|e| {
        StageError::Failed(format!("{}: not a JSON array of rows: {e}", path.display()))
    })?;
    if let Some(e) = each.error {
        return Err(e);
    }
    Ok(!each.stopped)
}

/// Rewrites `records.jsonl` in a seeded random order (keeping `limit` records), reading
/// each line by its offset with pread: memory stays at 8 bytes per record (a memory map
/// would count the whole file as resident).
fn reorder(
    dir: &Path,
    offsets: Vec<u64>,
    seed: u64,
    limit: Option<i64>,
) -> Result<usize, StageError> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let path = dir.join(super::records::RECORDS_FILE);
    let file =
        File::open(&path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?
        .len();
    let mut order: Vec<usize> = (0..offsets.len()).collect();
    Rng::new(seed).fork("source-shuffle").shuffle(&mut order);
    if let Some(l) = limit {
        order.truncate(l.max(0) as usize);
    }
    let tmp = dir.join(".records.shuffled");
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp).map_err(|e| StageError::io(format!("creating {}", tmp.display()), e))?,
    );
    let mut line = Vec::new();
    for &i in &order {
        let start = offsets[i];
        let end = offsets.get(i + 1).copied().unwrap_or(len);
        line.resize((end - start) as usize, 0);
        file.read_exact_at(&mut line, start)
            .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        out.write_all(&line)
            .map_err(|e| StageError::io(format!("writing {}", tmp.display()), e))?;
    }
    out.flush()
        .map_err(|e| StageError::io(format!("writing {}", tmp.display()), e))?;
    drop(out);
    std::fs::rename(&tmp, &path)
        .map_err(|e| StageError::io(format!("renaming {}", tmp.display()), e))?;
    Ok(order.len())
}
