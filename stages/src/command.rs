//! The `command` kind: an external program with declared inputs and outputs, like a DVC stage.
//!
//! The program runs under `sh -c` with its inputs and output directory in environment
//! variables; whatever it leaves in `$FLOW_OUT` is the stage's artifact.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::kind::{Default, Kind, Param, ParamType, StageContext, StageError, StageOutcome};

/// Registered as `kind = "command"`.
pub static KIND: Kind = Kind {
    name: "command",
    version: 1,
    doc: "runs `sh -c RUN` with `FLOW_IN_<NAME>`, `FLOW_OUT`, `FLOW_SCRATCH` and `FLOW_SEED` set",
    params: &[
        Param {
            name: "run",
            ty: ParamType::NonEmptyStr,
            default: Default::Required,
            doc: "the shell command, run by `sh -c` in the pipeline file's directory",
        },
        Param {
            name: "inputs",
            ty: ParamType::InputMap,
            default: Default::Value("{}"),
            doc: "NAME = \"stage\" sets FLOW_IN_NAME to its output directory; a list (or a \
                  group) gives a directory with one entry per member stage",
        },
        Param {
            name: "env",
            ty: ParamType::StrMap,
            default: Default::Value("{}"),
            doc: "extra environment variables (part of the cache key)",
        },
        Param {
            name: "outputs",
            ty: ParamType::List(&ParamType::Str),
            default: Default::Value("[]"),
            doc: "paths under $FLOW_OUT that must exist when the command ends",
        },
        Param {
            name: "metrics",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "a JSON object file under $FLOW_OUT whose entries become the stage's metrics",
        },
        Param {
            name: "workdir",
            ty: ParamType::Str,
            default: Default::Optional,
            doc: "working directory of the command (default: the pipeline file's directory)",
        },
        Param {
            name: "seed",
            ty: ParamType::Int,
            default: Default::PipelineSeed,
            doc: "exported as FLOW_SEED (default: the pipeline's seed)",
        },
    ],
    outputs: &["out"],
    uses_device: false,
    unkeyed: &[],
    run,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    run: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    outputs: Vec<String>,
    metrics: Option<String>,
    workdir: Option<String>,
    seed: i64,
}

fn run(ctx: &StageContext) -> Result<StageOutcome, StageError> {
    let params: Params = ctx.typed_params()?;
    let out = ctx.output("out")?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.log)
        .map_err(|e| StageError::io(format!("opening log {}", ctx.log.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| StageError::io("duplicating the log handle", e))?;

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&params.run)
        .env("FLOW_OUT", out)
        .env("FLOW_SCRATCH", ctx.scratch)
        .env("FLOW_SEED", params.seed.to_string())
        .env("FLOW_THREADS", ctx.threads.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(dir) = &params.workdir {
        cmd.current_dir(dir);
    }
    for (name, slot) in ctx.inputs {
        let Some(var) = name.strip_prefix("inputs.") else {
            continue;
        };
        let value = if slot.list {
            let dir = ctx.scratch.join("inputs").join(var);
            link_members(&dir, slot)?;
            dir
        } else {
            slot.artifacts[0].dir.clone()
        };
        cmd.env(format!("FLOW_IN_{}", var.to_uppercase()), value);
    }
    cmd.envs(&params.env);
    let status = crate::process::GroupChild::spawn(&mut cmd)
        .and_then(|child| child.wait())
        .map_err(|e| StageError::io("running sh", e))?;
    if !status.success() {
        return Err(StageError::Failed(format!("command exited with {status}")));
    }
    for declared in &params.outputs {
        if !out.join(declared).exists() {
            return Err(StageError::Failed(format!(
                "declared output `{declared}` was not written to $FLOW_OUT"
            )));
        }
    }
    let mut outcome = StageOutcome::default();
    if let Some(file) = &params.metrics {
        outcome.metrics = read_metrics(&out.join(file))?;
    }
    Ok(outcome)
}

/// A list input becomes a directory of symlinks named after the member stages, so a shell
/// command can loop over `$FLOW_IN_NAME/*` and still know which stage each came from.
fn link_members(dir: &Path, slot: &crate::InputSlot) -> Result<(), StageError> {
    if dir.exists() {
        fs::remove_dir_all(dir)
            .map_err(|e| StageError::io(format!("clearing {}", dir.display()), e))?;
    }
    fs::create_dir_all(dir)
        .map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
    for member in &slot.artifacts {
        let link = dir.join(&member.stage);
        std::os::unix::fs::symlink(&member.dir, &link)
            .map_err(|e| StageError::io(format!("linking {}", link.display()), e))?;
    }
    Ok(())
}

fn read_metrics(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, StageError> {
    let text = fs::read_to_string(path)
        .map_err(|e| StageError::io(format!("reading metrics file {}", path.display()), e))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(StageError::Failed(format!(
            "metrics file {} must hold a JSON object",
            path.display()
        ))),
        Err(e) => Err(StageError::Failed(format!(
            "metrics file {}: {e}",
            path.display()
        ))),
    }
}
