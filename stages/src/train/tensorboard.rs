//! TensorBoard event files for training curves: `tensorboard --logdir cache/logs/tb` shows a
//! study's runs live, named `<pipeline>/<stage>`, and every curve artifact holds the same
//! scalars for good.
//!
//! No maintained crate writes these files (`tensorboard-rs` is unmaintained and pins
//! protobuf 2), so this module is the writer, built on two crates already in the lock file:
//! `crc32c` for the checksums and `prost` (derive only, no codegen: the four messages are
//! declared below with TensorFlow's field numbers) for the protobuf.
//!
//! An event file is a sequence of TFRecords, each
//!
//! ```text
//! u64 length (little endian) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
//! ```
//!
//! with `mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8` (wrapping), and each record's data a
//! `tensorboard.Event`: the first carries `file_version = "brain.Event:2"`, the others a
//! `Summary` of tagged `simple_value` scalars at a step, or a `SessionLog` START.
//!
//! Two writers:
//! - [`curve_events`]: the bytes of the curve artifact's event file, built at the end from
//!   the curve rows. It must be a pure function of the rows (the artifact is content
//!   addressed: same seed, same bits), so its `wall_time` is not the clock but the step: the
//!   event of step `n` says `n` seconds after the Unix epoch. TensorBoard's "relative" time
//!   axis then counts steps; the live files have the real times.
//! - [`LiveWriter`]: appends one event per training step to a new file in the live directory
//!   and hands each record to the kernel at once, so TensorBoard sees steps as they happen.
//!   Each file opens with a `SessionLog` START at the first step it will write: TensorBoard
//!   reads a run directory's files in name order (the names start with the Unix time, so
//!   that is the order they were made) and, on a START after the first, drops what it holds
//!   at or past that step. A run resumed from its step-50 checkpoint thus shows steps 1-50
//!   of the killed run and 51- of the resumed one, not the killed run's orphaned steps
//!   past 50; a run started over (another key for the stage, say) replaces the old curve.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

/// The name of the event file in a curve artifact: fixed, so the artifact is deterministic;
/// `tfevents` in it is what makes TensorBoard read it.
pub const CURVE_FILE: &str = "events.out.tfevents.flow";

/// What `file_version` says in each file's first event: the current event format, which
/// TensorBoard needs to trust `SessionLog` for restarts.
const FILE_VERSION: &str = "brain.Event:2";

/// `tensorboard.Event` (TensorFlow's `event.proto`), the fields flow writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

/// `Event.what`: a oneof, so each is written even when empty.
#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorboard.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value` with its `value` oneof reduced to `simple_value`: a oneof
/// member, so a scalar of exactly 0.0 is still written (a plain proto3 float would be left
/// out, and TensorBoard would see a value of no kind).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "ValueKind", tags = "2")]
    value: Option<ValueKind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 is START.
    #[prost(int32, tag = "1")]
    status: i32,
}

/// The CRC TFRecords carry: CRC-32C (Castagnoli), rotated right by 15 bits and offset, so
/// that a CRC of data that itself holds CRCs is not degenerate.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `data`, framed as TensorFlow's record writer frames it.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn event_record(wall_time: f64, step: u64, what: What) -> Vec<u8> {
    let event = Event {
        wall_time,
        step: i64::try_from(step).unwrap_or(i64::MAX),
        what: Some(what),
    };
    record(&event.encode_to_vec())
}

/// The record of a file's first event, naming the format.
fn version_record(wall_time: f64) -> Vec<u8> {
    event_record(wall_time, 0, What::FileVersion(FILE_VERSION.into()))
}

/// The record of one event holding scalars at a step. TensorBoard stores `simple_value` as
/// f32, so that is the precision a curve has there (curve.csv keeps the f64s).
pub fn scalars_record(wall_time: f64, step: u64, scalars: &[(&str, f64)]) -> Vec<u8> {
    let value = scalars
        .iter()
        .map(|&(tag, v)| SummaryValue {
            tag: tag.to_string(),
            value: Some(ValueKind::SimpleValue(v as f32)),
        })
        .collect();
    event_record(wall_time, step, What::Summary(Summary { value }))
}

/// One row of `curve.csv` (`step,tokens,lr,loss,grad_norm,heldout_loss`), as numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct CurveRow {
    /// The optimizer step the row ends (1-based).
    pub step: u64,
    /// The learning rate of that step.
    pub lr: f64,
    /// The mean training loss of the step's batch.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The held-out loss, on the steps that measured one.
    pub heldout_loss: Option<f64>,
}

impl CurveRow {
    /// Parses one data line of `curve.csv`; None for anything that is not such a line
    /// (the curve is the stage's own text, but a bad line must not panic).
    pub fn parse(line: &str) -> Option<CurveRow> {
        let f: Vec<&str> = line.trim_end().split(',').collect();
        if f.len() != 6 {
            return None;
        }
        Some(CurveRow {
            step: f[0].parse().ok()?,
            lr: f[2].parse().ok()?,
            loss: f[3].parse().ok()?,
            grad_norm: f[4].parse().ok()?,
            heldout_loss: if f[5].is_empty() {
                None
            } else {
                Some(f[5].parse().ok()?)
            },
        })
    }

    /// The row's scalars as TensorBoard tags: `loss`, `lr`, `grad_norm` and, where the row
    /// has one, `heldout_loss`.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
        ];
        if let Some(h) = self.heldout_loss {
            v.push(("heldout_loss", h));
        }
        v
    }
}

