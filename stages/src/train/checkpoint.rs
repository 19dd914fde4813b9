//! Training checkpoints in the stage's scratch directory, so that a rerun after a crash, a
//! kill or a restore from a remote snapshot resumes instead of starting over, and never
//! resumes from a damaged checkpoint. Tensors are f32 safetensors: a resume is bit-exact.
//!
//! [`save`] writes in this order, so a crash or power loss at any instant leaves every
//! checkpoint that has its final name whole on disk:
//! 1. leftover `*.tmp` entries of an earlier crash are removed;
//! 2. `trainable.safetensors`, `optimizer.safetensors` and `state.json` are written into
//!    `ckpt.tmp`, each fsynced;
//! 3. `complete.json`, listing each of those files with its size and blake3, is written
//!    last and fsynced, then `ckpt.tmp` itself is fsynced;
//! 4. `ckpt.tmp` is renamed to `ckpt-<step:08>` and the scratch directory fsynced;
//! 5. `latest.json` (`{"dir": "ckpt-<step:08>"}`) is written as `latest.json.tmp`,
//!    fsynced, renamed into place, and the scratch directory fsynced again;
//! 6. the new checkpoint and the newest older complete one are kept; the rest (older ones,
//!    and stale newer ones a fallback left behind) are deleted, each renamed to
//!    `<name>.del.tmp` before it is removed.
//!
//! Every path that is being written or deleted has a component ending in `.tmp`, so a
//! snapshotter that skips those (as the engine's remote checkpoint sync is to) copies only
//! whole checkpoints; [`load`] checks each one anyway, since a snapshot that raced a
//! deletion can still lack files.
//!
//! [`load`] trusts nothing it reads, since the disk may be damaged or restored from a
//! snapshot: it tries the checkpoint `latest.json` names (only a plain `ckpt-<digits>`
//! name is followed), then every other `ckpt-<digits>` directory, newest step first. A
//! checkpoint is good when its `complete.json` lists exactly its three files, each has the
//! listed size and blake3, and they parse (f32 tensors whose bytes match their shapes, a
//! `state.json` whose step is the directory's). The first good one is resumed from; every
//! one skipped is reported with the reason, for the stage's log. None good means training
//! starts from step 0, which ends in the same bits, only later.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpu::precision::LossScale;
use crate::kind::StageError;
use crate::model::weights::Tensor;
use crate::train::optim::{Optimizer, Rule, StateType};

/// The loop's state besides tensors: where a resumed run continues.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Steps done.
    pub step: u64,
    /// Tokens trained on so far (the curve's `tokens` column continues from here).
    pub tokens: u64,
    /// The curve so far (CSV rows without the header).
    pub curve: Vec<String>,
}

const TMP: &str = "ckpt.tmp";
const LATEST: &str = "latest.json";
const LATEST_TMP: &str = "latest.json.tmp";
const COMPLETE: &str = "complete.json";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
/// The files of a checkpoint, each listed in its `complete.json`.
const FILES: [&str; 3] = [TRAINABLE, OPTIMIZER, STATE];
/// The largest `latest.json` or `complete.json` read (they are tiny; a huge one is damage).
const SMALL: u64 = 1 << 16;

/// A file as `complete.json` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Listed {
    size: u64,
    blake3: String,
}

/// `complete.json`: written last, so a checkpoint without it was never finished.
#[derive(Debug, Serialize, Deserialize)]
struct Complete {
    files: BTreeMap<String, Listed>,
}

/// `state.json`.
#[derive(Deserialize)]
struct Meta {
    state: LoopState,
    optimizer: OptMeta,
}

/// The optimizer's scalars in `state.json`.
#[derive(Deserialize)]
struct OptMeta {
    rule: Rule,
    weight_decay: f32,
    lr_max: f32,
    step: u64,
    /// Absent in checkpoints of runs without one (and in those written before f16).
    #[serde(default)]
    loss_scale: Option<LossScale>,
    /// Absent in checkpoints written before `optimizer_state` (f32 moments).
    #[serde(default)]
    state_type: StateType,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::io(format!("checkpoint {}", path.display()), e)
}

fn hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Writes a file and flushes it to the disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<Listed, StageError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(Listed {
        size: bytes.len() as u64,
        blake3: hex(bytes),
    })
}

