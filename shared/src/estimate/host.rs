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

use crate::graph::{Graph, Task, numel};
use crate::plan::{HostSpec, Runtime};
use crate::units::Bytes;

const MIB: u64 = 1 << 20;
pub const PROCESS_BASELINE_BYTES: u64 = 400 * MIB;
pub const WORKER_BASELINE_BYTES: u64 = 200 * MIB;
/// A Euclidean distance transform (SciPy's `distance_transform_edt`) per voxel: the
/// float64 distances, the int32 feature transform over three axes, the boolean input,
/// and the float32 prediction and label copies pulled off the GPU.
pub const DISTANCE_LOSS_BYTES_PER_VOXEL: u64 = 8 + 3 * 4 + 1 + 4 + 4;

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
    let distance_loss = if host.distance_loss_every > 0 {
        let voxels = match graph.task {
            Task::Segment { .. } => numel(&graph.values[graph.inputs[0].0].shape[2..]),
            _ => 0,
        };
        graph.micro_batch() * voxels * DISTANCE_LOSS_BYTES_PER_VOXEL
    } else {
        0
    };
    HostBreakdown {
        process: Bytes(PROCESS_BASELINE_BYTES),
        loader_workers: Bytes(loader_workers),
        pinned: Bytes(pinned),
        distance_loss: Bytes(distance_loss),
        tensors: Bytes(cpu_tensor_peak.unwrap_or(0)),
    }
}
