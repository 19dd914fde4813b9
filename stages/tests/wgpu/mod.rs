//! The wgpu adapter every GPU test runs on: in CI, Mesa's lavapipe Vulkan driver
//! (`apt-get install mesa-vulkan-drivers`). Without an adapter a test fails rather than
//! skips, so a broken GPU path cannot pass unnoticed.

use flow_stages::gpu::device::{Choice, select};

/// The wgpu device (with autodiff), or a panic saying how to get one.
pub fn burn_device() -> burn::tensor::Device {
    match select("wgpu") {
        Ok(Choice::Burn(d, what)) => {
            eprintln!("wgpu device: {what}");
            d
        }
        Ok(Choice::Cpu) => unreachable!("`wgpu` never means the CPU engine"),
        Err(e) => panic!(
            "no wgpu adapter ({e}); on Debian, apt-get install mesa-vulkan-drivers (lavapipe)"
        ),
    }
}
