//! Memory readings from real sources: the counting CPU allocator and the CUDA caching
//! allocator (through the shim in `csrc/memory.cpp`), NVML, and /proc for host RSS.

use std::sync::OnceLock;

use super::ffi;

/// Registers the counting allocator. Call before creating any tensor that should count.
pub fn install_cpu_counter(budget_bytes: Option<u64>) {
    ffi::cpu_counter_install(budget_bytes);
}

/// Tensor memory as one allocator sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocatorReading {
    pub allocated: u64,
    pub peak: u64,
    pub reserved: Option<u64>,
    /// Highest reserved since the last reset; `None` on the CPU.
    pub reserved_peak: Option<u64>,
}

/// Where the tensors of a job live, and how to read their memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meter {
    Cpu,
    Cuda(i32),
}

impl Meter {
    pub fn read(self) -> AllocatorReading {
        match self {
            Meter::Cpu => {
                let [allocated, peak, _] = ffi::cpu_counter_read();
                AllocatorReading { allocated, peak, reserved: None, reserved_peak: None }
            }
            Meter::Cuda(device) => {
                let Some(out) = ffi::cuda_stats(device) else {
                    return AllocatorReading::default();
                };
                let u = |v: i64| u64::try_from(v).unwrap_or(0);
                AllocatorReading {
                    allocated: u(out[0]),
                    peak: u(out[1]),
                    reserved: Some(u(out[2])),
                    reserved_peak: Some(u(out[3])),
                }
            }
        }
    }

    /// Returns cached, unused blocks to the driver (CUDA); nothing to do on the CPU,
    /// whose counting allocator frees at once.
    pub fn empty_cache(self) {
        if let Meter::Cuda(_) = self {
            ffi::cuda_empty_cache();
        }
    }

    /// Starts a new peak window at the current allocation.
    pub fn reset_peak(self) {
        match self {
            Meter::Cpu => ffi::cpu_counter_reset_peak(),
            Meter::Cuda(device) => ffi::cuda_reset_peak(device),
        }
    }

    /// Caps the caching allocator at `fraction` of the device (CUDA only).
    pub fn set_memory_fraction(self, fraction: f64) -> bool {
        match self {
            Meter::Cpu => false,
            Meter::Cuda(device) => ffi::cuda_set_memory_fraction(device, fraction),
        }
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn host_rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn nvml() -> Option<&'static nvml_wrapper::Nvml> {
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok()).as_ref()
}

/// Device memory in use on GPU `index` as NVML sees it (every process), if NVML loads.
pub fn nvml_used_bytes(index: u32) -> Option<u64> {
    let device = nvml()?.device_by_index(index).ok()?;
    device.memory_info().ok().map(|m| m.used)
}

/// GPUs NVML can see: (name, total bytes). Empty where there is no driver.
pub fn nvml_devices() -> Vec<(String, u64)> {
    let Some(nvml) = nvml() else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            Some((d.name().ok()?, d.memory_info().ok()?.total))
        })
        .collect()
}

pub fn nvml_available() -> bool {
    nvml().is_some()
}
