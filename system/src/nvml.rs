//! The GPUs as the driver sees them, through NVML. Every reader fails softly: on a
//! machine without a driver they say nothing and the caller carries on.

use std::sync::OnceLock;

fn nvml() -> Option<&'static nvml_wrapper::Nvml> {
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    NVML.get_or_init(|| nvml_wrapper::Nvml::init().ok()).as_ref()
}

/// Device memory in use on GPU `index` as NVML sees it (every process), if NVML loads.
pub fn used_bytes(index: u32) -> Option<u64> {
    let device = nvml()?.device_by_index(index).ok()?;
    device.memory_info().ok().map(|m| m.used)
}

/// GPUs NVML can see: (name, total bytes), in NVML's order. Empty where there is no
/// driver.
pub fn devices() -> Vec<(String, u64)> {
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

/// Whether the driver's NVML library loaded.
pub fn available() -> bool {
    nvml().is_some()
}
