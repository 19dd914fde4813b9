//! The stage library of flow.
//!
//! A stage kind is a pure function from typed params and read-only input artifacts
//! (directories) to output files. Kinds know nothing of hashing, storage or scheduling:
//! that separation is what makes the engine's content-addressed cache sound, because the
//! engine may assume a stage's outputs depend only on (kind, version, params, inputs).
//!
//! The engine talks to this crate through [`registry`] and the types of [`kind`].

pub mod command;
pub mod cpu;
pub mod data;
pub mod eval;
pub mod gpu;
pub mod kind;
pub mod model;
pub mod process;
pub mod relpath;
pub mod report;
pub mod select;
pub mod svd;
pub mod train;

pub use kind::{
    Default, InputArtifact, InputSlot, Kind, Param, ParamType, Progress, StageContext, StageError,
    StageOutcome,
};

/// Every stage kind this build of flow knows, in the order the reference documents them.
///
/// A function rather than a static so that kinds behind cargo features can be added without
/// the engine knowing about features.
pub fn registry() -> Vec<&'static Kind> {
    vec![
        &command::KIND,
        &data::source::KIND,
        &data::synth::KIND,
        &data::tokenize::KIND,
        &data::pack::KIND,
        &model::kind::KIND,
        &train::stage::FULL,
        &train::stage::LORA,
        &train::stage::FULL_TRUNK,
        &train::stage::LORA_TRUNK,
        &eval::KIND,
        &svd::KIND,
        &select::KIND,
        &report::KIND,
    ]
}

/// Looks a kind up by its name in the pipeline file (`kind = "..."`).
pub fn find_kind(name: &str) -> Option<&'static Kind> {
    registry().into_iter().find(|k| k.name == name)
}
