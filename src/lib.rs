//! flow's engine: pipeline files, the stage DAG, the content-addressed cache and the
//! executor. The stage kinds themselves live in the `flow-stages` crate.

pub mod diag;
pub mod exec;
pub mod graph;
pub mod key;
pub mod pipeline;
pub mod remote;
pub mod slurm;
pub mod store;
pub mod ui;
