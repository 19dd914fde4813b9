//! GPUs through burn: device selection, the Llama forward pass as burn tensor operations
//! (burn's autodiff gives the backward pass) and a trainer keeping weights, gradients and
//! optimizer state on the device. Built with the `wgpu` (Vulkan, Metal, DX12) or `cuda`
//! features; without them only the CPU engine exists.

pub mod device;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod llama;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod trainer;
