//! What the agent and the trainer both read of the machine, below both of them: the GPUs
//! NVML sees, the host's memory from `/proc` and the cgroup, the process's resident set,
//! the framing of the agent ↔ worker pipe, what a worker probe reports and the files the
//! agent hands a job.
//!
//! Architecture invariant: nothing here names tch or libtorch, so the agent's server can
//! use all of it without linking the trainer's code paths.

pub mod host;
pub mod job;
pub mod nvml;
pub mod pipe;
pub mod pt2;
