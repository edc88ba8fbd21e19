//! Limits a plan must respect. Each one is named in the error that enforces it.

pub const MAX_MICRO_BATCH: u64 = 65_536;
pub const MAX_ACCUMULATION: u64 = 4_096;
pub const MAX_STEPS: u64 = 10_000_000;
/// The surface (boundary) term's weight in the loss.
pub const MAX_SURFACE_WEIGHT: f64 = 1_000.0;
pub const MAX_EPOCHS: u64 = 100_000;
pub const MAX_SAMPLES_PER_EPOCH: u64 = 1_000_000_000;
pub const MAX_INPUT_DIMS: usize = 3;
pub const MAX_INPUT_DIM: u64 = 16_384;
pub const MAX_CLASSES: u64 = 1_000_000;
/// Parameters above this are refused: 2^34 fp32 weights alone would be 64 GiB.
pub const MAX_PARAMS: u64 = 1 << 34;
pub const MAX_LEARNING_RATE: f64 = 100.0;
pub const MAX_NAME_LEN: usize = 128;
pub use crate::paths::MAX_DATA_PATH_LEN;
/// The smallest host memory limit: below it no libtorch worker starts.
pub const MIN_HOST_MEMORY_LIMIT: u64 = 64 << 20;
/// The largest single activation (micro-batch included) a plan may ask for: 1 TiB,
/// beyond any device, and far from where byte counts could overflow.
pub const MAX_TENSOR_BYTES: u64 = 1 << 40;
pub const MAX_CHECKPOINT_SEGMENTS: u64 = 1_024;
pub const MAX_LOADER_WORKERS: u64 = 256;
pub const MAX_PREFETCH: u64 = 64;
pub const MAX_CPU_THREADS: u64 = 1_024;
/// The most a leak demonstration keeps per step: 1 GiB.
pub const MAX_RETAIN_BYTES_PER_STEP: u64 = 1 << 30;
