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

/// How much more host memory the job can take before something stops it, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostHeadroom {
    pub bytes: u64,
    pub bound: &'static str,
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One counter of a cgroup's `memory.stat` (0 when absent).
fn stat(path: &std::path::Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(key)).then(|| parts.next()?.parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The cgroup's memory limit minus its usage, when this process's cgroup has a limit
/// (v2 `memory.max`/`memory.current`, or v1 `memory.limit_in_bytes`/`usage_in_bytes`).
fn cgroup_headroom() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            let dir = std::path::Path::new("/sys/fs/cgroup").join(rel);
            let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
            if max.trim() == "max" {
                return None;
            }
            let (limit, used) = (max.trim().parse::<u64>().ok()?, read_u64(&dir.join("memory.current"))?);
            // Page cache the kernel can drop (files read, data sets above all) is not a threat.
            let cache = stat(&dir.join("memory.stat"), "inactive_file");
            return Some(limit.saturating_sub(used.saturating_sub(cache)));
        }
        if controllers.split(',').any(|c| c == "memory") {
            let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(rel);
            let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
            // v1 reports "no limit" as a huge page-rounded number.
            if limit >= (1u64 << 62) {
                return None;
            }
            let used = read_u64(&dir.join("memory.usage_in_bytes"))?;
            let cache = stat(&dir.join("memory.stat"), "total_inactive_file");
            return Some(limit.saturating_sub(used.saturating_sub(cache)));
        }
    }
    None
}

/// The tightest of: the plan's limit less this process's RSS, the cgroup's room, the
/// machine's available memory — each less `ahead`, what the next step will still add.
pub fn host_headroom(rss: u64, ahead: u64, plan_limit: Option<u64>) -> HostHeadroom {
    let mut best = HostHeadroom { bytes: u64::MAX, bound: "nothing" };
    let mut consider = |bytes: Option<u64>, bound: &'static str| {
        if let Some(b) = bytes
            && b < best.bytes
        {
            best = HostHeadroom { bytes: b, bound };
        }
    };
    consider(plan_limit.map(|l| l.saturating_sub(rss)), "the plan's host_memory_limit");
    consider(cgroup_headroom(), "the cgroup's memory limit");
    consider(mem_available(), "the machine's available memory");
    best.bytes = best.bytes.saturating_sub(ahead);
    best
}

/// Hands the allocator's free memory back to the kernel (glibc's `malloc_trim`), so that
/// the resident set counts what is in use: batches freed on a loader thread otherwise stay
/// cached in that thread's arena. Returns the resident set afterwards.
pub fn trim_host_memory() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
    host_rss_bytes()
}

/// The highest resident set since the last [`reset_peak_rss`] (`VmHWM`), if readable.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Starts a new `VmHWM` window (writing 5 to /proc/self/clear_refs); false where the
/// kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
