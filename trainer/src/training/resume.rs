//! Resuming: the checkpoint to continue from, read and checked against the plan before
//! anything is built.

use std::path::{Path, PathBuf};

use shared::plan::Plan;

use crate::checkpoint;
use crate::error::TrainError;

/// A checkpoint a run continues from.
pub(super) struct Resume {
    pub dir: PathBuf,
    pub state: checkpoint::State,
}

impl Resume {
    /// Reads `path` (a `step-N` checkpoint or a checkpoint directory) and refuses one the
    /// plan cannot continue: nothing left to run, another effective batch, another
    /// optimizer. It says which micro-batch the run had reached (an OOM fallback may have
    /// halved it).
    pub fn read(path: &Path, plan: &Plan) -> Result<Resume, TrainError> {
        let dir = checkpoint::locate(path)?;
        let state = checkpoint::read_state(&dir, plan.model_name())?;
        if state.step >= plan.total_steps() {
            return Err(TrainError::Checkpoint(format!(
                "{}: was saved after step {}; the plan runs {} steps, so there is nothing left to run",
                dir.display(),
                state.step,
                plan.total_steps()
            )));
        }
        if state.micro_batch.checked_mul(state.accumulation) != Some(plan.micro_batch * plan.accumulation) {
            return Err(TrainError::Checkpoint(format!(
                "{}: was saved with an effective batch of {} x {}; this plan's is {} x {}",
                dir.display(),
                state.micro_batch,
                state.accumulation,
                plan.micro_batch,
                plan.accumulation
            )));
        }
        // libtorch's optimizer state carries its options: a resumed plan must name the
        // same optimizer, or its own options would be silently replaced.
        let optimizer = format!("{:?}", plan.optimizer);
        if state.optimizer != optimizer {
            return Err(TrainError::Checkpoint(format!(
                "{}: was saved with optimizer {}; this plan's is {optimizer}",
                dir.display(),
                state.optimizer
            )));
        }
        Ok(Resume { dir, state })
    }
}
