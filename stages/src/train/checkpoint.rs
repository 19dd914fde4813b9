//! Training checkpoints in the stage's scratch directory: trainable tensors, optimizer
//! moments and the loop state, written to a temporary directory, renamed into place, and
//! only then named by `latest.json` (written atomically), so a kill at any instant leaves
//! the previous checkpoint whole. Tensors are f32 safetensors: a resume is bit-exact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kind::StageError;
use crate::model::weights::Tensor;
use crate::train::optim::Optimizer;

/// The loop's state besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Steps done.
    pub step: u64,
    pub tokens: u64,
    /// The curve so far (CSV rows without the header).
    pub curve: Vec<String>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::io(format!("checkpoint {}", path.display()), e)
}

fn write_tensors(path: &Path, tensors: &[Tensor]) -> Result<(), StageError> {
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        None::<HashMap<String, String>>,
        path,
    )
    .map_err(|e| StageError::Failed(format!("writing {}: {e}", path.display())))
}

fn read_tensors(path: &Path) -> Result<Vec<Tensor>, StageError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::Failed(format!("{}: {e}", path.display())))?;
    let mut out: Vec<Tensor> = st
        .iter()
        .map(|(name, v)| Tensor {
            name: name.to_string(),
            shape: v.shape().to_vec(),
            data: v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Saves a checkpoint and drops the previous one.
pub fn save(
    scratch: &Path,
    trainable: &[Tensor],
    opt: &Optimizer,
    state: &LoopState,
) -> Result<(), StageError> {
    let tmp = scratch.join("ckpt.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_tensors(&tmp.join("trainable.safetensors"), trainable)?;
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
    write_tensors(&tmp.join("optimizer.safetensors"), &moments)?;
    let meta = serde_json::json!({
        "state": state,
        "optimizer": {"rule": opt.rule, "weight_decay": opt.weight_decay, "lr_max": opt.lr_max, "step": opt.step},
    });
    std::fs::write(tmp.join("state.json"), meta.to_string()).map_err(io(&tmp))?;
    let dir = scratch.join(format!("ckpt-{:08}", state.step));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest = scratch.join("latest.json");
    let ltmp = scratch.join("latest.json.tmp");
    std::fs::write(
        &ltmp,
        serde_json::json!({"dir": dir.file_name().and_then(|n| n.to_str())}).to_string(),
    )
    .map_err(io(&ltmp))?;
    std::fs::rename(&ltmp, &latest).map_err(io(&latest))?;
    // Older checkpoints are garbage now.
    for e in std::fs::read_dir(scratch).map_err(io(scratch))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ckpt-") && e.path() != dir {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub trainable: Vec<Tensor>,
    pub opt: Optimizer,
    pub state: LoopState,
    pub dir: PathBuf,
}

/// The latest complete checkpoint, if any.
pub fn load(scratch: &Path) -> Result<Option<Checkpoint>, StageError> {
    let latest = scratch.join("latest.json");
    let Ok(text) = std::fs::read_to_string(&latest) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| StageError::Failed(format!("{}: {e}", latest.display())))?;
    let dir = scratch.join(v["dir"].as_str().unwrap_or("?"));
    let meta_path = dir.join("state.json");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).map_err(io(&meta_path))?)
            .map_err(|e| StageError::Failed(format!("{}: {e}", meta_path.display())))?;
    let state: LoopState = serde_json::from_value(meta["state"].clone())
        .map_err(|e| StageError::Failed(format!("{}: {e}", meta_path.display())))?;
    let o = &meta["optimizer"];
    let rule = serde_json::from_value(o["rule"].clone())
        .map_err(|e| StageError::Failed(format!("{}: {e}", meta_path.display())))?;
    let moments = read_tensors(&dir.join("optimizer.safetensors"))?;
    let (m, v): (Vec<Tensor>, Vec<Tensor>) =
        moments.into_iter().partition(|t| t.name.starts_with("m."));
    let opt = Optimizer {
        rule,
        weight_decay: o["weight_decay"].as_f64().unwrap_or(0.0) as f32,
        lr_max: o["lr_max"].as_f64().unwrap_or(0.0) as f32,
        step: o["step"].as_u64().unwrap_or(0),
        m: m.into_iter().map(|t| t.data).collect(),
        v: v.into_iter().map(|t| t.data).collect(),
    };
    Ok(Some(Checkpoint {
        trainable: read_tensors(&dir.join("trainable.safetensors"))?,
        opt,
        state,
        dir,
    }))
}
