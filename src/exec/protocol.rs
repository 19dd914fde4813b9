//! What the engine sends a stage process (one JSON spec on stdin) and what the stage process
//! reports back (JSON lines on stdout). A cluster executor submits the same command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::key::KeyParts;

/// Everything a stage process needs; it does not read the pipeline file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildSpec {
    pub cache: PathBuf,
    pub key: String,
    pub parts: KeyParts,
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub params: serde_json::Value,
    pub inputs: Vec<SpecInput>,
    /// Working directory of the stage (the pipeline file's directory).
    pub workdir: PathBuf,
    pub threads: usize,
    /// A shared remote cache: the stage process pulls a key done elsewhere, holds the
    /// key's lease while computing, syncs its checkpoints and pushes the result.
    #[serde(default)]
    pub remote: Option<String>,
    /// The device for kinds that use one (`auto` when absent).
    #[serde(default)]
    pub device: Option<String>,
}

/// What a cluster job runs (`flow __job`, spec on stdin): one stage of a pipeline, whose
/// key the job resolves when it starts, from the inputs the remote has by then.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobSpec {
    /// The pipeline file, absolute: relative paths in it resolve against its directory.
    pub pipeline: PathBuf,
    /// The blake3 of the submitted files (the pipeline and its includes, as JSON
    /// [`crate::pipeline::Sources`]): one object on the remote (see `Remote::put_text`), so
    /// that 10,000 jobs do not each carry it in their batch script, and the job runs exactly
    /// what was submitted (verified on read), whatever the files say by then.
    pub text_blake3: String,
    pub profiles: Vec<String>,
    pub sets: Vec<String>,
    pub salt: String,
    pub stage: String,
    /// The remote cache the jobs share.
    pub remote: String,
}

/// One reference param's artifacts.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpecInput {
    pub path: String,
    pub list: bool,
    pub artifacts: Vec<SpecArtifact>,
}

/// One input artifact by digest, with the stage that made it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpecArtifact {
    pub stage: String,
    pub digest: String,
}

/// Lines a stage process prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ChildEvent {
    /// Another process holds the key's lock; this one waits for it.
    Waiting {
        holder: String,
    },
    /// The lock is ours and the stage function starts.
    Started,
    Progress {
        len: Option<u64>,
        pos: Option<u64>,
        msg: Option<String>,
    },
    /// An input artifact is damaged; it was evicted and its producer must run again.
    Corrupt {
        digest: String,
        files: Vec<String>,
    },
    /// The key is done: by this process (`cached: false`) or by another one meanwhile.
    Done {
        cached: bool,
    },
    Failed {
        error: String,
    },
}

/// Exit status of a stage process whose input was damaged (distinct from plain failure).
pub const EXIT_CORRUPT_INPUT: i32 = 3;

/// Output digests by name, as the child committed them.
pub type Outputs = BTreeMap<String, String>;