/// The bytes of a curve artifact's event file: the version event, then one event per row
/// at its step, `wall_time` = the step in seconds (see the module doc: no clock, so the same
/// rows give the same bytes).
pub fn curve_events(rows: &[CurveRow]) -> Vec<u8> {
    let mut out = version_record(0.0);
    for row in rows {
        out.extend(scalars_record(row.step as f64, row.step, &row.scalars()));
    }
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new event file in a live log directory, as training runs.
pub struct LiveWriter {
    file: File,
    path: PathBuf,
}

impl LiveWriter {
    /// Creates `dir` if needed and a new event file in it, named as TensorFlow names them
    /// (`events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`, never an existing file's
    /// name), and writes the version event and a `SessionLog` START at `first_step`, the
    /// first step this writer will log.
    ///
    /// TensorBoard reads a run's files in name order, and the restart logic needs that to be
    /// the order they were made in; a run resumed within the second its predecessor started
    /// (or after the clock stepped back) would not sort after it by the clock alone, so the
    /// seconds are one more than the newest file's there when the clock is not past them.
    pub fn create(dir: &Path, first_step: u64) -> std::io::Result<LiveWriter> {
        std::fs::create_dir_all(dir)?;
        let now_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let newest = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let secs = name.strip_prefix("events.out.tfevents.")?.get(..10)?;
                secs.parse::<u64>().ok()
            })
            .max();
        let secs = match newest {
            Some(n) if n >= now_secs => n.saturating_add(1),
            _ => now_secs,
        };
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let host = if host.is_empty() { "host".into() } else { host };
        let mut n = 0u32;
        let (file, path) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{secs:010}.{host}.{}.{n}",
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let mut w = LiveWriter { file, path };
        let t = now();
        let mut head = version_record(t);
        head.extend(event_record(
            t,
            first_step,
            What::SessionLog(SessionLog { status: 1 }),
        ));
        w.write(&head)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event with `scalars` at `step`, stamped with the clock, and hands it to
    /// the kernel (one `write`; no fsync: a log, not a commit), so a reader sees it now.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> std::io::Result<()> {
        self.write(&scalars_record(now(), step, scalars))
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the records of an event file back: (data) per record, checking both CRCs.
    fn records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(&bytes[..8]));
            let data = &bytes[12..12 + len];
            let crc = u32::from_le_bytes(bytes[12 + len..16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            out.push(data.to_vec());
            bytes = &bytes[16 + len..];
        }
        out
    }

    #[test]
    fn crc32c_and_its_mask_match_known_values() {
        // The CRC-32C check value of the catalogue ("123456789"), and TensorFlow's masked
        // form of it and of a record length of 9 (as tensorboard's own
        // `pywrap_tensorflow.masked_crc32c` computes them).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&9u64.to_le_bytes()), 0x3971_f937);
        let r = record(b"123456789");
        assert_eq!(r.len(), 9 + 16);
        assert_eq!(&r[..8], &9u64.to_le_bytes());
        assert_eq!(&r[8..12], &0x3971_f937u32.to_le_bytes());
        assert_eq!(&r[12..21], b"123456789");
        assert_eq!(&r[21..], &0xc78a_b0e5u32.to_le_bytes());
    }

    #[test]
    fn curve_events_round_trip_and_keep_zero_scalars() {
        let rows: Vec<CurveRow> = ["1,512,3e-4,6.25,1.5,", "2,1024,0e0,0,0.75,5.5"]
            .iter()
            .map(|l| CurveRow::parse(l).unwrap())
            .collect();
        assert_eq!(rows[1].heldout_loss, Some(5.5));
        let bytes = curve_events(&rows);
        assert_eq!(bytes, curve_events(&rows), "a pure function of the rows");
        let events: Vec<Event> = records(&bytes)
            .iter()
            .map(|d| Event::decode(d.as_slice()).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        let Some(What::Summary(s)) = &events[2].what else {
            panic!("a summary: {:?}", events[2]);
        };
        assert_eq!((events[2].step, events[2].wall_time), (2, 2.0));
        let got: Vec<(&str, Option<ValueKind>)> = s
            .value
            .iter()
            .map(|v| (v.tag.as_str(), v.value.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("loss", Some(ValueKind::SimpleValue(0.0))),
                ("lr", Some(ValueKind::SimpleValue(0.0))),
                ("grad_norm", Some(ValueKind::SimpleValue(0.75))),
                ("heldout_loss", Some(ValueKind::SimpleValue(5.5))),
            ]
        );
    }

    #[test]
    fn malformed_curve_lines_are_skipped_not_panics() {
        for line in [
            "",
            "step,tokens,lr,loss,grad_norm,heldout_loss",
            "1,2,3",
            "x,1,1,1,1,",
            "1,1,1,1,1,1,1",
            "1,1,1,1,1,nan?",
        ] {
            assert_eq!(CurveRow::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn live_files_start_with_a_session_start_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("p/lora[rank=16]");
        let mut a = LiveWriter::create(&live, 11).unwrap();
        a.scalars(11, &[("loss", 2.0), ("tokens_per_s", 900.0)])
            .unwrap();
        let b = LiveWriter::create(&live, 1).unwrap();
        assert!(
            b.path() > a.path(),
            "made later, sorts later: {:?}",
            b.path()
        );
        let events: Vec<Event> = records(&std::fs::read(a.path()).unwrap())
            .iter()
            .map(|d| Event::decode(d.as_slice()).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1].step, 11);
        assert_eq!(
            events[1].what,
            Some(What::SessionLog(SessionLog { status: 1 }))
        );
        assert!(
            events[2].wall_time > 1.0e9,
            "the clock: {}",
            events[2].wall_time
        );
    }
}
