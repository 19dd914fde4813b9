//! CUDA's run-time pieces, found and checked before burn opens a CUDA device.
//!
//! flow builds cubecl's CUDA runtime without LLVM (`vendor/cubecl-cuda/PATCH.md`): every
//! kernel is CUDA C++ compiled at run time by NVRTC. So a CUDA run needs, besides the GPU:
//! the driver (`libcuda.so.1`), NVRTC (`libnvrtc.so.12` or `.13`), and the headers cubecl's
//! kernels include (`cuda_fp16.h`, `cuda_bf16.h`, `mma.h` and its `crt/mma.h`,
//! `cuda/barrier`). NVRTC and the headers come from a toolkit (`CUDA_PATH`, else
//! `/usr/local/cuda` or `/opt/cuda`)
//! or, the way PyTorch ships them, from NVIDIA's PyPI wheels in python3's environment
//! (CUDA 12's folder per wheel, or CUDA 13's one `nvidia/cu13`).
//!
//! Without this module a missing piece is cudarc's panic at the first kernel, or NVRTC's
//! "cannot open source file" with the kernel's source; with it, an error before the first
//! step naming each missing piece and the package that has it. It also loads NVRTC by its
//! full path, so the wheels work without `LD_LIBRARY_PATH`, and checks that NVRTC is not newer
//! than the driver: the driver JIT-compiles NVRTC's PTX, and PTX from a newer CUDA than the
//! driver's does not load (CUDA's minor-version compatibility does not cover PTX).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheels a CUDA run takes from PyPI when there is no toolkit (pick the CUDA version of
/// the driver or older, e.g. `nvidia-cuda-nvrtc-cu12==12.4.*` for driver 550).
pub const WHEELS: &str =
    "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cccl-cu12";

/// Headers cubecl's CUDA kernels include, and the wheel that has each, CUDA 12's and CUDA
/// 13's (cubecl-cpp's `cuda/ty.rs`, `cuda/mma`, `cuda/dialect.rs`).
const HEADERS: &[(&str, [&str; 2])] = &[
    (
        "cuda_fp16.h",
        ["nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"],
    ),
    (
        "cuda_bf16.h",
        ["nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"],
    ),
    ("mma.h", ["nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime"]),
    ("crt/mma.h", ["nvidia-cuda-nvcc-cu12", "nvidia-cuda-crt"]),
    (
        "cuda/barrier",
        ["nvidia-cuda-cccl-cu12", "nvidia-cuda-cccl"],
    ),
];

/// Where NVIDIA's wheels put NVRTC and the headers under `site-packages/nvidia`: CUDA 12's
/// one folder per wheel, CUDA 13's one `cu13/` for all (what PyTorch's cu130 builds pull in).
struct WheelLayout {
    /// NVRTC's folder.
    lib: &'static str,
    /// Include folders.
    include: &'static [&'static str],
    /// Which of [`HEADERS`]' wheel names are this layout's.
    wheels: usize,
}

/// The layouts [`find`] looks for, CUDA 12's first.
const WHEEL_LAYOUTS: [WheelLayout; 2] = [
    WheelLayout {
        lib: "cuda_nvrtc/lib",
        include: &[
            "cuda_runtime/include",
            "cuda_nvcc/include",
            "cuda_cccl/include",
        ],
        wheels: 0,
    },
    WheelLayout {
        lib: "cu13/lib",
        include: &["cu13/include", "cu13/include/cccl"],
        wheels: 1,
    },
];

/// Where NVRTC and the headers are.
#[derive(Clone, Debug)]
pub struct Toolkit {
    /// NVRTC's shared library.
    pub nvrtc: PathBuf,
    /// NVRTC's `--include-path`s.
    pub include: Vec<PathBuf>,
    /// Where they were found, for the log.
    pub origin: String,
}

