//! Device discovery in one place: the devices this agent offers jobs and how much of
//! their memory is free (NVML for GPUs, `/proc` for the host), the catalog card a GPU's
//! estimate uses, and what a plan's `device` resolves to here.

use anyhow::Context;
use shared::estimate::Target;
use shared::gpus::{self, Gpu};
use shared::plan::Plan;
use shared::protocol::DeviceInfo;

/// The host's CPU as a device: its model name and the machine's RAM.
pub fn cpu_device() -> DeviceInfo {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, n)| n.trim().to_owned()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    DeviceInfo { id: "cpu".into(), name, total_memory_bytes: meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0) }
}

/// The GPUs NVML sees, as `cuda:N` in NVML's order, then the CPU.
pub fn discover() -> Vec<DeviceInfo> {
    let mut devices: Vec<DeviceInfo> = crate::train::memory::nvml_devices()
        .into_iter()
        .enumerate()
        .map(|(i, (name, total))| DeviceInfo { id: format!("cuda:{i}"), name, total_memory_bytes: total })
        .collect();
    devices.push(cpu_device());
    devices
}

/// Free memory of device `id` now: total minus what NVML counts as used (every
/// process) on a GPU, `MemAvailable` for the CPU; `None` where it cannot be read.
pub fn free_memory_bytes(device: &DeviceInfo) -> Option<u64> {
    if device.id == "cpu" {
        return meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable");
    }
    let index: u32 = device.id.strip_prefix("cuda:")?.parse().ok()?;
    let used = crate::train::memory::nvml_used_bytes(index)?;
    Some(device.total_memory_bytes.saturating_sub(used))
}

/// A `/proc/meminfo` field (given in KiB) in bytes.
fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    kib.checked_mul(1024)
}

/// The catalog entry for a GPU NVML names (its key without the memory suffix appears in
/// the name and the memory is within 10 %), or one made from what NVML says, made once
/// per name.
pub fn gpu_for(name: &str, total: u64) -> &'static Gpu {
    let norm = name.to_lowercase().replace([' ', '_'], "-");
    let close = |g: &&Gpu| {
        let base = match g.key.rsplit_once('-') {
            Some((base, size)) if size.ends_with("gb") => base,
            _ => g.key,
        };
        norm.contains(base) && (g.memory_bytes as f64 - total as f64).abs() < 0.1 * total as f64
    };
    if let Some(g) = gpus::CATALOG.iter().find(close) {
        return g;
    }
    // An unknown board: its own entry (Hopper-class assumptions for the workspaces),
    // leaked once per name so that every job on it shares it.
    static DETECTED: std::sync::Mutex<Vec<&'static Gpu>> = std::sync::Mutex::new(Vec::new());
    let mut detected = DETECTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(g) = detected.iter().find(|g| g.name == name && g.memory_bytes == total) {
        return g;
    }
    let g: &'static Gpu = Box::leak(Box::new(Gpu {
        key: "detected",
        name: Box::leak(name.to_owned().into_boxed_str()),
        memory_bytes: total,
        compute_capability: (9, 0),
    }));
    detected.push(g);
    g
}

/// What a plan's job runs on here, for its estimate: the GPU NVML lists for `cuda:N`
/// (with the plan's memory fraction resolved against it), else the CPU. `auto` becomes
/// the first GPU NVML lists, or the CPU.
pub fn target_for(plan: &mut Plan) -> anyhow::Result<Target> {
    let devices = crate::train::memory::nvml_devices();
    if plan.device == shared::plan::DeviceChoice::Auto {
        plan.device =
            if devices.is_empty() { shared::plan::DeviceChoice::Cpu } else { shared::plan::DeviceChoice::Cuda(0) };
    }
    Ok(match plan.device {
        shared::plan::DeviceChoice::Cuda(i) => {
            let (name, total) = devices
                .get(i as usize)
                .cloned()
                .with_context(|| format!("cuda:{i}: NVML does not list this device"))?;
            let g = gpu_for(&name, total);
            plan.resolve_memory_fraction(g.memory_bytes);
            Target::Cuda(*g)
        }
        _ => Target::Cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24567728 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal"), Some(24_567_728 * 1024));
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(20_000_000 * 1024));
        // A prefix of another field's name is not that field.
        assert_eq!(meminfo_bytes("MemAvailableX: 5 kB\n", "MemAvailable"), None);
        assert_eq!(meminfo_bytes("MemAvailable: lots kB\n", "MemAvailable"), None);
    }

    #[test]
    fn this_host_reports_its_free_memory() {
        let cpu = cpu_device();
        assert!(cpu.total_memory_bytes > 0);
        let free = free_memory_bytes(&cpu).expect("MemAvailable");
        assert!(free > 0 && free <= cpu.total_memory_bytes, "{free} of {}", cpu.total_memory_bytes);
        let unknown = DeviceInfo { id: "cuda:x".into(), name: "?".into(), total_memory_bytes: 1 };
        assert_eq!(free_memory_bytes(&unknown), None);
    }

    #[test]
    fn nvml_names_find_their_catalog_entries() {
        let mib = |m: u64| m << 20;
        assert_eq!(gpu_for("NVIDIA GeForce RTX 4090", mib(24_564)).key, "rtx-4090");
        assert_eq!(gpu_for("NVIDIA A100-SXM4-40GB", mib(40_960)).key, "a100-40gb");
        assert_eq!(gpu_for("Tesla V100-SXM2-16GB", mib(16_160)).key, "v100-16gb");
        assert_eq!(gpu_for("NVIDIA L4", mib(23_034)).key, "l4");
        let a = gpu_for("Some Future GPU", mib(200_000));
        assert_eq!(a.key, "detected");
        assert!(std::ptr::eq(a, gpu_for("Some Future GPU", mib(200_000))), "made once");
    }
}
