//! Tensor memory from the allocators themselves: the counting CPU allocator and the CUDA
//! caching allocator (through the shim in `csrc/memory.cpp`). NVML and `/proc` are read
//! by `system`, below the agent and the trainer both.

use crate::ffi;

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
