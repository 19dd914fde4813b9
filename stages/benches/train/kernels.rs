//! Which kernels a training step launches on a burn device, how many, and (asked for) how
//! long each ran there: the "kernel dispatches per step" of issue 19's benchmark, and the
//! profile that says where a step's time goes where flow misses PyTorch's speed.
//!
//! cubecl calls a launch observer on the issuing thread for every kernel it launches
//! (`cubecl::logging::LaunchObservation`); fusion launches lazily, so each phase ends by
//! waiting for the device inside the observation, and what the phase queued is counted in
//! it. Timed, every launch brackets its kernel with device timestamps read back once the
//! phase is over (`TimingRequest::Deferred`), so kernels still run back to back; where the
//! device has no timestamps cubecl falls back to host time around a blocking launch, and
//! the figures say so (`timing`). A launch's window opens before its kernel is submitted,
//! so on a device that sat idle it holds the launch's latency too: each time is an upper
//! bound of its kernel's (torch.profiler's CUPTI times, `benches/train_torch.py`, are the
//! kernels alone).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cubecl::config::{TypeNameFormatLevel, type_name_format};
use cubecl::logging::{
    Duration, LaunchObservation, LaunchObserver, ProfileDuration, TimingMethod, TimingRequest,
};

/// One launch as the observer saw it: the kernel's type name, and its measurement once one
/// arrives.
struct Launch {
    kernel: &'static str,
    measured: Option<Measured>,
}

enum Measured {
    /// Device timestamps not read yet (read after the phase, so kernels overlap as usual).
    Pending(ProfileDuration),
    /// A length cubecl already read, and how it was taken.
    Read(Duration, TimingMethod),
}

/// The observer: every launch in order.
struct Recorder {
    timed: bool,
    launches: Mutex<Vec<Launch>>,
}

impl Recorder {
    /// Gives the measurement to the latest launch of `kernel` that has none (measurements
    /// come right after their launch, on the same thread).
    fn measure(&self, kernel: &'static str, measured: Measured) {
        let mut launches = self.launches.lock().unwrap();
        if let Some(l) = launches
            .iter_mut()
            .rev()
            .find(|l| l.kernel == kernel && l.measured.is_none())
        {
            l.measured = Some(measured);
        }
    }
}

impl LaunchObserver for Recorder {
    fn launched(&self, kernel: &'static str) {
        self.launches.lock().unwrap().push(Launch {
            kernel,
            measured: None,
        });
    }

    fn timing(&self) -> TimingRequest {
        if self.timed {
            TimingRequest::Deferred
        } else {
            TimingRequest::None
        }
    }

    fn profiled(&self, kernel: &'static str, profile: ProfileDuration) {
        self.measure(kernel, Measured::Pending(profile));
    }

    fn timed(&self, kernel: &'static str, duration: Duration, method: TimingMethod) {
        self.measure(kernel, Measured::Read(duration, method));
    }
}

/// A kernel's launches in a phase: how many, and their summed time where timed.
pub struct KernelTotal {
    pub kernel: String,
    pub launches: usize,
    pub seconds: Option<f64>,
}

/// What a phase launched.
pub struct Phase {
    /// Per kernel, the longest first (the most launched first when untimed).
    pub kernels: Vec<KernelTotal>,
    /// How the times were taken: "device" (timestamps), "system" (host time around each
    /// launch, which serializes them), "mixed" (some of each) or "none".
    pub timing: &'static str,
}

/// Runs `phase`, then waits for `device`, counting (and when `timed`, timing) every kernel
/// launched meanwhile.
pub fn observe(device: &burn::tensor::Device, timed: bool, phase: impl FnOnce()) -> Phase {
    let recorder = Arc::new(Recorder {
        timed,
        launches: Mutex::new(Vec::new()),
    });
    {
        let _watching = LaunchObservation::new(recorder.clone());
        phase();
        device.sync().expect("the device finishes the phase");
    }
    let launches = std::mem::take(&mut *recorder.launches.lock().unwrap());
    let mut by_kernel: HashMap<String, KernelTotal> = HashMap::new();
    let mut timing = "none";
    for l in launches {
        let name = type_name_format(l.kernel, TypeNameFormatLevel::Balanced);
        let total = by_kernel.entry(name.clone()).or_insert(KernelTotal {
            kernel: name,
            launches: 0,
            seconds: None,
        });
        total.launches += 1;
        // The device is done with the phase, so reading a pending window waits for nothing.
        let measured = match l.measured {
            None => None,
            Some(Measured::Read(d, method)) => Some((d.as_secs_f64(), method)),
            Some(Measured::Pending(p)) => {
                let method = p.timing_method();
                futures::executor::block_on(p.resolve())
                    .map(|ticks| (ticks.duration().as_secs_f64(), method))
            }
        };
        if let Some((seconds, method)) = measured {
            timing = combined(timing, method);
            *total.seconds.get_or_insert(0.0) += seconds;
        }
    }
    let mut kernels: Vec<KernelTotal> = by_kernel.into_values().collect();
    kernels.sort_by(|a, b| {
        let time = |k: &KernelTotal| k.seconds.unwrap_or(0.0);
        time(b)
            .total_cmp(&time(a))
            .then(b.launches.cmp(&a.launches))
            .then(a.kernel.cmp(&b.kernel))
    });
    Phase { kernels, timing }
}

/// The phase's timing label so far, with one more launch timed by `method`.
fn combined(so_far: &'static str, method: TimingMethod) -> &'static str {
    let this = match method {
        TimingMethod::Device => "device",
        TimingMethod::System => "system",
    };
    match so_far {
        "none" => this,
        s if s == this => this,
        _ => "mixed",
    }
}

impl Phase {
    /// Kernels the phase launched, all kinds together.
    pub fn launches(&self) -> usize {
        self.kernels.iter().map(|k| k.launches).sum()
    }

    /// The `top` kernels as JSON: name, launches, milliseconds.
    pub fn top_json(&self, top: usize) -> serde_json::Value {
        self.kernels
            .iter()
            .take(top)
            .map(|k| {
                serde_json::json!({
                    "kernel": k.kernel, "launches": k.launches,
                    "ms": k.seconds.map(|s| (s * 1e6).round() / 1e3),
                })
            })
            .collect()
    }

    /// Summed time of the phase's timed kernels, in seconds.
    pub fn seconds(&self) -> Option<f64> {
        self.kernels
            .iter()
            .filter_map(|k| k.seconds)
            .reduce(|a, b| a + b)
    }
}
