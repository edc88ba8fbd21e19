//! Headroom's trainer: runs a plan's training loop with libtorch in a worker process and
//! reports every micro-batch's loss and memory. The agent reaches it only through
//! [`worker`], the hidden `headroom worker` command.
//!
//! Architecture invariant: this is the only crate that names tch (the others do not
//! depend on it, so the compiler keeps the rule).

mod checkpoint;
mod data;
mod distance;
mod error;
mod ffi;
mod memory;
mod model;
mod synthetic;
mod training;
pub mod worker;
