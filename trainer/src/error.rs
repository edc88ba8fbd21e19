//! How a job fails, and what the agent is told: each failure maps to one wire code.

use shared::protocol::{ErrorCode, JobError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("device: {0}")]
    Device(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Data(String),
    #[error("host memory: {0}")]
    HostMemory(String),
}

impl From<crate::data::DataError> for TrainError {
    fn from(e: crate::data::DataError) -> TrainError {
        TrainError::Data(e.0)
    }
}

impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> TrainError {
        let text = e.to_string();
        // libtorch's own first line is the useful part; the rest is a C++ backtrace.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or(&text).trim().to_owned();
        if text.contains("out of memory") || text.contains("OutOfMemoryError") {
            TrainError::OutOfMemory(first)
        } else {
            TrainError::Torch(first)
        }
    }
}

impl TrainError {
    pub fn to_wire(&self) -> JobError {
        let code = match self {
            TrainError::Cancelled => ErrorCode::Cancelled,
            TrainError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            TrainError::Torch(_) | TrainError::Device(_) => ErrorCode::Torch,
            // A checkpoint that does not fit the plan is bad input, as a bad plan is.
            TrainError::InvalidPlan(_) | TrainError::Checkpoint(_) | TrainError::Data(_) => ErrorCode::InvalidPlan,
            TrainError::HostMemory(_) => ErrorCode::HostMemory,
        };
        JobError { code, message: self.to_string() }
    }

    /// A shim's error text (out-of-memory recognised).
    pub fn from_shim(e: String) -> TrainError {
        TrainError::from(tch::TchError::Torch(e))
    }

    /// A plan that does not validate.
    pub fn plan(e: impl std::fmt::Display) -> TrainError {
        TrainError::InvalidPlan(e.to_string())
    }
}
