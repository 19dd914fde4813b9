//! The model-family fixtures of `tests/fixtures/make_family_fixtures.py`, shared by the
//! parity tests: every directory it writes with a model in it, so a family added to the
//! generator is tested on the CPU engine and on wgpu without another list to keep.

use std::path::{Path, PathBuf};

use flow_stages::cpu::lora::LoraSpec;
use flow_stages::model::weights::Proj;

/// `tests/fixtures/families`.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families")
}

/// The family fixtures' names (directories holding a `config.json`), sorted.
pub fn names() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root())
        .expect("tests/fixtures/families")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.join("config.json").is_file())
        .map(|p| {
            p.file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    assert!(out.len() >= 7, "family fixtures: {out:?}");
    out
}

/// The generator's PEFT settings: r=4, alpha=8, no dropout, every projection.
#[allow(dead_code)] // (not every test file that includes this module adapts)
pub fn peft_spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        dropout: 0.0,
        targets: Proj::ALL.to_vec(),
    }
}
