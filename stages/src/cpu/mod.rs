//! flow's CPU training engine: the Llama forward and backward pass with hand-fused kernels
//! over `gemm`, used for the CPU device. It exists because burn's CPU backend ran this model
//! at a quarter of PyTorch's speed on a 2-core machine (see BENCHMARKS.md); GPUs go through
//! burn. The math is checked against Hugging Face's (logits, loss and every gradient).

pub mod alloc;
pub mod attention;
pub mod batch;
pub mod decode;
pub mod llama;
pub mod lora;
pub mod matmul;
pub mod ops;