/// Finds NVRTC and the headers: in `cuda_path` (the `CUDA_PATH` variable) when given, and
/// then only there; else in `/usr/local/cuda` or `/opt/cuda`; else in the `nvidia/` wheels
/// on `python`'s `sys.path`. The error names every place looked at and what to install.
pub fn find(cuda_path: Option<&Path>, python: &str) -> Result<Toolkit, String> {
    if let Some(root) = cuda_path {
        return toolkit_at(root, &format!("CUDA_PATH={}", root.display()));
    }
    // An incomplete install (a driver-only /usr/local/cuda, wheels without nvcc) does not
    // stop the search; if nothing is complete, the error lists why each place was not.
    let mut refused = Vec::new();
    for root in ["/usr/local/cuda", "/opt/cuda"] {
        if Path::new(root).is_dir() {
            match toolkit_at(Path::new(root), root) {
                Ok(toolkit) => return Ok(toolkit),
                Err(e) => refused.push(e),
            }
        }
    }
    let sites = python_sites(python);
    for site in &sites {
        for layout in &WHEEL_LAYOUTS {
            if site.join("nvidia").join(layout.lib).is_dir() {
                match wheels_at(site, layout) {
                    Ok(toolkit) => return Ok(toolkit),
                    Err(e) => refused.push(e),
                }
            }
        }
    }
    if refused.is_empty() {
        refused.push(format!(
            "CUDA_PATH is not set, neither /usr/local/cuda nor /opt/cuda exists, and \
             {python}'s environment ({}) has no nvidia-cuda-nvrtc(-cu12) wheel",
            if sites.is_empty() {
                format!("{python} did not run")
            } else {
                format!("{} directories on sys.path", sites.len())
            }
        ));
    }
    Err(format!(
        "NVRTC and its headers not found: {}. Install the wheels (`{python} -m pip install \
         {WHEELS}`, the driver's CUDA version or older) or set CUDA_PATH to a CUDA toolkit",
        refused.join("; ")
    ))
}

/// A toolkit tree: `lib64/` (or `lib/`) holds NVRTC, `include/` (and `include/cccl/` where
/// the toolkit puts CCCL there) the headers.
fn toolkit_at(root: &Path, origin: &str) -> Result<Toolkit, String> {
    let nvrtc = ["lib64", "lib", "targets/x86_64-linux/lib"]
        .iter()
        .find_map(|dir| nvrtc_in(&root.join(dir)))
        .ok_or_else(|| {
            format!("{origin}: no libnvrtc.so in its lib64/, lib/ or targets/x86_64-linux/lib/")
        })?;
    let include: Vec<PathBuf> = ["include", "include/cccl"]
        .iter()
        .map(|dir| root.join(dir))
        .filter(|dir| dir.is_dir())
        .collect();
    check_headers(&include, origin, 0)?;
    Ok(Toolkit {
        nvrtc,
        include,
        origin: origin.to_string(),
    })
}

/// NVIDIA's wheels under one `site-packages`, laid out as `layout` says.
fn wheels_at(site: &Path, layout: &WheelLayout) -> Result<Toolkit, String> {
    let origin = format!("python wheels in {}", site.display());
    let nvidia = site.join("nvidia");
    let nvrtc = nvrtc_in(&nvidia.join(layout.lib))
        .ok_or_else(|| format!("{origin}: nvidia/{} has no libnvrtc.so", layout.lib))?;
    let include: Vec<PathBuf> = layout
        .include
        .iter()
        .map(|dir| nvidia.join(dir))
        .filter(|dir| dir.is_dir())
        .collect();
    check_headers(&include, &origin, layout.wheels)?;
    Ok(Toolkit {
        nvrtc,
        include,
        origin,
    })
}

/// NVRTC's library in `dir`: `libnvrtc.so.<major>` or `libnvrtc.so`, not its builtins or
/// the `alt` variant.
fn nvrtc_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file() // a dangling link is not a library
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == "libnvrtc.so" || n.starts_with("libnvrtc.so."))
        })
        .collect();
    // The shortest name is the one a loader asks for (`libnvrtc.so.12` before its
    // `libnvrtc.so.12.4.127` target).
    found.sort_by_key(|p| p.as_os_str().len());
    found.into_iter().next()
}

/// Every header of [`HEADERS`] in one of `include`, or an error naming the missing ones and
/// their wheels (CUDA 12's names, or with `wheels` 1 CUDA 13's).
fn check_headers(include: &[PathBuf], origin: &str, wheels: usize) -> Result<(), String> {
    let missing: Vec<String> = HEADERS
        .iter()
        .filter(|(header, _)| !include.iter().any(|dir| dir.join(header).is_file()))
        .map(|(header, names)| format!("{header} (in {})", names[wheels]))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{origin}: NVRTC is there but not the headers cubecl's kernels include: {}",
            missing.join(", ")
        ))
    }
}

