//! TensorBoard event files of training stages, read back with the `tensorboard` Python
//! package (pinned in scripts/test): the curve artifact's file and the live files under
//! `cache/logs/tb/<pipeline>/<stage>` must hold exactly the rows of `curve.csv`, the live
//! ones as `tensorboard --logdir cache/logs/tb` shows them (its multiplexer, restarts
//! purged), and the artifact's must be the same bytes on every run.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Workspace, assert_ok};
use serde_json::Value;

/// The sweep member whose curves are checked: a name with `[`, `=` and `]` in it.
const STAGE: &str = "lora[rank=4]";
const PIPELINE: &str = "train-tb";
const STEPS: u64 = 40;

/// A tiny world, tokenizer and fresh model, and a one-member LoRA sweep.
fn pipeline() -> String {
    common::tiny_training_pipeline(
        PIPELINE,
        &format!(
            r#"[stage.lora]
kind = "train-lora"
model = "base"
data = "rows"
heldout = "held_rows"
lr = 1e-2
optimizer = "adamw"
rank = [4]
sweep = ["rank"]
targets = ["attention", "down"]
steps = {STEPS}
global_batch = 8
micro_batch = 4
checkpoint_every = 5
eval_every = 15
"#
        ),
    )
}

/// Reads event files with tensorboard's own readers and prints {run: {tag: [[step, value,
/// wall_time], ...]}}, each value as the bits of its f32 (exact, whatever JSON's float
/// parsing does): `file PATH` reads one file (one run, ""); `logdir DIR` reads a log
/// directory as `tensorboard --logdir DIR` does (the plugin multiplexer: runs named by
/// their path under DIR, files in name order, restarts purged).
const READ: &str = r#"
import json, struct, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
from tensorboard.util import tensor_util

mode, path = sys.argv[1], sys.argv[2]
bits = lambda v: struct.unpack("<I", struct.pack("<f", v))[0]
out = {}
if mode == "file":
    acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0})
    acc.Reload()
    out[""] = {t: [[e.step, bits(e.value), e.wall_time] for e in acc.Scalars(t)]
               for t in acc.Tags()["scalars"]}
else:
    mux = pem.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    mux.AddRunsFromDirectory(path)
    mux.Reload()
    for run in mux.Runs():
        acc = mux.GetAccumulator(run)
        out[run] = {t: [[e.step, bits(float(tensor_util.make_ndarray(e.tensor_proto))), e.wall_time]
                        for e in acc.Tensors(t)]
                    for t in acc.Tags()["tensors"]}
print(json.dumps(out))
"#;

fn read_events(mode: &str, path: &Path) -> Value {
    serde_json::from_str(&common::python(READ, &[mode, path.to_str().unwrap()])).unwrap()
}

/// One row of curve.csv.
struct Row {
    step: u64,
    lr: f64,
    loss: f64,
    grad_norm: f64,
    heldout: Option<f64>,
}

fn curve(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("curve.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Row {
                step: f[0].parse().unwrap(),
                lr: f[2].parse().unwrap(),
                loss: f[3].parse().unwrap(),
                grad_norm: f[4].parse().unwrap(),
                heldout: (!f[5].is_empty()).then(|| f[5].parse().unwrap()),
            }
        })
        .collect()
}

