//! The `pack` kind: token documents into fixed-length training rows.
//!
//! - `cpt`: documents (each `[BOS] ... [EOS]`) are concatenated and cut into `seq_len`
//!   windows; the remainder is dropped or padded; `total_tokens` repeats the corpus (each pass
//!   in a new order) up to a budget, as the paper repeats OpenWebMath to 20B tokens.
//! - `ift`: examples are placed into rows by first-fit-decreasing (a max segment tree finds
//!   the first row with room in O(log rows)); prompt tokens are masked from the loss unless
//!   `train_on_prompt`; overlong examples are truncated or dropped.
//!
//! Output shards, each `rows x seq_len`, little-endian, mmap-able:
//! `input_ids-NNNNN.bin` (u16 or u32 as the tokens), `loss_mask-NNNNN.bin` (u8: 1 where the
//! token is a training target), `seq_ids-NNNNN.bin` (u16: 1.. per document within the row,
//! 0 for padding; training may forbid attention across different ids), and `summary.json`.
//! Rows are shuffled with the seed. Rows are planned first and written one at a time, so the
//! packed corpus is never held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::rng::Rng;
use super::tokens::TokenFile;
use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "pack"`.
pub static KIND: Kind = Kind {
    name: "pack",
    version: 1,
    doc: "packs token documents into seq_len rows (CPT windows or IFT first-fit-decreasing) with loss masks",
    params: &[
        Param {
            name: "tokens",
            ty: ParamType::Input,
            default: Default::Required,
            doc: "a tokenize stage's `tokens` output",
        },
        Param {
            name: "seq_len",
            ty: ParamType::Int,
            default: Default::Required,
            doc: "tokens per row",
        },
        Param {
            name: "mode",
            ty: ParamType::Choice(&["cpt", "ift"]),
            default: Default::Value("\"cpt\""),
            doc: "cpt: concatenate and cut; ift: one or more whole examples per row",
        },
        Param {
            name: "remainder",
            ty: ParamType::Choice(&["drop", "pad"]),
            default: Default::Value("\"drop\""),
            doc: "cpt: what to do with the last partial window",
        },
        Param {
            name: "total_tokens",
            ty: ParamType::Int,
            default: Default::Optional,
            doc: "cpt: repeat the corpus (reshuffled each pass) until this many tokens",
        },
        Param {
            name: "train_on_prompt",
            ty: ParamType::Bool,
            default: Default::Value("false"),
            doc: "ift: also train on prompt tokens",
        },
        Param {
            name: "overlong",
            ty: ParamType::Choice(&["truncate", "drop"]),
            default: Default::Value("\"truncate\""),
            doc: "ift: examples longer than seq_len are cut to it or left out (counted)",
        },
        Param {
            name: "shuffle",
            ty: ParamType::Bool,
            default: Default::Value("true"),
            doc: "shuffle rows (and cpt document order) with the seed",
        },
        Param {
            name: "rows_per_shard",
            ty: ParamType::Int,
            default: Default::Value("8192"),
            doc: "rows per shard file",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "shuffle seed",
        },
    ],
    outputs: &["packed"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    seq_len: i64,
    mode: String,
    remainder: String,
    total_tokens: Option<i64>,
    train_on_prompt: bool,
    overlong: String,
    shuffle: bool,
    rows_per_shard: i64,
    seed: i64,
}

/// `summary.json` of a packed artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackSummary {
    pub mode: String,
    pub seq_len: usize,
    pub dtype: String,
    pub rows: usize,
    /// Shard file stems (`input_ids-00000` ...) and their row counts.
    pub shards: Vec<(String, usize)>,
    /// Non-pad tokens and training targets (mask = 1).
    pub tokens: u64,
    pub target_tokens: u64,
    /// Non-pad fraction of all row slots.
    pub efficiency: f64,
    pub examples: u64,
    pub truncated: u64,
    pub dropped: u64,
    /// Passes over the corpus (cpt with total_tokens).
    pub epochs: u64,
    pub pad_id: u32,
}

/// How the rows are made, decided before any is written; rows are then built one at a time
/// in their final (shuffled) order straight into the shards, so memory holds the plan
/// (12 bytes per document and pass for CPT, 4 per example for IFT) and one row, never the
/// packed corpus.
enum Plan {
    /// Row `r` is tokens `r*seq_len..` of the concatenation of `order` (document indices,
    /// pass after pass); `starts[k]` is where entry `k` begins in that stream.
    Cpt {
        order: Vec<u32>,
        starts: Vec<u64>,
        stream: u64,
        rows: usize,
    },
    /// The examples of each row, in placement order.
    Ift { rows: Vec<Vec<u32>> },
}

impl Plan {
    fn rows(&self) -> usize {
        match self {
            Plan::Cpt { rows, .. } => *rows,
            Plan::Ift { rows } => rows.len(),
        }
    }
}

/// One row being written (reused across rows).
#[derive(Default)]
struct Row {
    ids: Vec<u32>,
    mask: Vec<u8>,
    seq: Vec<u16>,
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let p: Params = ctx.typed_params()?;
    if p.seq_len < 2 || p.rows_per_shard < 1 {
        return Err(StageError::Params(format!(
            "seq_len must be >= 2 and rows_per_shard >= 1 (got {} and {})",
            p.seq_len, p.rows_per_shard
        )));
    }
    let input = &ctx
        .inputs
        .get("tokens")
        .ok_or_else(|| StageError::Params("missing `tokens` input".into()))?
        .artifacts[0];
    let tf = TokenFile::open(&input.dir)?;
    if tf.docs() == 0 {
        return Err(StageError::Failed(format!(
            "`{}` holds no documents",
            input.stage
        )));
    }
    let seq_len = p.seq_len as usize;
    let rng = Rng::new(p.seed as u64).fork("pack");
    let mut summary = PackSummary {
        mode: p.mode.clone(),
        seq_len,
        dtype: tf.meta.dtype.clone(),
        rows: 0,
        shards: Vec::new(),
        tokens: 0,
        target_tokens: 0,
        efficiency: 0.0,
        examples: tf.docs() as u64,
        truncated: 0,
        dropped: 0,
        epochs: 1,
        pad_id: tf.meta.pad_id,
    };
    let plan = if p.mode == "cpt" {
        plan_cpt(&tf, &p, seq_len, &rng, &mut summary)
    } else {
        plan_ift(&tf, &p, seq_len, &mut summary)
    };
    let nrows = plan.rows();
    if nrows == 0 {
        return Err(StageError::Failed(if p.mode == "cpt" {
            format!(
                "no rows: {} tokens do not fill one row of {seq_len} (use remainder = \"pad\")",
                tf.meta.tokens
            )
        } else {
            format!(
                "no rows: all {} examples are longer than seq_len = {seq_len} and were dropped",
                summary.dropped
            )
        }));
    }
    let mut order: Vec<usize> = (0..nrows).collect();
    if p.shuffle {
        rng.fork("rows").shuffle(&mut order);
    }
    let out = ctx.output("packed")?;
    let mut row = Row::default();
    ctx.progress.set_length(nrows as u64);
    for (n, chunk) in order.chunks(p.rows_per_shard as usize).enumerate() {
        let mut shard = Shard::create(out, n, &tf.meta.dtype)?;
        for &r in chunk {
            build_row(&tf, &plan, r, seq_len, p.train_on_prompt, &mut row)?;
            summary.tokens += row.ids.len() as u64;
            summary.target_tokens += row.mask.iter().map(|&m| m as u64).sum::<u64>();
            shard.write(&row, seq_len, tf.meta.pad_id)?;
        }
        shard.finish()?;
        summary.shards.push((format!("{n:05}"), chunk.len()));
        ctx.progress
            .set_position(((n + 1) * p.rows_per_shard as usize).min(nrows) as u64);
    }
    summary.rows = nrows;
    summary.efficiency = summary.tokens as f64 / (nrows * seq_len) as f64;
    let text = serde_json::to_string_pretty(&summary).expect("summary serializes");
    std::fs::write(out.join("summary.json"), text)
        .map_err(|e| StageError::io("writing summary.json", e))?;
    let mut outcome = StageOutcome::default();
    outcome.metrics.insert("rows".into(), json!(summary.rows));
    outcome
        .metrics
        .insert("tokens".into(), json!(summary.tokens));
    outcome
        .metrics
        .insert("efficiency".into(), json!(summary.efficiency));
    outcome
        .metrics
        .insert("truncated".into(), json!(summary.truncated));
    outcome
        .metrics
        .insert("dropped".into(), json!(summary.dropped));
    Ok(outcome)
}

/// Concatenate and cut: as many passes over the corpus (each in its own seeded order) as the
/// token budget needs, else one.
fn plan_cpt(tf: &TokenFile, p: &Params, seq_len: usize, rng: &Rng, s: &mut PackSummary) -> Plan {
    let corpus = tf.meta.tokens;
    let l = seq_len as u64;
    let (rows, passes) = match p.total_tokens {
        Some(budget) => {
            let rows = (budget.max(0) as u64).div_ceil(l);
            (rows as usize, (rows * l).div_ceil(corpus.max(1)).max(1))
        }
        None => {
            let full = corpus / l;
            let pad = p.remainder == "pad" && !corpus.is_multiple_of(l);
            ((full + pad as u64) as usize, 1)
        }
    };
    let mut order = Vec::with_capacity(tf.docs() * passes as usize);
    for pass in 0..passes {
        let mut docs: Vec<u32> = (0..tf.docs() as u32).collect();
        if p.shuffle {
            rng.fork(&format!("docs-{pass}")).shuffle(&mut docs);
        }
        order.extend(docs);
    }
    let mut starts = Vec::with_capacity(order.len());
    let mut stream = 0u64;
    for &d in &order {
        starts.push(stream);
        stream += tf.doc_range(d as usize).len() as u64;
    }
    s.epochs = passes;
    Plan::Cpt {
        order,
        starts,
        stream,
        rows,
    }
}

/// First-fit-decreasing: longest examples first, each into the first row with room.
fn plan_ift(tf: &TokenFile, p: &Params, seq_len: usize, s: &mut PackSummary) -> Plan {
    let mut lens: Vec<(usize, usize)> =
        (0..tf.docs()).map(|i| (tf.doc_range(i).len(), i)).collect();
    // Longest first; ties by document index, so the order is deterministic.
    lens.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut tree = FirstFit::new(lens.len(), seq_len);
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for &(len, i) in &lens {
        let len = if len > seq_len {
            if p.overlong == "drop" {
                s.dropped += 1;
                continue;
            }
            s.truncated += 1;
            seq_len
        } else {
            len
        };
        let r = tree.place(len);
        if r == rows.len() {
            rows.push(Vec::new());
        }
        rows[r].push(i as u32);
    }
    s.examples = lens.len() as u64 - s.dropped;
    Plan::Ift { rows }
}

/// Fills `row` with row `r` of the plan (unpadded).
fn build_row(
    tf: &TokenFile,
    plan: &Plan,
    r: usize,
    seq_len: usize,
    train_on_prompt: bool,
    row: &mut Row,
) -> Result<(), StageError> {
    row.ids.clear();
    row.mask.clear();
    row.seq.clear();
    match plan {
        Plan::Cpt {
            order,
            starts,
            stream,
            ..
        } => {
            let start = (r * seq_len) as u64;
            let end = (start + seq_len as u64).min(*stream);
            let mut k = starts.partition_point(|&s| s <= start) - 1;
            let mut pos = start;
            let mut id = 0u16;
            while pos < end {
                let doc = tf.doc_range(order[k] as usize);
                let from = (pos - starts[k]) as usize;
                let take = (doc.len() - from).min((end - pos) as usize);
                // A document cut by the row boundary continues with id 1 in the next row.
                id += 1;
                tf.extend_range(doc.start + from..doc.start + from + take, &mut row.ids)?;
                row.mask.extend(std::iter::repeat_n(1u8, take));
                row.seq.extend(std::iter::repeat_n(id, take));
                pos += take as u64;
                k += 1;
            }
        }
        Plan::Ift { rows } => {
            for (n, &d) in rows[r].iter().enumerate() {
                let d = d as usize;
                let doc = tf.doc_range(d);
                let len = doc.len().min(seq_len);
                let prompt = tf.prompt_len(d) as usize;
                tf.extend_range(doc.start..doc.start + len, &mut row.ids)?;
                // The first token of an example is never a target: nothing of it precedes it.
                row.mask
                    .extend((0..len).map(|k| (k > 0 && (train_on_prompt || k >= prompt)) as u8));
                row.seq.extend(std::iter::repeat_n(n as u16 + 1, len));
            }
        }
    }
    Ok(())
}

/// A max segment tree over row capacities: `place(len)` returns the lowest-index row whose
/// free space is at least `len` (opening a new row when none has room) in O(log rows).
struct FirstFit {
    size: usize,
    free: Vec<usize>,
    seq_len: usize,
    used: usize,
}

impl FirstFit {
    fn new(max_rows: usize, seq_len: usize) -> FirstFit {
        let size = max_rows.max(1).next_power_of_two();
        FirstFit {
            size,
            free: vec![seq_len; 2 * size],
            seq_len,
            used: 0,
        }
    }

    fn place(&mut self, len: usize) -> usize {
        debug_assert!(len <= self.seq_len);
        let mut node = 1;
        while node < self.size {
            node = if self.free[2 * node] >= len {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let row = node - self.size;
        self.used = self.used.max(row + 1);
        self.free[node] -= len;
        while node > 1 {
            node /= 2;
            self.free[node] = self.free[2 * node].max(self.free[2 * node + 1]);
        }
        row
    }
}

/// The three files of one shard, written row by row.
struct Shard {
    ids: BufWriter<File>,
    mask: BufWriter<File>,
    seq: BufWriter<File>,
    path: std::path::PathBuf,
    wide: bool,
}

impl Shard {
    fn create(dir: &Path, n: usize, dtype: &str) -> Result<Shard, StageError> {
        let open = |name: String| -> Result<BufWriter<File>, StageError> {
            let path = dir.join(name);
            File::create(&path)
                .map(|f| BufWriter::with_capacity(1 << 20, f))
                .map_err(|e| StageError::io(format!("creating {}", path.display()), e))
        };
        Ok(Shard {
            ids: open(format!("input_ids-{n:05}.bin"))?,
            mask: open(format!("loss_mask-{n:05}.bin"))?,
            seq: open(format!("seq_ids-{n:05}.bin"))?,
            path: dir.join(format!("input_ids-{n:05}.bin")),
            wide: dtype == "u32",
        })
    }

    /// Writes one row, padded to `seq_len` (pad id, mask 0, sequence id 0).
    fn write(&mut self, row: &Row, seq_len: usize, pad: u32) -> Result<(), StageError> {
        let path = &self.path;
        let err = |e| StageError::io(format!("writing {}", path.display()), e);
        for k in 0..seq_len {
            let t = row.ids.get(k).copied().unwrap_or(pad);
            if self.wide {
                self.ids.write_all(&t.to_le_bytes()).map_err(err)?;
            } else {
                self.ids.write_all(&(t as u16).to_le_bytes()).map_err(err)?;
            }
            self.mask
                .write_all(&[row.mask.get(k).copied().unwrap_or(0)])
                .map_err(err)?;
            self.seq
                .write_all(&row.seq.get(k).copied().unwrap_or(0).to_le_bytes())
                .map_err(err)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), StageError> {
        let path = self.path.clone();
        for w in [&mut self.ids, &mut self.mask, &mut self.seq] {
            w.flush()
                .map_err(|e| StageError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// A packed artifact opened for reading (training, tests).
pub struct Packed {
    pub summary: PackSummary,
    dir: std::path::PathBuf,
}

/// One row as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRow {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub seq: Vec<u16>,
}

impl Packed {
    pub fn open(dir: &Path) -> Result<Packed, StageError> {
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        let summary = serde_json::from_str(&text)
            .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
        Ok(Packed {
            summary,
            dir: dir.to_path_buf(),
        })
    }

    /// Every row, in stored order (small artifacts; training maps shards instead).
    pub fn rows(&self) -> Result<Vec<PackedRow>, StageError> {
        let l = self.summary.seq_len;
        let wide = self.summary.dtype == "u32";
        let read = |name: String| {
            let p = self.dir.join(name);
            std::fs::read(&p).map_err(|e| StageError::io(format!("reading {}", p.display()), e))
        };
        let mut out = Vec::new();
        for (stem, n) in &self.summary.shards {
            let ids = read(format!("input_ids-{stem}.bin"))?;
            let mask = read(format!("loss_mask-{stem}.bin"))?;
            let seq = read(format!("seq_ids-{stem}.bin"))?;
            for r in 0..*n {
                let ids_row: Vec<u32> = if wide {
                    ids[r * l * 4..(r + 1) * l * 4]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                        .collect()
                } else {
                    ids[r * l * 2..(r + 1) * l * 2]
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes(c.try_into().expect("2")) as u32)
                        .collect()
                };
                out.push(PackedRow {
                    ids: ids_row,
                    mask: mask[r * l..(r + 1) * l].to_vec(),
                    seq: seq[r * l * 2..(r + 1) * l * 2]
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes(c.try_into().expect("2")))
                        .collect(),
                });
            }
        }
        Ok(out)
    }
}

/// Random access to a packed artifact's rows (positioned reads; shards stay on disk).
pub struct RowReader {
    seq_len: usize,
    wide: bool,
    /// (first row, rows, input_ids, loss_mask, seq_ids) per shard.
    shards: Vec<(usize, usize, File, File, File)>,
    pub rows: usize,
}

impl Packed {
    /// Opens every shard for positioned reads.
    pub fn reader(&self) -> Result<RowReader, StageError> {
        let open = |name: String| {
            let p = self.dir.join(name);
            File::open(&p).map_err(|e| StageError::io(format!("opening {}", p.display()), e))
        };
        let mut shards = Vec::new();
        let mut first = 0;
        for (stem, n) in &self.summary.shards {
            shards.push((
                first,
                *n,
                open(format!("input_ids-{stem}.bin"))?,
                open(format!("loss_mask-{stem}.bin"))?,
                open(format!("seq_ids-{stem}.bin"))?,
            ));
            first += n;
        }
        Ok(RowReader {
            seq_len: self.summary.seq_len,
            wide: self.summary.dtype == "u32",
            shards,
            rows: first,
        })
    }
}

impl RowReader {
    /// Row `i` (0-based over all shards).
    pub fn row(&self, i: usize) -> Result<PackedRow, StageError> {
        use std::os::unix::fs::FileExt;
        let l = self.seq_len;
        let (first, _, ids, mask, seq) = self
            .shards
            .iter()
            .find(|(f, n, ..)| i >= *f && i < f + n)
            .ok_or_else(|| {
                StageError::Failed(format!("row {i} is past the end ({} rows)", self.rows))
            })?;
        let r = (i - first) as u64;
        let read = |f: &File, width: usize| -> Result<Vec<u8>, StageError> {
            let mut buf = vec![0u8; l * width];
            f.read_exact_at(&mut buf, r * (l * width) as u64)
                .map_err(|e| StageError::io(format!("reading packed row {i}"), e))?;
            Ok(buf)
        };
        let ids = if self.wide {
            read(ids, 4)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                .collect()
        } else {
            read(ids, 2)?
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().expect("2")) as u32)
                .collect()
        };
        Ok(PackedRow {
            ids,
            mask: read(mask, 1)?,
            seq: read(seq, 2)?
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().expect("2")))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::FirstFit;

    #[test]
    fn first_fit_takes_the_lowest_row_with_room() {
        let mut ff = FirstFit::new(8, 10);
        assert_eq!(ff.place(7), 0);
        assert_eq!(ff.place(5), 1);
        assert_eq!(ff.place(3), 0); // row 0 has exactly 3 left
        assert_eq!(ff.place(4), 1);
        assert_eq!(ff.place(2), 2);
        assert_eq!(ff.place(1), 1);
        assert_eq!(ff.used, 3);
    }
}
