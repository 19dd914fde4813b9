//! Which device a stage runs on: `auto` (the first GPU adapter, else the CPU engine), `cpu`,
//! `wgpu`, `vulkan`, `metal` or `cuda`. A software adapter (Mesa's lavapipe) is taken only
//! when asked for by name: `auto` prefers the CPU engine to a CPU rasterizer.

use crate::kind::StageError;

/// The device names a pipeline or `--device` may give.
pub const NAMES: &[&str] = &["auto", "cpu", "wgpu", "vulkan", "metal", "cuda"];

/// A chosen device.
pub enum Choice {
    /// flow's CPU engine.
    Cpu,
    /// A burn device (already with autodiff), and how to name it in logs.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    Burn(burn::tensor::Device, String),
}

impl Choice {
    /// One line for the log: which device, and why.
    pub fn describe(&self) -> String {
        match self {
            Choice::Cpu => "cpu (flow's CPU engine)".into(),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            Choice::Burn(_, d) => d.clone(),
        }
    }
}

/// Resolves a device name; errors say what this build or machine lacks.
pub fn select(name: &str) -> Result<Choice, StageError> {
    match name {
        "cpu" => Ok(Choice::Cpu),
        "auto" => Ok(auto()),
        "wgpu" | "vulkan" | "metal" => wgpu(name),
        "cuda" => cuda(),
        other => Err(StageError::Params(format!(
            "unknown device `{other}` (one of {})",
            NAMES.join(", ")
        ))),
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn describe(device: &burn::tensor::Device, api: &str) -> (String, bool) {
    // The runtime says which compiler its kernels go through (`wgpu<spirv>` or
    // `wgpu<wgsl>`: tensor cores and subgroups only with SPIR-V), so the log tells.
    let runtime = cube_client(device).map_or(String::new(), |c| format!(", {}", c.name()));
    match device.identity() {
        Some(id) => (
            format!(
                "{api}: {}{}{runtime}",
                id.name,
                if id.physical.is_none() {
                    " (software)"
                } else {
                    ""
                }
            ),
            id.physical.is_some(),
        ),
        None => (format!("{api}{runtime}"), false),
    }
}

fn auto() -> Choice {
    #[cfg(feature = "cuda")]
    if let Ok(c) = cuda() {
        return c;
    }
    #[cfg(feature = "wgpu")]
    if let Ok(Choice::Burn(device, what)) = wgpu("wgpu") {
        // A CPU rasterizer is slower than the CPU engine: take real GPUs only.
        if device.identity().is_some_and(|i| i.physical.is_some()) {
            return Choice::Burn(device, what);
        }
    }
    Choice::Cpu
}

#[cfg(feature = "wgpu")]
fn wgpu(name: &str) -> Result<Choice, StageError> {
    use std::sync::OnceLock;

    use burn::tensor::Device;
    use burn::tensor::wgpu::WgpuBackend;
    // burn's wgpu runtime initializes once per process and graphics API: keep the result.
    static AUTO: OnceLock<Result<Device, String>> = OnceLock::new();
    static VULKAN: OnceLock<Result<Device, String>> = OnceLock::new();
    static METAL: OnceLock<Result<Device, String>> = OnceLock::new();
    let (cell, api) = match name {
        "vulkan" => (&VULKAN, WgpuBackend::Vulkan),
        "metal" => (&METAL, WgpuBackend::Metal),
        _ => (&AUTO, WgpuBackend::Auto),
    };
    let device = cell
        .get_or_init(|| {
            share_autotune_cache();
            Device::wgpu_options()
                .graphics_api(api)
                .init()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| StageError::Failed(format!("device `{name}`: no usable adapter: {e}")))?;
    let (what, _) = describe(&device, name);
    Ok(Choice::Burn(device.autodiff(), what))
}

/// Puts cubecl's persistent caches (autotune's kernel choices, compiled kernels) in the
/// user's cache directory (`~/.cache/cubecl` on Linux) instead of cubecl's default, the
/// `target/` of the outermost Cargo project above the working directory: a stage runs in
/// its pipeline's directory, so with the default the choices would land in whichever
/// project's `target/` a pipeline sits under (one cache per checkout, tuned again in each),
/// or in the user cache where there is none. A `cubecl.toml` or `burn.toml`
/// that names another place is kept. Runs once, before the first device is made.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn share_autotune_cache() {
    use burn::cubecl::config::cache::CacheConfig;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if matches!(config.environment.path, CacheConfig::Target) {
            config.environment.path = CacheConfig::Global;
        }
        // False when something read the configuration first: it is kept as it is.
        let _ = CubeClRuntimeConfig::try_set(config);
    });
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(name: &str) -> Result<Choice, StageError> {
    Err(StageError::Failed(format!(
        "device `{name}`: this flow was built without the `wgpu` feature"
    )))
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Choice, StageError> {
    use burn::tensor::Device;
    let runtime =
        super::cuda::prepare().map_err(|e| StageError::Failed(format!("device `cuda`: {e}")))?;
    share_autotune_cache();
    let device = std::panic::catch_unwind(|| {
        let d = Device::cuda(0);
        let _ = d.identity();
        d
    })
    .map_err(|_| {
        StageError::Failed(format!(
            "device `cuda`: the driver and NVRTC are there ({runtime}) but no CUDA device \
             could be opened"
        ))
    })?;
    let (what, _) = describe(&device, "cuda");
    Ok(Choice::Burn(
        device.autodiff(),
        format!("{what} ({runtime})"),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Choice, StageError> {
    Err(StageError::Failed(
        "device `cuda`: this flow was built without the `cuda` feature (cargo build --features cuda)"
            .into(),
    ))
}

/// Bytes a device can hold: its largest device-local memory heap as cubecl reads it (the
/// driver's budget, not what is free now), or None where the runtime reports no figure.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn memory(device: &burn::tensor::Device) -> Option<u64> {
    cube_client(device)?.properties().memory.max_memory()
}

/// The cubecl client behind a burn device (every GPU device this build makes), which
/// knows the runtime's name and the device's properties.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn cube_client(device: &burn::tensor::Device) -> Option<burn::cubecl::client::Client> {
    match device.clone().without_autodiff().as_dispatch() {
        burn::backend::DispatchDevice::Cube(d) => Some(d.client()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Bytes in GiB, for messages about device memory.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Fails, before anything is loaded, when `need` bytes cannot fit on the device: a model
/// that does not fit is an error naming what it needs and what the device has, not an
/// out-of-memory crash half-way through uploading weights.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn check_fits(
    device: &burn::tensor::Device,
    name: &str,
    need: u64,
    what: &str,
) -> Result<(), StageError> {
    match memory(device) {
        Some(has) if need > has => Err(StageError::Failed(format!(
            "{what} needs about {:.1} GiB on {name}, which has {:.1} GiB: use a smaller \
             model or batch, or another device",
            gib(need),
            gib(has)
        ))),
        _ => Ok(()),
    }
}
