//! Data stages: `source` (files in, normalized records out), `synthetic` (the embedded
//! worlds), `tokenize` and `pack`, and the formats they exchange.

pub mod chat;
pub mod formats;
pub mod pack;
pub mod records;
pub mod remote;
pub mod rng;
pub mod source;
pub mod synth;
pub mod tokenize;
pub mod tokens;