/// (step, value, wall_time) of one tag of one run.
fn series(run: &Value, tag: &str) -> Vec<(u64, f32, f64)> {
    run[tag]
        .as_array()
        .unwrap_or_else(|| panic!("no tag {tag} in {run}"))
        .iter()
        .map(|e| {
            (
                e[0].as_u64().unwrap(),
                f32::from_bits(e[1].as_u64().unwrap() as u32),
                e[2].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Asserts that a run's loss, lr, grad_norm and heldout_loss are exactly the curve's rows
/// (as f32, TensorBoard's precision), each step once and in order.
fn assert_matches_curve(run: &Value, rows: &[Row], what: &str) {
    assert_eq!(rows.len() as u64, STEPS);
    let f32_of = |v: f64| (v as f32).to_bits();
    for (tag, pick) in [
        ("loss", (|r: &Row| r.loss) as fn(&Row) -> f64),
        ("lr", |r: &Row| r.lr),
        ("grad_norm", |r: &Row| r.grad_norm),
    ] {
        let got: Vec<(u64, u32)> = series(run, tag)
            .iter()
            .map(|e| (e.0, e.1.to_bits()))
            .collect();
        let want: Vec<(u64, u32)> = rows.iter().map(|r| (r.step, f32_of(pick(r)))).collect();
        assert_eq!(got, want, "{what}: {tag}");
    }
    let got: Vec<(u64, u32)> = series(run, "heldout_loss")
        .iter()
        .map(|e| (e.0, e.1.to_bits()))
        .collect();
    let want: Vec<(u64, u32)> = rows
        .iter()
        .filter_map(|r| Some((r.step, f32_of(r.heldout?))))
        .collect();
    assert_eq!(
        want.iter().map(|w| w.0).collect::<Vec<_>>(),
        [15, 30, 40],
        "held-out every 15 steps and at the end"
    );
    assert_eq!(got, want, "{what}: heldout_loss");
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(
        v.iter().all(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")),
        "{v:?}"
    );
    v
}

fn live_dir(ws: &Workspace) -> PathBuf {
    ws.cache().join("logs/tb").join(PIPELINE).join(STAGE)
}

/// The live run and the artifact both read back as curve.csv; the live one has tokens/s and
/// real times, the artifact step-derived times. A rerun with another lr replaces the live
/// curve in TensorBoard's view; `flow gc` keeps the live tree while it removes key logs.
#[test]
fn event_files_hold_the_curve_live_and_in_the_artifact() {
    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline());
    let started = unix_now();
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let curve_dir = common::output_named(&ws, &p, STAGE, "curve");
    let rows = curve(&curve_dir);

    // The artifact's file.
    let artifact = curve_dir.join("events.out.tfevents.flow");
    let events = read_events("file", &artifact);
    let run = &events[""];
    assert_matches_curve(run, &rows, "artifact");
    assert!(
        run.get("tokens_per_s").is_none(),
        "no timings in the artifact"
    );
    for (step, _, wall) in series(run, "loss") {
        assert_eq!(wall, step as f64, "wall_time is the step");
    }

    // The live directory, as `tensorboard --logdir cache/logs/tb` sees it.
    let live = live_dir(&ws);
    assert_eq!(event_files(&live).len(), 1);
    let logdir = read_events("logdir", &ws.cache().join("logs/tb"));
    let runs: Vec<&String> = logdir.as_object().unwrap().keys().collect();
    let name = format!("{PIPELINE}/{STAGE}");
    assert_eq!(runs, [&name], "one run, named by pipeline and stage");
    let run = &logdir[&name];
    assert_matches_curve(run, &rows, "live");
    let tps = series(run, "tokens_per_s");
    assert_eq!(tps.len() as u64, STEPS);
    assert!(
        tps.iter().all(|e| e.1.is_finite() && e.1 > 0.0),
        "tokens/s: {tps:?}"
    );
    let finished = unix_now();
    for (_, _, wall) in series(run, "loss") {
        assert!(
            (started - 1.0..=finished + 1.0).contains(&wall),
            "real times: {wall} not in [{started}, {finished}]"
        );
    }

    // Another lr: another key for the same stage. Its file comes after the first and opens
    // with a restart at step 1, so TensorBoard shows the new curve only.
    assert_ok(&ws.flow(&["run", p.to_str().unwrap(), "--set", "stage.lora.lr=0.003"]));
    let show = ws.json(
        &[
            "show",
            p.to_str().unwrap(),
            STAGE,
            "--set",
            "stage.lora.lr=0.003",
        ],
        true,
    );
    let rows2 = curve(Path::new(show[0]["outputs"]["curve"].as_str().unwrap()));
    assert_ne!(rows2[0].lr, rows[0].lr, "the rerun trained with another lr");
    assert_eq!(event_files(&live).len(), 2, "the rerun added a file");
    let logdir = read_events("logdir", &ws.cache().join("logs/tb"));
    assert_matches_curve(&logdir[&name], &rows2, "live after a rerun");

    // gc keeping another pipeline removes this one's keys and their logs, but not the live
    // TensorBoard tree (named by pipeline and stage, not key).
    let before = common::tree(&ws.cache().join("logs/tb"));
    let other = ws.write(
        "other.toml",
        "[pipeline]\nname = \"other\"\n\n[stage.a]\nkind = \"command\"\nrun = \"true\"\n",
    );
    let gc = ws.json(&["gc", "--keep", other.to_str().unwrap()], true);
    assert!(gc[0]["removed"]["logs"].as_u64().unwrap() >= 8, "{gc:?}");
    assert!(gc[0]["removed"]["records"].as_u64().unwrap() >= 8, "{gc:?}");
    assert_eq!(common::tree(&ws.cache().join("logs/tb")), before);
    let key_logs = std::fs::read_dir(ws.cache().join("logs"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_file())
        .count();
    assert_eq!(key_logs, 0, "every key log of the pipeline went");
}

/// Starts `flow run` and kills its process group (-9) once the stage's `latest.json` names
/// a checkpoint at step 10 or later.
fn kill_at_a_checkpoint(ws: &Workspace, p: &Path) {
    let mut cmd = ws.command(&["run", p.to_str().unwrap()]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let scratch = ws.cache().join("scratch");
    'wait: loop {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        for e in std::fs::read_dir(&scratch).into_iter().flatten().flatten() {
            let latest = std::fs::read_to_string(e.path().join("latest.json")).unwrap_or_default();
            let dir = serde_json::from_str::<Value>(&latest)
                .ok()
                .and_then(|v| v["dir"].as_str().map(String::from));
            if dir.is_some_and(|d| d.as_str() >= "ckpt-00000010") {
                break 'wait;
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            panic!("the run finished before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) of the process group this test started.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
}

/// A run killed at a checkpoint and resumed adds a second live file, TensorBoard shows each
/// step once with the final curve's values, and the artifact's event file has the same
/// bytes as an uninterrupted run's (single-threaded there: threads never change bits).
#[test]
fn a_resumed_run_appends_a_live_file_and_the_artifact_keeps_its_bits() {
    let whole = Workspace::new();
    let pw = whole.write("p.toml", &pipeline());
    assert_ok(&whole.flow(&["run", pw.to_str().unwrap(), "--threads", "1"]));

    let ws = Workspace::new();
    let p = ws.write("p.toml", &pipeline());
    kill_at_a_checkpoint(&ws, &p);
    assert_eq!(
        event_files(&live_dir(&ws)).len(),
        1,
        "the killed run's file"
    );
    assert_ok(&ws.flow(&["run", p.to_str().unwrap()]));
    let files = event_files(&live_dir(&ws));
    assert_eq!(files.len(), 2, "the resume appended a file: {files:?}");

    let curve_dir = common::output_named(&ws, &p, STAGE, "curve");
    let artifact = std::fs::read(curve_dir.join("events.out.tfevents.flow")).unwrap();
    let reference = std::fs::read(
        common::output_named(&whole, &pw, STAGE, "curve").join("events.out.tfevents.flow"),
    )
    .unwrap();
    assert!(artifact.len() > 40 * 50, "{} bytes", artifact.len());
    assert!(
        artifact == reference,
        "the artifact's event file: same seed, same bits"
    );

    let rows = curve(&curve_dir);
    let logdir = read_events("logdir", &ws.cache().join("logs/tb"));
    assert_matches_curve(
        &logdir[format!("{PIPELINE}/{STAGE}")],
        &rows,
        "resumed live",
    );
}

/// The records flow writes are byte for byte those of tensorboard's own writer
/// (`EventFileWriter`) for the same event, and tensorboard's CRC agrees with flow's.
#[test]
fn records_match_tensorboards_own_writer() {
    let dir = tempfile::tempdir().unwrap();
    let program = r#"
import glob, sys
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
w = EventFileWriter(sys.argv[1])
for step, loss, lr in [(7, 0.5, 3e-4), (8, 0.0, -1.25)]:
    w.add_event(event_pb2.Event(wall_time=1234.5 + step, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag="loss", simple_value=loss),
               summary_pb2.Summary.Value(tag="lr", simple_value=lr)])))
w.close()
print(glob.glob(sys.argv[1] + "/events.out.tfevents.*")[0])
print(masked_crc32c(b"flow event files"))
"#;
    let out = common::python(program, &[dir.path().to_str().unwrap()]);
    let mut lines = out.lines();
    let written = std::fs::read(lines.next().unwrap()).unwrap();
    let crc: u32 = lines.next().unwrap().trim().parse().unwrap();
    use flow_stages::train::tensorboard::{masked_crc32c, record, scalars_record};
    assert_eq!(masked_crc32c(b"flow event files"), crc);

    // Python's first record is its file_version event (with its own clock): skip it by its
    // length, then the two scalar events must be ours exactly.
    let first = 16 + u64::from_le_bytes(written[..8].try_into().unwrap()) as usize;
    let mut ours = scalars_record(1241.5, 7, &[("loss", 0.5), ("lr", 3e-4)]);
    ours.extend(scalars_record(1242.5, 8, &[("loss", 0.0), ("lr", -1.25)]));
    assert_eq!(&written[first..], &ours[..]);
    // And the version record frames its data as python framed it.
    assert_eq!(
        record(&written[12..first - 4]),
        &written[..first],
        "framing"
    );
}
