pub mod advisor;
pub mod chart;
pub mod effects;
pub mod estimate;
pub mod plan_form;
pub mod run;
pub mod share;
