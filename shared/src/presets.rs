//! The five workloads of `docs/workloads.md` (W1-W5) before and after their users' hand
//! fixes: the plan files in `examples/`, embedded at build time so that the CLI, the
//! accuracy table and the planner read one source.

use crate::plan::{Plan, PlanError};

/// One preset: a plan file and the GPU its story ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// `w1-before` ... `w5-after`, the file's name in `examples/`.
    pub id: &'static str,
    /// The GPU of the story (a catalog key).
    pub gpu: &'static str,
    pub text: &'static str,
}

macro_rules! preset {
    ($id:literal, $gpu:literal) => {
        Preset { id: $id, gpu: $gpu, text: include_str!(concat!("../../examples/", $id, ".yaml")) }
    };
}

pub const PRESETS: [Preset; 10] = [
    preset!("w1-before", "v100-16gb"),
    preset!("w1-after", "v100-16gb"),
    preset!("w2-before", "v100-16gb"),
    preset!("w2-after", "v100-16gb"),
    preset!("w3-before", "v100-16gb"),
    preset!("w3-after", "v100-16gb"),
    preset!("w4-before", "a100-80gb"),
    preset!("w4-after", "a100-80gb"),
    preset!("w5-before", "a100-40gb"),
    preset!("w5-after", "a100-40gb"),
];

impl Preset {
    pub fn find(id: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.id == id)
    }

    pub fn plan(&self) -> Result<Plan, PlanError> {
        Plan::from_text(self.text)
    }

    /// The file's leading comment, without the command line that repeats it.
    pub fn story(&self) -> String {
        self.text
            .lines()
            .map_while(|l| l.strip_prefix('#'))
            .map(str::trim)
            .filter(|l| !l.starts_with("headroom "))
            .collect::<Vec<_>>()
            .join(" ")
            .trim_end_matches(':')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_loads_and_names_a_catalog_gpu_its_file_names_too() {
        for p in &PRESETS {
            let plan = p.plan().unwrap_or_else(|e| panic!("{}: {e}", p.id));
            assert_eq!(plan.name, p.id);
            assert!(crate::gpus::find(p.gpu).is_some(), "{}", p.gpu);
            assert!(p.text.contains(&format!("--gpu {}", p.gpu)), "{}: the file's command names another GPU", p.id);
            assert!(p.story().len() > 40, "{}", p.id);
        }
    }
}
