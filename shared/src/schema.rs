//! Every key a plan takes, with its kind, default, unit and help: the one description
//! from which the CLI's `--set`, plan files, share links and the planner's form are
//! served. The plan knobs come from `plan::KNOBS`; a model's own keys from its builder
//! ([`crate::zoo::schema`]), so a new zoo model needs no entry here.

use serde::Serialize;

use crate::plan::Plan;
use crate::zoo::{self, Param, ZooError};

pub use crate::plan::Group;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    #[serde(flatten)]
    pub param: Param,
    pub group: Group,
}

/// The plan's own knobs (`plan::KNOBS`), in their order, with defaults from
/// [`Plan::zoo`] (what a key left out means).
pub fn plan_fields() -> Vec<Field> {
    let base = Plan::zoo("mlp");
    crate::plan::KNOBS
        .iter()
        .map(|k| Field {
            param: Param {
                key: k.key.to_owned(),
                kind: (k.kind)(),
                default: (k.default)(&base),
                unit: k.unit,
                help: k.help,
            },
            group: k.group,
        })
        .collect()
}

/// Model `name`'s keys followed by the plan's knobs.
pub fn fields(name: &str) -> Result<Vec<Field>, ZooError> {
    let mut out: Vec<Field> =
        zoo::schema(name)?.into_iter().map(|param| Field { param, group: Group::Model }).collect();
    out.extend(plan_fields());
    Ok(out)
}

/// An exported model's keys (its dynamic sizes), then the plan's.
pub fn file_fields(model: &crate::import::Imported) -> Vec<Field> {
    let mut out: Vec<Field> =
        crate::import::lower::schema(model).into_iter().map(|param| Field { param, group: Group::Model }).collect();
    out.extend(plan_fields());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plan_key_is_one_apply_settings_takes_and_its_default_is_the_base() {
        let base = Plan::zoo("resnet18");
        for f in plan_fields() {
            assert!(!f.param.help.is_empty(), "{}", f.param.key);
            // Momentum applies to SGD only; the base is AdamW.
            if f.param.default.is_empty() || ["name", "momentum"].contains(&f.param.key.as_str()) {
                continue;
            }
            let mut plan = Plan::zoo("resnet18");
            plan.apply_settings(&[(f.param.key.clone(), f.param.default.clone())])
                .unwrap_or_else(|e| panic!("{}: {e}", f.param.key));
            plan.validate().unwrap_or_else(|e| panic!("{}: {e}", f.param.key));
            assert_eq!(plan, base, "{}={} changes the base plan", f.param.key, f.param.default);
        }
        // Every knob once.
        let keys: std::collections::BTreeSet<String> = plan_fields().into_iter().map(|f| f.param.key).collect();
        assert_eq!(keys.len(), crate::plan::KNOBS.len(), "a knob defined twice");
        // A key that is not a plan knob is a model key, and the model names it.
        let mut plan = Plan::zoo("resnet18");
        plan.apply_settings(&[("bogus".to_owned(), "1".to_owned())]).expect("stored");
        assert!(plan.validate().expect_err("unknown").to_string().contains("bogus"));
    }
}
