//! Pure Rust shared by the agent (native) and the planner (wasm32): the model
//! description, the memory estimator, the plan and the wire protocol.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of tokio, tch or
//! web-sys, so that the planner computes exactly what the agent computes.

pub mod advise;
pub mod chart;
pub mod codec;
pub mod estimate;
pub mod export;
pub mod fleet;
pub mod form;
pub mod gpus;
pub mod graph;
pub mod import;
pub mod isa;
pub mod leak;
pub mod link;
pub mod machine;
pub mod paths;
pub mod plan;
pub mod presets;
pub mod protocol;
pub mod schema;
pub mod synthetic;
pub mod units;
pub mod watch;
pub mod whatif;
pub mod zoo;

#[cfg(test)]
mod fuzz;

pub use estimate::{Breakdown, Estimate, Phase, estimate};
pub use graph::Graph;
pub use plan::{Plan, PlanError};
pub use units::Bytes;
