//! Decoder models of the Llama lineage (Llama 2 and 3, Mistral, Qwen 2 and 3, Phi-3):
//! configuration, the architecture it describes, parameters and their Hugging Face file
//! formats.

pub mod arch;
pub mod config;
pub mod kind;
pub mod weights;
