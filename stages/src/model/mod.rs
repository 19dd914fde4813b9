//! Llama models: configuration, parameters and their Hugging Face file formats.

pub mod config;
pub mod kind;
pub mod weights;
