//! GPUs through burn: device selection, the Llama forward pass as burn tensor operations
//! (burn's autodiff gives the backward pass), a trainer keeping weights, gradients and
//! optimizer state on the device, and a KV-cached decoder for evaluation. Built with the
//! `wgpu` (Vulkan, Metal, DX12) or `cuda` features; without them only the CPU engine exists.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod decode;
pub mod device;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod flash;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod llama;
pub mod precision;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod rope;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod split;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod trainer;
