//! A catalog of common training GPUs and the memory a process can use on each.
//!
//! `memory_bytes` is the total NVML (and `nvidia-smi`) reports with ECC in its default
//! state, which is what `torch.cuda.mem_get_info()` counts from; the figures are the
//! commonly reported MiB totals of each board. The estimator subtracts the CUDA context
//! and compares the allocator's reserved peak with the rest.

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// Lower-case key used on the command line (`--gpu a100-40gb`).
    pub key: &'static str,
    pub name: &'static str,
    pub memory_bytes: u64,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (u32, u32),
}

impl Gpu {
    /// Whether bf16 autocast runs natively (Ampere and newer).
    pub fn supports_bf16(&self) -> bool {
        self.compute_capability.0 >= 8
    }
}

const fn gpu(key: &'static str, name: &'static str, mib: u64, cc: (u32, u32)) -> Gpu {
    Gpu { key, name, memory_bytes: mib * MIB, compute_capability: cc }
}

pub const CATALOG: [Gpu; 24] = [
    gpu("t4", "NVIDIA T4 16GB", 15_360, (7, 5)),
    gpu("v100-16gb", "NVIDIA V100 16GB", 16_150, (7, 0)),
    gpu("v100-32gb", "NVIDIA V100 32GB", 32_510, (7, 0)),
    gpu("p100", "NVIDIA P100 16GB", 16_280, (6, 0)),
    gpu("a10", "NVIDIA A10 24GB", 23_028, (8, 6)),
    gpu("a10g", "NVIDIA A10G 24GB", 23_028, (8, 6)),
    gpu("a30", "NVIDIA A30 24GB", 24_576, (8, 0)),
    gpu("a40", "NVIDIA A40 48GB", 46_068, (8, 6)),
    gpu("a100-40gb", "NVIDIA A100 40GB", 40_960, (8, 0)),
    gpu("a100-80gb", "NVIDIA A100 80GB", 81_920, (8, 0)),
    gpu("l4", "NVIDIA L4 24GB", 23_034, (8, 9)),
    gpu("l40s", "NVIDIA L40S 48GB", 46_068, (8, 9)),
    gpu("h100-pcie", "NVIDIA H100 PCIe 80GB", 81_559, (9, 0)),
    gpu("h100", "NVIDIA H100 SXM 80GB", 81_559, (9, 0)),
    gpu("h200", "NVIDIA H200 141GB", 143_771, (9, 0)),
    gpu("b200", "NVIDIA B200 180GB", 183_359, (10, 0)),
    gpu("rtx-a6000", "NVIDIA RTX A6000 48GB", 49_140, (8, 6)),
    gpu("rtx-6000-ada", "NVIDIA RTX 6000 Ada 48GB", 49_140, (8, 9)),
    gpu("rtx-2080-ti", "NVIDIA GeForce RTX 2080 Ti 11GB", 11_264, (7, 5)),
    gpu("rtx-3060", "NVIDIA GeForce RTX 3060 12GB", 12_288, (8, 6)),
    gpu("rtx-3090", "NVIDIA GeForce RTX 3090 24GB", 24_576, (8, 6)),
    gpu("rtx-4080", "NVIDIA GeForce RTX 4080 16GB", 16_376, (8, 9)),
    gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 24_564, (8, 9)),
    gpu("rtx-5090", "NVIDIA GeForce RTX 5090 32GB", 32_607, (12, 0)),
];

/// Finds a GPU by key, ignoring case, spaces and underscores (`A100_40GB`, `a100-40gb`).
pub fn find(name: &str) -> Option<&'static Gpu> {
    let norm = |s: &str| s.to_lowercase().replace([' ', '_'], "-");
    let want = norm(name);
    CATALOG.iter().find(|g| g.key == want || norm(g.name) == want)
}

/// A GPU a plan is checked against: a catalog key (`v100-16gb`), or a memory size with
/// the catalog card whose generation it shares (`24GiB@a10`; a bare size is taken as an
/// Ampere-class card, `a100-40gb`'s generation). Errors list what is accepted.
pub fn resolve(text: &str) -> Result<Gpu, String> {
    if let Some(g) = find(text) {
        return Ok(*g);
    }
    let (size, like) = match text.split_once('@') {
        Some((size, like)) => (size, like),
        None => (text, "a100-40gb"),
    };
    if !size.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("unknown GPU '{text}'; see `headroom gpus`, or give a size such as 24GiB@a10"));
    }
    let like = find(like).ok_or_else(|| format!("unknown GPU '{like}'; see `headroom gpus`"))?;
    let memory_bytes = crate::units::parse_bytes(size).map_err(|e| {
        format!("'{text}' is neither a catalog GPU (see `headroom gpus`) nor a size such as 24GiB@a10: {e}")
    })?;
    if !(MIN_CUSTOM_BYTES..=MAX_CUSTOM_BYTES).contains(&memory_bytes) {
        return Err(format!("a custom GPU's memory must be between 1 GiB and 1 TiB, got '{size}'"));
    }
    Ok(Gpu { key: "custom", name: like.name_of_custom(), memory_bytes, compute_capability: like.compute_capability })
}

/// Limits on a custom GPU's memory.
pub const MIN_CUSTOM_BYTES: u64 = 1 << 30;
pub const MAX_CUSTOM_BYTES: u64 = 1 << 40;

impl Gpu {
    fn name_of_custom(&self) -> &'static str {
        match self.compute_capability.0 {
            0..=6 => "custom GPU (Pascal class)",
            7 => "custom GPU (Volta/Turing class)",
            8 => "custom GPU (Ampere/Ada class)",
            9 => "custom GPU (Hopper class)",
            _ => "custom GPU (Blackwell class)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_gpus_take_a_size_and_a_generation() {
        let g = resolve("24GiB@v100-16gb").expect("custom");
        assert_eq!((g.memory_bytes, g.compute_capability), (24 << 30, (7, 0)));
        assert!(!g.supports_bf16());
        assert_eq!(resolve("48GiB").expect("bare size").compute_capability, (8, 0));
        assert_eq!(resolve("V100_16GB").expect("catalog").key, "v100-16gb");
        assert!(resolve("12MiB").is_err_and(|e| e.contains("between 1 GiB")));
        assert!(resolve("tpu").is_err_and(|e| e.contains("headroom gpus")));
        assert!(resolve("24GiB@tpu").is_err_and(|e| e.contains("unknown GPU 'tpu'")));
    }

    #[test]
    fn catalog_has_twenty_unique_gpus_and_finds_them_loosely() {
        let mut keys: Vec<&str> = CATALOG.iter().map(|g| g.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), CATALOG.len(), "every key is unique");
        assert!(keys.len() >= 20);
        assert_eq!(find("A100_40GB").map(|g| g.key), Some("a100-40gb"));
        assert_eq!(find("v100-16gb").map(|g| g.memory_bytes), Some(16_150 * MIB));
        assert!(find("tpu-v4").is_none());
    }
}
