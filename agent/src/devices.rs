//! Device discovery in one place: the devices this agent offers jobs and how much of
//! their memory is free (NVML for GPUs, `/proc` for the host), the catalog card a GPU's
//! estimate uses, and what a plan's `device` resolves to here.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use shared::estimate::Target;
use shared::gpus::{self, Gpu};
use shared::machine::{Machine, RunsOn};
use shared::plan::Plan;
use shared::protocol::DeviceInfo;

/// The host's CPU as a device: its model name and the machine's RAM.
pub fn cpu_device() -> DeviceInfo {
    DeviceInfo {
        id: "cpu".into(),
        name: system::host::cpu_name(),
        total_memory_bytes: system::host::total_memory_bytes().unwrap_or(0),
    }
}

/// The GPUs NVML sees, as `cuda:N` in NVML's order, then the CPU.
pub fn discover() -> Vec<DeviceInfo> {
    let mut devices: Vec<DeviceInfo> = system::nvml::devices()
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
        return system::host::available_memory_bytes();
    }
    let index: u32 = device.id.strip_prefix("cuda:")?.parse().ok()?;
    let used = system::nvml::used_bytes(index)?;
    Some(device.total_memory_bytes.saturating_sub(used))
}

/// How long a worker probe may take (libtorch loads and asks the CUDA driver).
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

/// What this process learned from its first probe: the machine does not change while it
/// runs, so later commands (a find-batch's every probe run) ask no worker again.
static PROBED: std::sync::OnceLock<Machine> = std::sync::OnceLock::new();

/// What this machine's trainer can use, asked of a worker process (`headroom worker
/// --probe`) once per process, so that this process never initialises CUDA or libtorch's
/// threads. A probe that fails leaves the CPU with the threads the operating system
/// reports.
pub async fn probe_machine(exe: &Path) -> Machine {
    if let Some(m) = PROBED.get() {
        return *m;
    }
    let exe = exe.to_owned();
    match tokio::task::spawn_blocking(move || probe_machine_blocking(&exe)).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("could not probe this machine ({e}); jobs will run on the CPU");
            *PROBED.get_or_init(cpu_only)
        }
    }
}

/// [`probe_machine`] for the commands that run without the async runtime (and its one
/// implementation): the probe's report within [`PROBE_TIMEOUT`], else the CPU.
pub fn probe_machine_blocking(exe: &Path) -> Machine {
    if let Some(m) = PROBED.get() {
        return *m;
    }
    let report = (|| {
        let mut child = std::process::Command::new(exe)
            .args(["worker", "--probe"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("could not start it: {e}"))?;
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer in {PROBE_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("it ended with {}", out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        system::job::parse_probe(&text).ok_or_else(|| format!("it said {:?}", text.trim()))
    })();
    let machine = report.unwrap_or_else(|e| {
        tracing::warn!("could not probe this machine ({e}); jobs will run on the CPU");
        cpu_only()
    });
    *PROBED.get_or_init(|| machine)
}

fn cpu_only() -> Machine {
    Machine {
        cuda_devices: 0,
        cpu_threads: std::thread::available_parallelism().map_or(1, |p| p.get() as u64),
        cpu_isa: system::host::cpu_isa(),
    }
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

/// What a plan's job runs on here, and the target of its estimate: `device` resolved by
/// the machine's rule (`auto` is the first GPU libtorch can use, else the CPU) and
/// written back into the plan; for `cuda:N`, the catalog card of the GPU `devices` lists
/// under that id.
pub fn target_for(plan: &mut Plan, machine: &Machine, devices: &[DeviceInfo]) -> anyhow::Result<(RunsOn, Target)> {
    let runs_on = machine.runs_on(plan.device)?;
    plan.device = runs_on.choice();
    let target = match runs_on {
        RunsOn::Cuda(_) => {
            let id = runs_on.id();
            let d = devices
                .iter()
                .find(|d| d.id == id)
                .with_context(|| format!("{id}: NVML does not list this device, so its memory is unknown"))?;
            Target::Cuda(*gpu_for(&d.name, d.total_memory_bytes))
        }
        RunsOn::Cpu => Target::Cpu,
    };
    Ok((runs_on, target))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_plans_device_resolves_by_the_machines_rule_to_its_estimate_target() {
        let a100 =
            DeviceInfo { id: "cuda:0".into(), name: "NVIDIA A100-SXM4-40GB".into(), total_memory_bytes: 40 << 30 };
        let gpu_box = Machine { cuda_devices: 1, cpu_threads: 8, cpu_isa: None };
        let mut plan = Plan::example_cnn();
        let (runs_on, target) =
            target_for(&mut plan, &gpu_box, std::slice::from_ref(&a100)).expect("auto on a GPU box");
        assert!(matches!(target, Target::Cuda(g) if g.key == "a100-40gb"), "{target:?}");
        assert_eq!(runs_on.id(), "cuda:0");
        assert_eq!(plan.device, shared::plan::DeviceChoice::Cuda(0));
        // A driver libtorch cannot use: NVML lists the GPU, auto is still the CPU.
        let mut plan = Plan::example_cnn();
        let no_cuda = Machine { cuda_devices: 0, cpu_threads: 8, cpu_isa: None };
        assert!(matches!(target_for(&mut plan, &no_cuda, std::slice::from_ref(&a100)), Ok((RunsOn::Cpu, Target::Cpu))));
        assert_eq!(plan.device, shared::plan::DeviceChoice::Cpu);
        let mut plan = Plan { device: shared::plan::DeviceChoice::Cuda(1), ..Plan::example_cnn() };
        let e = target_for(&mut plan, &gpu_box, &[a100]).expect_err("one GPU");
        assert!(e.to_string().contains("cuda:1 requested but 1 CUDA devices are visible"), "{e}");
        // libtorch sees a GPU that NVML does not list: its memory is unknown.
        let mut plan = Plan::example_cnn();
        let e = target_for(&mut plan, &gpu_box, &[]).expect_err("no NVML");
        assert!(e.to_string().contains("NVML does not list"), "{e}");
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
