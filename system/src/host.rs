//! The host: its memory from `/proc/meminfo` and the cgroup, its CPU's name, and this
//! process's resident set (current, high-water mark, and what glibc can give back).

use std::path::Path;

/// A `/proc/meminfo` field (given in KiB) in bytes. The one parser of that file.
pub fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    kib.checked_mul(1024)
}

fn meminfo(field: &str) -> Option<u64> {
    meminfo_bytes(&std::fs::read_to_string("/proc/meminfo").ok()?, field)
}

/// The machine's RAM (`MemTotal`), if readable.
pub fn total_memory_bytes() -> Option<u64> {
    meminfo("MemTotal")
}

/// Memory the kernel can hand out now without swapping (`MemAvailable`), if readable.
pub fn available_memory_bytes() -> Option<u64> {
    meminfo("MemAvailable")
}

/// The CPU's model name from `/proc/cpuinfo`, else the architecture.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, n)| n.trim().to_owned()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// The instruction set oneDNN dispatches on here: the first processor's flags in
/// `/proc/cpuinfo`, lowered by oneDNN's `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`) when
/// this process has it; `None` where the flags cannot be read or hold none of its ISAs.
pub fn cpu_isa() -> Option<shared::machine::CpuIsa> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find_map(|l| l.strip_prefix("flags").and_then(|v| v.split_once(':')))?.1;
    let limit = std::env::var("ONEDNN_MAX_CPU_ISA").or_else(|_| std::env::var("DNNL_MAX_CPU_ISA")).ok();
    Some(shared::machine::CpuIsa::from_flags(flags)?.limited_by(limit.as_deref()))
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
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

/// Hands the allocator's free memory back to the kernel (glibc's `malloc_trim`), so that
/// the resident set counts what is in use: batches freed on a loader thread otherwise stay
/// cached in that thread's arena. Returns the resident set afterwards.
pub fn trim() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    unsafe {
        libc::malloc_trim(0);
    }
    rss_bytes()
}

/// How much more host memory the job can take before something stops it, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostHeadroom {
    pub bytes: u64,
    pub bound: &'static str,
}

/// The tightest of: the plan's limit less this process's RSS, the cgroup's room, the
/// machine's available memory — each less `ahead`, what the next step will still add.
pub fn headroom(rss: u64, ahead: u64, plan_limit: Option<u64>) -> HostHeadroom {
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
    consider(available_memory_bytes(), "the machine's available memory");
    best.bytes = best.bytes.saturating_sub(ahead);
    best
}

/// One counter of a cgroup's `memory.stat` (0 when absent).
fn stat(path: &Path, key: &str) -> u64 {
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

fn read_u64(path: &Path) -> Option<u64> {
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
            let dir = Path::new("/sys/fs/cgroup").join(rel);
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
            let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
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
    fn this_process_has_a_resident_set_and_the_machine_memory() {
        assert!(rss_bytes() > 0);
        let (total, available) =
            (total_memory_bytes().expect("MemTotal"), available_memory_bytes().expect("MemAvailable"));
        assert!(available <= total, "{available} > {total}");
        // One reading of the resident set (it moves while other tests run): the plan's
        // limit 1000 bytes above it is the tightest bound.
        let rss = rss_bytes();
        let room = headroom(rss, 0, Some(rss + 1000));
        assert_eq!((room.bytes, room.bound), (1000, "the plan's host_memory_limit"));
    }
}