/// `python`'s `sys.path` directories (none when it does not run).
fn python_sites(python: &str) -> Vec<PathBuf> {
    Command::new(python)
        .args([
            "-c",
            "import sys; print('\\n'.join(p for p in sys.path if p))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(PathBuf::from)
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// A CUDA version as the driver and NVRTC report it, e.g. 12.4 is `12040`.
fn version_name(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The driver's CUDA version (`cuDriverGetVersion`), or why there is no driver.
pub fn driver_version() -> Result<i32, String> {
    let lib = open_global(Path::new("libcuda.so.1")).map_err(|e| {
        format!("no NVIDIA driver: libcuda.so.1 could not be loaded ({e}); install the driver")
    })?;
    let mut version = 0i32;
    // SAFETY: cuDriverGetVersion(int*) writes one int and needs no cuInit; the library stays
    // loaded (open_global keeps it).
    let status = unsafe {
        let f: libloading::os::unix::Symbol<unsafe extern "C" fn(*mut i32) -> i32> = lib
            .get(b"cuDriverGetVersion\0")
            .map_err(|e| format!("libcuda.so.1 has no cuDriverGetVersion: {e}"))?;
        f(&mut version)
    };
    if status != 0 {
        return Err(format!("cuDriverGetVersion failed (CUresult {status})"));
    }
    Ok(version)
}

/// Loads NVRTC from `toolkit` by its full path and globally, so that cudarc's later lookup
/// by name finds it among the loaded libraries by its soname (`libnvrtc.so.12`) with no
/// `LD_LIBRARY_PATH`, unless a `libnvrtc.so` on the library path comes first ([`prepare`]
/// checks which one cudarc took); returns NVRTC's version.
pub fn load_nvrtc(toolkit: &Toolkit) -> Result<i32, String> {
    // NVRTC opens its builtins (`libnvrtc-builtins.so.13.0`) by name when it compiles: CUDA
    // 12's wheel finds them beside it through its RUNPATH, CUDA 13's has none (and a
    // toolkit's lib64 is not always on the library path). Loaded first, by full path and
    // globally, they are found among the loaded libraries by their soname. They sit beside
    // the library NVRTC's path names, or beside the file it links to.
    let real = std::fs::canonicalize(&toolkit.nvrtc).unwrap_or_else(|_| toolkit.nvrtc.clone());
    let mut dirs: Vec<&Path> = [toolkit.nvrtc.parent(), real.parent()]
        .into_iter()
        .flatten()
        .collect();
    dirs.dedup();
    for dir in dirs {
        for builtins in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = builtins.file_name();
            if name.to_string_lossy().starts_with("libnvrtc-builtins.so")
                && builtins.path().is_file()
            {
                open_global(&builtins.path())
                    .map_err(|e| format!("{}: {e}", builtins.path().display()))?;
            }
        }
    }
    let lib =
        open_global(&toolkit.nvrtc).map_err(|e| format!("{}: {e}", toolkit.nvrtc.display()))?;
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: nvrtcVersion(int*, int*) writes two ints.
    let status = unsafe {
        let f: libloading::os::unix::Symbol<unsafe extern "C" fn(*mut i32, *mut i32) -> i32> = lib
            .get(b"nvrtcVersion\0")
            .map_err(|e| format!("{} has no nvrtcVersion: {e}", toolkit.nvrtc.display()))?;
        f(&mut major, &mut minor)
    };
    if status != 0 {
        return Err(format!("nvrtcVersion failed (nvrtcResult {status})"));
    }
    Ok(major * 1000 + minor * 10)
}

/// The version of the NVRTC cudarc loads by name, or None where it finds none (cudarc's
/// presence check catches its own panic).
fn cudarc_nvrtc_version() -> Option<i32> {
    use cudarc::nvrtc::sys;
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is checked present first; nvrtcVersion writes two ints.
    unsafe {
        if !sys::is_culib_present() {
            return None;
        }
        let status = sys::nvrtcVersion(&mut major, &mut minor);
        (status == sys::nvrtcResult::NVRTC_SUCCESS).then_some(major * 1000 + minor * 10)
    }
}

/// dlopen with `RTLD_NOW | RTLD_GLOBAL`, never unloaded (cudarc and the driver keep pointers
/// into it for the life of the process).
fn open_global(path: &Path) -> Result<&'static libloading::os::unix::Library, String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: the driver and NVRTC run no initializers that depend on the caller.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
        match std::error::Error::source(&e) {
            // dlerror's text ("libcuda.so.1: cannot open shared object file: ...").
            Some(why) => why.to_string(),
            None => e.to_string(),
        }
    })?;
    Ok(Box::leak(Box::new(lib)))
}

