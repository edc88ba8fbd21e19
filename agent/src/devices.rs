//! The devices this agent offers jobs and how much of their memory is free: NVML for
//! GPUs, `/proc` for the host. The catalog card a GPU's estimate uses is
//! `probe::gpu_for`.

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
}
