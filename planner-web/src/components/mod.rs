//! The planner's building blocks.

pub mod chart;
pub mod estimate;
pub mod plan_form;
pub mod run;
