//! Host (CPU RAM) memory of a training process: the process itself, DataLoader workers
//! with their prefetched batches, pinned staging buffers, an expensive CPU-side loss,
//! and, when the job trains on the CPU, the tensors themselves.
//!
//! Assumptions (documented, per process): a Python training process with torch imported
//! holds about 400 MiB before its first tensor (our worker, libtorch without Python,
//! holds less; see docs/accuracy.md for the measured figure); each DataLoader worker is a
//! forked process that dirties about 200 MiB of its own (interpreter, transforms, its
//! copy of the dataset index) plus the batches it has prefetched.

use serde::{Deserialize, Serialize};

use crate::graph::{Graph, numel};
use crate::plan::{HostSpec, Runtime};
use crate::units::Bytes;

const MIB: u64 = 1 << 20;
pub const PROCESS_BASELINE_BYTES: u64 = 400 * MIB;
pub const WORKER_BASELINE_BYTES: u64 = 200 * MIB;
/// The surface term's host memory (`distance_loss_every`), as Headroom's trainer holds
/// it: the labels copied off the device as float32 and the signed distance maps it makes
/// (float32, one per foreground class), for the whole micro-batch; and, for one sample
/// and class at a time, the boolean mask and its complement, the two float64 distance
/// transforms (to the region and to its outside) and the transform's int32 nearest-voxel index per axis.
/// SciPy's `distance_transform_edt` holds the same per call; NumPy's temporaries in a
/// user's own `one_hot2dist` add to it.
pub fn surface_bytes(graph: &Graph) -> u64 {
    let Some(t) = &graph.surface else { return 0 };
    let logits = &graph.values[t.logits].shape;
    let map = &graph.values[t.map].shape;
    let batch = logits[0];
    let voxels = numel(&logits[2..]);
    let axes = logits.len() as u64 - 2;
    let per_sample_class = voxels * (2 + 8 + 8 + 4 * axes);
    batch * voxels * 4 + numel(map) * 4 + per_sample_class
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBreakdown {
    pub process: Bytes,
    pub loader_workers: Bytes,
    pub pinned: Bytes,
    pub distance_loss: Bytes,
    /// Tensor memory when the job trains on the CPU.
    pub tensors: Bytes,
}

impl HostBreakdown {
    pub fn total(&self) -> Bytes {
        self.process + self.loader_workers + self.pinned + self.distance_loss + self.tensors
    }

    pub fn entries(&self) -> [(&'static str, Bytes); 5] {
        [
            ("process", self.process),
            ("loader_workers", self.loader_workers),
            ("pinned", self.pinned),
            ("distance_loss", self.distance_loss),
            ("tensors", self.tensors),
        ]
    }
}

/// Bytes of one micro-batch as the loader delivers it: every graph input, labels included.
pub fn batch_bytes(graph: &Graph) -> u64 {
    graph.inputs.iter().map(|&(v, _)| graph.bytes(v)).sum()
}

/// Host memory of the training process. PyTorch's DataLoader workers are processes with
/// a baseline each; Headroom's loader workers are threads of the one process, each
/// holding one sample it is decoding besides the batches in flight.
pub fn estimate(graph: &Graph, host: &HostSpec, runtime: Runtime, cpu_tensor_peak: Option<u64>) -> HostBreakdown {
    let batch = batch_bytes(graph);
    let in_flight = host.workers * host.prefetch_factor;
    let per_worker = match runtime {
        Runtime::Pytorch => WORKER_BASELINE_BYTES,
        Runtime::Headroom => batch / graph.micro_batch().max(1),
    };
    let loader_workers = host.workers * per_worker + in_flight * batch;
    // Without workers the main process makes one batch at a time; with pinning, every
    // batch in flight is also copied into page-locked memory by the pin thread.
    let pinned = if host.pin_memory { in_flight.max(1) * batch } else { 0 };
    let distance_loss = if host.distance_loss_every > 0 { surface_bytes(graph) } else { 0 };
    HostBreakdown {
        process: Bytes(PROCESS_BASELINE_BYTES),
        loader_workers: Bytes(loader_workers),
        pinned: Bytes(pinned),
        distance_loss: Bytes(distance_loss),
        tensors: Bytes(cpu_tensor_peak.unwrap_or(0)),
    }
}