/// Flushes a directory's entries (a rename into it, a new file in it) to the disk.
fn sync_dir(dir: &Path) -> Result<(), StageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes tensors as safetensors (streamed: one tensor in memory at a time), flushes the
/// file, and lists it by reading it back.
fn write_tensors(path: &Path, tensors: &[Tensor]) -> Result<Listed, StageError> {
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        None::<std::collections::HashMap<String, String>>,
        path,
    )
    .map_err(|e| StageError::Failed(format!("writing {}: {e}", path.display())))?;
    let mut f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let mut hasher = blake3::Hasher::new();
    let size = std::io::copy(&mut f, &mut hasher).map_err(io(path))?;
    Ok(Listed {
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// f32 tensors from safetensors bytes, sorted by name; anything else is an error (the
/// caller names the file).
fn parse_tensors(bytes: &[u8]) -> Result<Vec<Tensor>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(st.len());
    for (name, v) in st.iter() {
        if v.dtype() != safetensors::Dtype::F32 {
            return Err(format!("tensor `{name}` is {:?}, not F32", v.dtype()));
        }
        let bytes = v
            .shape()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(4));
        if bytes != Some(v.data().len()) {
            return Err(format!(
                "tensor `{name}` has {} bytes, not 4 per element of shape {:?}",
                v.data().len(),
                v.shape()
            ));
        }
        out.push(Tensor {
            name: name.to_string(),
            shape: v.shape().to_vec(),
            data: v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The step of a checkpoint directory's name, `ckpt-<digits>`; None for any other name
/// (`..`, a path, a `.tmp` name), which is never followed.
fn ckpt_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoint directories of a scratch directory, newest step first.
fn list_ckpts(scratch: &Path) -> Result<Vec<(u64, String)>, StageError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(scratch).map_err(io(scratch))?.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if let (Some(step), true) = (ckpt_step(&name), is_dir) {
            out.push((step, name));
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    Ok(out)
}

/// Removes whatever is at `path`, a directory or not.
fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Removes the `*.tmp` leftovers of a save or a deletion that a crash interrupted.
fn remove_tmp(scratch: &Path) -> Result<(), StageError> {
    for e in std::fs::read_dir(scratch).map_err(io(scratch))?.flatten() {
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            let path = e.path();
            remove_any(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Deletes a checkpoint: renamed to `<name>.del.tmp` first, so no one sees it half gone
/// under its own name.
fn delete_ckpt(scratch: &Path, name: &str) -> Result<(), StageError> {
    let doomed = scratch.join(format!("{name}.del.tmp"));
    if std::fs::symlink_metadata(&doomed).is_ok() {
        remove_any(&doomed).map_err(io(&doomed))?;
    }
    let path = scratch.join(name);
    std::fs::rename(&path, &doomed).map_err(io(&path))?;
    remove_any(&doomed).map_err(io(&doomed))
}

/// An I/O error for a damage report: a missing file says so plainly.
fn why(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        "missing".into()
    } else {
        e.to_string()
    }
}

/// Reads a whole regular file that must be exactly `size` bytes (so a damaged listing
/// cannot make it read more than the file holds).
fn read_sized(path: &Path, size: u64) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(why)?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() != size {
        return Err(format!("{} bytes, not the {size} listed", meta.len()));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    File::open(path)
        .and_then(|f| f.take(size + 1).read_to_end(&mut bytes))
        .map_err(why)?;
    if bytes.len() as u64 != size {
        return Err(format!("{} bytes, not the {size} listed", bytes.len()));
    }
    Ok(bytes)
}

/// Reads a small file (at most [`SMALL`] bytes) whole.
fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(why)?;
    if !meta.is_file() || meta.len() > SMALL {
        return Err(format!("not a regular file of at most {SMALL} bytes"));
    }
    read_sized(path, meta.len())
}

/// A checkpoint's `complete.json`, which must list exactly the checkpoint's files.
fn read_complete(dir: &Path) -> Result<Complete, String> {
    let bytes = read_small(&dir.join(COMPLETE)).map_err(|e| format!("{COMPLETE}: {e}"))?;
    let complete: Complete =
        serde_json::from_slice(&bytes).map_err(|e| format!("{COMPLETE}: {e}"))?;
    if complete.files.len() != FILES.len() || !FILES.iter().all(|f| complete.files.contains_key(*f))
    {
        return Err(format!(
            "{COMPLETE} does not list exactly {}",
            FILES.join(", ")
        ));
    }
    Ok(complete)
}

/// A cheap check at save time (no hashing): `complete.json` is there and every listed file
/// has its size.
fn looks_complete(dir: &Path) -> bool {
    read_complete(dir).is_ok_and(|c| {
        c.files.iter().all(|(name, l)| {
            std::fs::symlink_metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.len() == l.size)
        })
    })
}

/// Saves a checkpoint (see the module doc for the order of writes), names it in
/// `latest.json`, and keeps the previous complete one beside it.
pub fn save(
    scratch: &Path,
    trainable: &[Tensor],
    opt: &Optimizer,
    state: &LoopState,
) -> Result<(), StageError> {
    remove_tmp(scratch)?;
    let tmp = scratch.join(TMP);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let mut files = BTreeMap::new();
    files.insert(
        TRAINABLE.to_string(),
        write_tensors(&tmp.join(TRAINABLE), trainable)?,
    );
    let moments: Vec<Tensor> = opt
        .m
        .iter()
        .enumerate()
        .map(|(i, m)| Tensor {
            name: format!("m.{i:05}"),
            shape: vec![m.len()],
            data: m.clone(),
        })
        .chain(opt.v.iter().enumerate().map(|(i, v)| Tensor {
            name: format!("v.{i:05}"),
            shape: vec![v.len()],
            data: v.clone(),
        }))
        .collect();
    files.insert(
        OPTIMIZER.to_string(),
        write_tensors(&tmp.join(OPTIMIZER), &moments)?,
    );
    let meta = serde_json::json!({
        "state": state,
        "optimizer": {"rule": opt.rule, "weight_decay": opt.weight_decay, "lr_max": opt.lr_max, "step": opt.step, "loss_scale": opt.loss_scale, "state_type": opt.state_type},
    });
    files.insert(
        STATE.to_string(),
        write_synced(&tmp.join(STATE), meta.to_string().as_bytes())?,
    );
    let complete = serde_json::to_vec(&Complete { files }).expect("complete.json serializes");
    write_synced(&tmp.join(COMPLETE), &complete)?;
    sync_dir(&tmp)?;

    let name = format!("ckpt-{:08}", state.step);
    let dir = scratch.join(&name);
    if std::fs::symlink_metadata(&dir).is_ok() {
        // A stale one (damaged, or from before a fallback): this run rewrites it.
        delete_ckpt(scratch, &name)?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync_dir(scratch)?;
    let ltmp = scratch.join(LATEST_TMP);
    write_synced(
        &ltmp,
        serde_json::json!({ "dir": name }).to_string().as_bytes(),
    )?;
    let latest = scratch.join(LATEST);
    std::fs::rename(&ltmp, &latest).map_err(io(&latest))?;
    sync_dir(scratch)?;

    // Keep this one and the newest complete older one; newer ones are stale (a load fell
    // back past them) and older ones are garbage.
    let mut kept_previous = false;
    for (step, other) in list_ckpts(scratch)? {
        if other == name {
            continue;
        }
        if step < state.step && !kept_previous && looks_complete(&scratch.join(&other)) {
            kept_previous = true;
            continue;
        }
        // One left behind is deleted by a later save.
        let _ = delete_ckpt(scratch, &other);
    }
    Ok(())
}

/// A checkpoint that passed every check, ready to restore.
pub struct Checkpoint {
    /// The trainable tensors (all weights, or the LoRA adapters), sorted by name.
    pub trainable: Vec<Tensor>,
    /// The optimizer with its moments, as it was after `state.step` steps.
    pub opt: Optimizer,
    /// Where the loop continues.
    pub state: LoopState,
    /// The checkpoint's directory, for the log.
    pub dir: PathBuf,
}

/// What [`load`] found: the checkpoint to resume from, if any is good, and why each one
/// tried before it was skipped (for the stage's log: a skipped checkpoint costs time).
pub struct Loaded {
    /// The newest good checkpoint, or None (training starts from step 0).
    pub checkpoint: Option<Checkpoint>,
    /// One line per damaged checkpoint (or `latest.json`) skipped, naming it and why.
    pub skipped: Vec<String>,
}

/// The checkpoint directory `latest.json` names: Ok(None) without one (a first run), Err
/// with why when it is unreadable or names anything but a `ckpt-<digits>` directory.
fn read_latest(scratch: &Path) -> Result<Option<String>, String> {
    let path = scratch.join(LATEST);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    struct Latest {
        dir: String,
    }
    let latest: Latest = read_small(&path)
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("{LATEST} is unreadable ({e})"))?;
    match ckpt_step(&latest.dir) {
        Some(_) => Ok(Some(latest.dir)),
        None => Err(format!(
            "{LATEST} names `{}`, not a checkpoint directory; ignored",
            latest.dir.escape_debug()
        )),
    }
}

/// Verifies and reads one checkpoint directory; Err says what is wrong with it.
fn read_ckpt(scratch: &Path, name: &str) -> Result<Checkpoint, String> {
    let step = ckpt_step(name).ok_or("not a checkpoint name")?;
    let dir = scratch.join(name);
    let complete = read_complete(&dir)?;
    let mut bytes = BTreeMap::new();
    for (file, listed) in &complete.files {
        let b = read_sized(&dir.join(file), listed.size).map_err(|e| format!("{file}: {e}"))?;
        if hex(&b) != listed.blake3 {
            return Err(format!("{file}: blake3 mismatch"));
        }
        bytes.insert(file.as_str(), b);
    }
    let meta: Meta = serde_json::from_slice(&bytes[STATE]).map_err(|e| format!("{STATE}: {e}"))?;
    if meta.state.step != step {
        return Err(format!(
            "{STATE}: step {}, not the directory's {step}",
            meta.state.step
        ));
    }
    let trainable = parse_tensors(&bytes[TRAINABLE]).map_err(|e| format!("{TRAINABLE}: {e}"))?;
    let moments = parse_tensors(&bytes[OPTIMIZER]).map_err(|e| format!("{OPTIMIZER}: {e}"))?;
    let (m, v): (Vec<Tensor>, Vec<Tensor>) =
        moments.into_iter().partition(|t| t.name.starts_with("m."));
    for (prefix, list) in [("m", &m), ("v", &v)] {
        if let Some((i, t)) = list
            .iter()
            .enumerate()
            .find(|(i, t)| t.name != format!("{prefix}.{i:05}"))
        {
            return Err(format!(
                "{OPTIMIZER}: tensor `{}` where `{prefix}.{i:05}` belongs",
                t.name
            ));
        }
    }
    let expected_v = match meta.optimizer.rule {
        Rule::AdamW { .. } => m.len(),
        Rule::LionW { .. } => 0,
    };
    if v.len() != expected_v {
        return Err(format!(
            "{OPTIMIZER}: {} second moments for {} first ones",
            v.len(),
            m.len()
        ));
    }
    let opt = Optimizer {
        rule: meta.optimizer.rule,
        weight_decay: meta.optimizer.weight_decay,
        lr_max: meta.optimizer.lr_max,
        step: meta.optimizer.step,
        loss_scale: meta.optimizer.loss_scale,
        state_type: meta.optimizer.state_type,
        m: m.into_iter().map(|t| t.data).collect(),
        v: v.into_iter().map(|t| t.data).collect(),
    };
    // f32 stores every value as it is: only a narrower type has values to check.
    let st = opt.state_type;
    if st != StateType::F32
        && let Some(x) = opt
            .m
            .iter()
            .chain(&opt.v)
            .flatten()
            .find(|x| st.store(**x).to_bits() != x.to_bits())
    {
        return Err(format!(
            "{OPTIMIZER}: moment {x} is not a {} value, the type `{STATE}` says they are stored in",
            st.name()
        ));
    }
    Ok(Checkpoint {
        trainable,
        opt,
        state: meta.state,
        dir,
    })
}

/// The newest good checkpoint (see the module doc for the order tried and the checks),
/// with a line for each damaged one skipped. Errors only when the scratch directory itself
/// cannot be read or cleaned.
pub fn load(scratch: &Path) -> Result<Loaded, StageError> {
    remove_tmp(scratch)?;
    let mut skipped = Vec::new();
    let mut order = Vec::new();
    match read_latest(scratch) {
        Ok(Some(name)) => order.push(name),
        Ok(None) => {}
        Err(why) => skipped.push(why),
    }
    for (_, name) in list_ckpts(scratch)? {
        if !order.contains(&name) {
            order.push(name);
        }
    }
    for name in order {
        match read_ckpt(scratch, &name) {
            Ok(ck) => {
                return Ok(Loaded {
                    checkpoint: Some(ck),
                    skipped,
                });
            }
            Err(why) => skipped.push(format!("checkpoint {name} is damaged ({why})")),
        }
    }
    Ok(Loaded {
        checkpoint: None,
        skipped,
    })
}

/// Reads the checkpoint a finished artifact holds (a trunk stage's `checkpoint` output: the
/// directory [`save`] wrote into, with its `latest.json`). Unlike [`load`] it never writes
/// (inputs share storage with the cache) and never falls back: an artifact's files are
/// verified by the engine, so anything wrong here is an error, not a reason to start over.
pub fn read_artifact(dir: &Path) -> Result<Checkpoint, StageError> {
    let damaged = |why: String| {
        StageError::Failed(format!(
            "{}: not a usable training checkpoint ({why})",
            dir.display()
        ))
    };
    let name = read_latest(dir)
        .map_err(damaged)?
        .ok_or_else(|| damaged(format!("no {LATEST}")))?;
    read_ckpt(dir, &name).map_err(|why| damaged(format!("{name}: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(x: f32) -> Vec<Tensor> {
        vec![
            Tensor {
                name: "a".into(),
                shape: vec![2, 3],
                data: (0..6).map(|i| x + i as f32).collect(),
            },
            Tensor {
                name: "b".into(),
                shape: vec![4],
                data: vec![-x; 4],
            },
        ]
    }

    fn optimizer(step: u64) -> Optimizer {
        let rule = Rule::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        };
        let mut o = Optimizer::new(rule, 0.1, 1e-3, &[6, 4]);
        o.step = step;
        o.m[0][1] = step as f32 / 3.0;
        o.v[1][2] = 0.5 + step as f32;
        // f16's loss scale is optimizer state too: it must come back as it was.
        o.loss_scale = Some(LossScale {
            scale: 1024.0 / (step + 1) as f32,
            good_steps: step as u32,
        });
        o
    }

    fn state(step: u64) -> LoopState {
        LoopState {
            step,
            tokens: step * 512,
            curve: (1..=step).map(|s| format!("{s},x")).collect(),
        }
    }

    fn save_at(scratch: &Path, step: u64) {
        save(
            scratch,
            &tensors(step as f32),
            &optimizer(step),
            &state(step),
        )
        .unwrap();
    }

    fn names(scratch: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(scratch)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The step loaded, and the lines of checkpoints skipped.
    fn loaded(scratch: &Path) -> (Option<u64>, Vec<String>) {
        let l = load(scratch).unwrap();
        if let Some(ck) = &l.checkpoint {
            let step = ck.state.step;
            assert_eq!(ck.trainable, tensors(step as f32));
            assert_eq!(ck.opt, optimizer(step));
            assert_eq!(ck.state, state(step));
        }
        (l.checkpoint.map(|c| c.state.step), l.skipped)
    }

    #[test]
    fn the_previous_checkpoint_is_kept_and_used_when_the_newest_is_damaged() {
        let root = tempfile::tempdir().unwrap();
        let scratch = root.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        for step in [5, 10, 15] {
            save_at(&scratch, step);
        }
        assert_eq!(
            names(&scratch),
            ["ckpt-00000010", "ckpt-00000015", "latest.json"],
            "the newest two checkpoints, no temporaries"
        );
        for name in ["ckpt-00000010", "ckpt-00000015"] {
            assert_eq!(
                names(&scratch.join(name)),
                [COMPLETE, OPTIMIZER, STATE, TRAINABLE]
            );
        }
        assert_eq!(loaded(&scratch), (Some(15), vec![]));

        // A truncated optimizer file: the older checkpoint, with the reason.
        let opt = scratch.join("ckpt-00000015").join(OPTIMIZER);
        let len = std::fs::metadata(&opt).unwrap().len();
        File::options()
            .write(true)
            .open(&opt)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let (step, skipped) = loaded(&scratch);
        assert_eq!(step, Some(10));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].starts_with("checkpoint ckpt-00000015 is damaged (optimizer.safetensors: "),
            "{skipped:?}"
        );

        // Saving again over the damaged one replaces it.
        save_at(&scratch, 15);
        assert_eq!(loaded(&scratch), (Some(15), vec![]));
    }

    #[test]
    fn latest_json_naming_anything_but_a_checkpoint_directory_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let scratch = root.path().join("scratch");
        let other = root.path().join("other");
        for d in [&scratch, &other] {
            std::fs::create_dir(d).unwrap();
        }
        save_at(&scratch, 10);
        // A good checkpoint outside the scratch directory.
        save_at(&other, 99);
        let latest = scratch.join(LATEST);
        for dir in ["../other/ckpt-00000099", "../../etc", "/etc", "ckpt-x"] {
            std::fs::write(&latest, serde_json::json!({ "dir": dir }).to_string()).unwrap();
            let (step, skipped) = loaded(&scratch);
            assert_eq!(step, Some(10), "{dir}");
            assert_eq!(
                skipped,
                [format!(
                    "latest.json names `{dir}`, not a checkpoint directory; ignored"
                )]
            );
        }
        // Garbage in latest.json: a scan finds the checkpoint.
        std::fs::write(&latest, "{\"dir\": \"ckpt-000").unwrap();
        let (step, skipped) = loaded(&scratch);
        assert_eq!(step, Some(10));
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].starts_with("latest.json is unreadable ("),
            "{skipped:?}"
        );
        // No latest.json: the scan, and nothing to report.
        std::fs::remove_file(&latest).unwrap();
        assert_eq!(loaded(&scratch), (Some(10), vec![]));
    }

    #[test]
    fn with_every_checkpoint_damaged_there_is_none_and_each_is_named() {
        let root = tempfile::tempdir().unwrap();
        let scratch = root.path();
        save_at(scratch, 5);
        save_at(scratch, 10);
        // Flipped bytes (same size) in one, no complete.json in the other.
        let t = scratch.join("ckpt-00000010").join(TRAINABLE);
        let mut bytes = std::fs::read(&t).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n - 8..] {
            *b ^= 0xff;
        }
        std::fs::write(&t, bytes).unwrap();
        std::fs::remove_file(scratch.join("ckpt-00000005").join(COMPLETE)).unwrap();
        // Leftovers of a crash mid-save and mid-delete.
        std::fs::create_dir_all(scratch.join(TMP).join("x")).unwrap();
        std::fs::create_dir(scratch.join("ckpt-00000001.del.tmp")).unwrap();
        std::fs::write(scratch.join(LATEST_TMP), "{").unwrap();
        let (step, skipped) = loaded(scratch);
        assert_eq!(step, None);
        assert_eq!(
            skipped,
            [
                "checkpoint ckpt-00000010 is damaged (trainable.safetensors: blake3 mismatch)",
                "checkpoint ckpt-00000005 is damaged (complete.json: missing)",
            ]
        );
        assert_eq!(
            names(scratch),
            ["ckpt-00000005", "ckpt-00000010", "latest.json"],
            "leftover temporaries are removed"
        );
    }

    /// bf16 optimizer state comes back as it was saved, type included; a checkpoint whose
    /// moments are not values of the type it names is damaged, skipped with a line saying so.
    #[test]
    fn bf16_moments_round_trip_and_other_values_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let scratch = root.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let mut opt = optimizer(3).with_state_type(StateType::Bf16);
        for x in opt.m.iter_mut().chain(opt.v.iter_mut()).flatten() {
            *x = StateType::Bf16.store(*x + 0.1);
        }
        save(&scratch, &tensors(3.0), &opt, &state(3)).unwrap();
        let back = load(&scratch).unwrap().checkpoint.expect("a checkpoint");
        assert_eq!(back.opt, opt);
        assert_eq!(back.opt.state_type, StateType::Bf16);
        opt.m[0][0] = 1.0 / 3.0;
        save(&scratch, &tensors(4.0), &opt, &state(4)).unwrap();
        let l = load(&scratch).unwrap();
        assert_eq!(
            l.checkpoint.map(|c| c.state.step),
            Some(3),
            "{:?}",
            l.skipped
        );
        assert!(
            l.skipped.iter().any(|s| s.contains("is not a bf16 value")),
            "{:?}",
            l.skipped
        );
    }

    #[test]
    fn tensors_that_are_not_f32_are_an_error_not_a_panic() {
        let data = [0u8; 6];
        let half =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3], &data).unwrap();
        let bytes = safetensors::serialize([("h", half)], None).unwrap();
        assert_eq!(
            parse_tensors(&bytes).unwrap_err(),
            "tensor `h` is F16, not F32"
        );
        let good = parse_tensors(
            &safetensors::serialize(tensors(1.0).iter().map(|t| (t.name.as_str(), t)), None)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(good, tensors(1.0));
    }
}