/// A kernel using every header in [`HEADERS`] (half and bfloat16 arithmetic, a tensor-core
/// WMMA tile, CCCL's barrier), as cubecl's generated kernels do.
const PROBE: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cuda/barrier>
extern "C" __global__ void flow_probe(const __nv_bfloat16* a, const __half* h, float* out) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> x;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> y;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(x, a, 16);
    wmma::load_matrix_sync(y, a, 16);
    wmma::mma_sync(acc, x, y, acc);
    wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
    out[threadIdx.x] += __bfloat162float(a[threadIdx.x] * a[threadIdx.x]) + __half2float(h[threadIdx.x]);
}
"#;

/// Compiles [`PROBE`] with NVRTC (through cudarc, the way cubecl-cuda compiles its kernels,
/// with its options) for `arch` (e.g. `sm_90a`), and returns the PTX. NVRTC must be loaded
/// ([`load_nvrtc`]). A failure carries NVRTC's log.
pub fn compile_probe(toolkit: &Toolkit, arch: &str) -> Result<String, String> {
    use cudarc::nvrtc::result as nvrtc;
    let source = std::ffi::CString::new(PROBE).expect("no NUL in the probe");
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-lineinfo".to_string(),
    ];
    options.extend(
        toolkit
            .include
            .iter()
            .map(|dir| format!("--include-path={}", dir.display())),
    );
    let program = nvrtc::create_program(&source, None).map_err(|e| e.to_string())?;
    // SAFETY: `program` is live until destroyed below; the options outlive the call.
    unsafe {
        let compiled = nvrtc::compile_program(program, &options);
        let result = match compiled {
            Ok(()) => nvrtc::get_ptx(program).map_err(|e| e.to_string()),
            Err(e) => Err(format!(
                "NVRTC ({}) could not compile a kernel with cubecl's headers ({e}): {}",
                toolkit.origin,
                nvrtc::get_program_log(program)
                    .map(|log| c_text(&log))
                    .unwrap_or_default()
            )),
        };
        let _ = nvrtc::destroy_program(program);
        result.map(|ptx| c_text(&ptx))
    }
}

fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Everything a CUDA device needs, checked once per process: the driver, NVRTC and the
/// headers (found as [`find`] says, `CUDA_PATH` and `python3`), NVRTC no newer than the
/// driver, and a probe kernel compiled; then hands cubecl the include paths. Returns one
/// line for the log (`NVRTC 12.4 from ...`).
pub fn prepare() -> Result<String, String> {
    static PREPARED: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    PREPARED
        .get_or_init(|| {
            let driver = driver_version()?;
            let cuda_path = std::env::var_os("CUDA_PATH")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
            let toolkit = find(cuda_path.as_deref(), "python3")?;
            let nvrtc = load_nvrtc(&toolkit)?;
            // cudarc (and so cubecl) finds NVRTC by name, `libnvrtc.so` on the library path
            // first: make sure that is the library just checked, and that it is found at all
            // (a name cudarc does not try would be its panic at the first kernel).
            let bindings = cudarc::driver::sys::CUDA_VERSION as i32;
            let used = cudarc_nvrtc_version().ok_or_else(|| {
                format!(
                    "{} (NVRTC {}) loaded, but cudarc, built with CUDA {} bindings, loads \
                     NVRTC by the names libnvrtc.so, libnvrtc.so.{} and libnvrtc.so.12 only: \
                     build flow with CUDARC_CUDA_VERSION={}000 (the bindings of NVRTC's \
                     version, which needs a driver of that version), or install a CUDA 12 \
                     NVRTC and its headers (`python3 -m pip install {WHEELS}`) or set CUDA_PATH \
                     to a CUDA 12 toolkit",
                    toolkit.nvrtc.display(),
                    version_name(nvrtc),
                    version_name(bindings),
                    bindings / 1000,
                    nvrtc / 1000,
                )
            })?;
            if used != nvrtc {
                return Err(format!(
                    "cudarc finds NVRTC {} on the library path, not {} ({}): remove the other \
                     one from the library path, or set CUDA_PATH to its toolkit",
                    version_name(used),
                    toolkit.nvrtc.display(),
                    version_name(nvrtc)
                ));
            }
            if nvrtc > driver {
                return Err(format!(
                    "NVRTC {} ({}) is newer than the driver's CUDA {}: the driver cannot load \
                     the PTX it makes. Install NVRTC and its headers at {} or older (e.g. \
                     `python3 -m pip install {}`, all four at that version) or update the \
                     driver",
                    version_name(nvrtc),
                    toolkit.origin,
                    version_name(driver),
                    version_name(driver),
                    WHEELS
                        .split(' ')
                        .map(|w| format!("\"{w}=={}.*\"", version_name(driver)))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            compile_probe(&toolkit, "sm_80")?;
            burn::cubecl::cuda::install::set_include_paths(toolkit.include.clone());
            // cudarc's bindings are of one CUDA version (.cargo/config.toml): an older
            // driver lacks the functions that version added, which cubecl rarely calls.
            let note = if driver < bindings {
                format!(
                    "; built for CUDA {}: if a driver function is missing, rebuild with \
                     CUDARC_CUDA_VERSION={driver}",
                    version_name(bindings)
                )
            } else {
                String::new()
            };
            Ok(format!(
                "NVRTC {} from {}, driver CUDA {}{note}",
                version_name(nvrtc),
                toolkit.origin,
                version_name(driver)
            ))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheels `scripts/test` installs (or a toolkit, where the machine has one).
    fn installed() -> Toolkit {
        let cuda_path = std::env::var_os("CUDA_PATH").map(PathBuf::from);
        find(cuda_path.as_deref(), "python3").unwrap_or_else(|e| {
            panic!("{e}\n(scripts/test installs the wheels: python3 -m pip install {WHEELS})")
        })
    }

    /// NVRTC from the wheels (no CUDA toolkit, no LD_LIBRARY_PATH, no GPU) compiles a kernel
    /// with every header cubecl's kernels include, for the H100/H200's architecture, into
    /// tensor-core and bfloat16 PTX: the compile half of a CUDA run, checked on any machine.
    #[test]
    fn nvrtc_from_the_wheels_compiles_cubecls_headers_to_tensor_core_ptx() {
        let toolkit = installed();
        let version = load_nvrtc(&toolkit).unwrap();
        assert!(version >= 12000, "NVRTC {}", version_name(version));
        let ptx = compile_probe(&toolkit, "sm_90a").unwrap();
        assert!(ptx.contains(".target sm_90a"), "{ptx:.400}");
        assert!(ptx.contains(".entry flow_probe"), "{ptx:.400}");
        assert!(
            ptx.contains("wmma.mma.sync"),
            "no tensor-core MMA in the PTX"
        );
        assert!(ptx.contains("bf16"), "no bfloat16 in the PTX");
    }

    /// A `CUDA_PATH` that is not a toolkit is an error naming it and what it lacks, even
    /// where other CUDA installs exist: CUDA_PATH is the user's explicit choice.
    #[test]
    fn a_cuda_path_without_nvrtc_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let err = find(Some(dir.path()), "python3").unwrap_err();
        assert!(err.contains("CUDA_PATH="), "{err}");
        assert!(err.contains("libnvrtc.so"), "{err}");
    }

    /// Wheels with NVRTC but without nvcc's `crt/` headers (PyTorch's set) are refused
    /// before any kernel, naming the header and the wheel that has it.
    #[test]
    fn wheels_without_nvcc_name_the_missing_wheel() {
        let toolkit = installed();
        let site = tempfile::tempdir().unwrap();
        let nvidia = site.path().join("nvidia");
        std::fs::create_dir(&nvidia).unwrap();
        let nvrtc_lib = toolkit.nvrtc.parent().unwrap();
        std::fs::create_dir_all(nvidia.join("cuda_nvrtc")).unwrap();
        std::os::unix::fs::symlink(nvrtc_lib, nvidia.join("cuda_nvrtc/lib")).unwrap();
        // The runtime wheel's headers, one by one (a toolkit's include/ would bring crt/ too).
        let runtime = nvidia.join("cuda_runtime/include");
        std::fs::create_dir_all(&runtime).unwrap();
        for header in ["cuda_fp16.h", "cuda_bf16.h", "mma.h"] {
            let real = toolkit
                .include
                .iter()
                .map(|d| d.join(header))
                .find(|p| p.is_file());
            std::os::unix::fs::symlink(real.unwrap(), runtime.join(header)).unwrap();
        }
        let err = wheels_at(site.path(), &WHEEL_LAYOUTS[0]).unwrap_err();
        assert!(
            err.contains("crt/mma.h (in nvidia-cuda-nvcc-cu12)"),
            "{err}"
        );
        assert!(
            err.contains("cuda/barrier (in nvidia-cuda-cccl-cu12)"),
            "{err}"
        );
        assert!(!err.contains("cuda_fp16.h"), "{err}");
    }

    /// CUDA 13's wheels (PyTorch's cu130 builds) put NVRTC and every header under one
    /// `nvidia/cu13/` (CCCL's in `include/cccl/`): a site laid out so, holding the installed
    /// NVRTC and headers, is found and compiles the probe with its include paths.
    #[test]
    fn cuda_13_wheels_are_found_in_their_one_folder() {
        let toolkit = installed();
        let site = tempfile::tempdir().unwrap();
        let cu13 = site.path().join("nvidia/cu13");
        std::fs::create_dir_all(cu13.join("lib")).unwrap();
        let name = toolkit.nvrtc.file_name().unwrap();
        std::os::unix::fs::symlink(&toolkit.nvrtc, cu13.join("lib").join(name)).unwrap();
        // The installed include folders merged into CUDA 13's two: CCCL's (the one with
        // `cuda/barrier`) into `include/cccl`, the others into `include`.
        let cccl = toolkit
            .include
            .iter()
            .find(|d| d.join("cuda/barrier").is_file())
            .unwrap();
        for dir in &toolkit.include {
            if dir != cccl {
                merge_links(dir, &cu13.join("include"));
            }
        }
        merge_links(cccl, &cu13.join("include/cccl"));
        let found = wheels_at(site.path(), &WHEEL_LAYOUTS[1]).unwrap();
        assert_eq!(
            found.include,
            [cu13.join("include"), cu13.join("include/cccl")]
        );
        load_nvrtc(&found).unwrap();
        let ptx = compile_probe(&found, "sm_90a").unwrap();
        assert!(ptx.contains(".entry flow_probe"), "{ptx:.400}");
        // Without CCCL's folder the error names the CUDA 13 wheel.
        std::fs::remove_dir_all(cu13.join("include/cccl")).unwrap();
        let err = wheels_at(site.path(), &WHEEL_LAYOUTS[1]).unwrap_err();
        assert!(err.contains("cuda/barrier (in nvidia-cuda-cccl)"), "{err}");
    }

    /// Mirrors the tree `from` into `to` as folders and links to its files, keeping what
    /// `to` already has.
    fn merge_links(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let at = to.join(path.file_name().unwrap());
            if path.is_dir() {
                merge_links(&path, &at);
            } else if !at.exists() {
                std::os::unix::fs::symlink(&path, &at).unwrap();
            }
        }
    }

    /// With a driver the checks pass; without one (CI) the error names the driver's library.
    #[test]
    fn prepare_names_the_driver_when_there_is_none() {
        match driver_version() {
            // A GPU machine: ready, or refused for a reason named (the suite pins NVRTC 12.9,
            // newer than many drivers).
            Ok(_) => {
                if let Err(e) = prepare() {
                    assert!(e.contains("newer than the driver"), "{e}");
                }
            }
            Err(_) => {
                let err = prepare().unwrap_err();
                assert!(err.contains("libcuda.so.1"), "{err}");
            }
        }
    }
}
