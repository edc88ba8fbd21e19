//! The earlier plan format: `mlp` and `small_cnn` with `input_shape` and `classes`, read
//! as the zoo models of the same name, so that every surface has one input path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::limits;
use super::validate::{check_range, invalid};
use super::{ModelSpec, Plan, PlanError};
use crate::zoo::join;

/// A model as earlier plan files gave it, with the plan's `input_shape` and `classes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Earlier {
    /// The zoo's `mlp`: `Linear -> ReLU` per hidden width.
    Mlp { hidden: Vec<u64> },
    /// The zoo's `small_cnn`: `Conv3x3 -> ReLU -> MaxPool2x2` per entry.
    SmallCnn { channels: Vec<u64> },
}

impl From<Earlier> for ModelSpec {
    fn from(earlier: Earlier) -> ModelSpec {
        let name = match earlier {
            Earlier::Mlp { .. } => "mlp",
            Earlier::SmallCnn { .. } => "small_cnn",
        };
        ModelSpec { name: name.to_owned(), settings: BTreeMap::new(), earlier: Some(earlier), file: None }
    }
}

/// How a model is written in plan files and on the wire: today's `zoo`, or one of the
/// earlier shapes (externally tagged, so `{"mlp": {"hidden": [...]}}` still reads).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ModelFile {
    Mlp {
        hidden: Vec<u64>,
    },
    SmallCnn {
        channels: Vec<u64>,
    },
    Zoo {
        name: String,
        settings: BTreeMap<String, String>,
    },
    /// A model the user exported (`torch.export`): the file's path as the plan gives it
    /// and, once read, its graph (structure and sizes, no weights).
    File {
        path: String,
        #[serde(default)]
        settings: BTreeMap<String, String>,
        #[serde(default)]
        graph: Option<crate::import::Imported>,
    },
}

impl From<ModelFile> for ModelSpec {
    fn from(file: ModelFile) -> ModelSpec {
        match file {
            ModelFile::Zoo { name, settings } => ModelSpec::new(name, settings),
            ModelFile::File { path, settings, graph } => ModelSpec {
                file: Some(super::FileModel { path, graph: graph.map(std::sync::Arc::new) }),
                ..ModelSpec::new(crate::zoo::IMPORTED, settings)
            },
            ModelFile::Mlp { hidden } => Earlier::Mlp { hidden }.into(),
            ModelFile::SmallCnn { channels } => Earlier::SmallCnn { channels }.into(),
        }
    }
}

impl From<ModelSpec> for ModelFile {
    fn from(spec: ModelSpec) -> ModelFile {
        if let Some(file) = spec.file {
            return ModelFile::File {
                path: file.path,
                settings: spec.settings,
                graph: file.graph.map(|g| (*g).clone()),
            };
        }
        match spec.earlier {
            Some(Earlier::Mlp { hidden }) => ModelFile::Mlp { hidden },
            Some(Earlier::SmallCnn { channels }) => ModelFile::SmallCnn { channels },
            None => ModelFile::Zoo { name: spec.name, settings: spec.settings },
        }
    }
}

impl Plan {
    /// Turns the earlier `mlp`/`small_cnn` format into the zoo model of the same name, so
    /// that every surface has one input path. Errors say how the old fields map.
    pub fn normalize(&mut self) -> Result<(), PlanError> {
        use limits::*;
        let (name, mut settings) = match &self.model.earlier {
            None => {
                if !self.input_shape.is_empty() || self.classes != 0 {
                    return Err(invalid(
                        "input_shape",
                        "zoo models take their input size and classes from model settings (image, volume, seq, num_classes), not input_shape/classes",
                    ));
                }
                return Ok(());
            }
            Some(Earlier::Mlp { hidden }) => ("mlp", vec![("hidden", join(hidden))]),
            Some(Earlier::SmallCnn { channels }) => ("small_cnn", vec![("channels", join(channels))]),
        };
        check_range("classes", self.classes, 2, MAX_CLASSES)?;
        if self.input_shape.is_empty() || self.input_shape.len() > MAX_INPUT_DIMS {
            return Err(invalid("input_shape", format!("must have 1 to {MAX_INPUT_DIMS} dimensions")));
        }
        if let Some(d) = self.input_shape.iter().find(|&&d| d == 0 || d > MAX_INPUT_DIM) {
            return Err(invalid("input_shape", format!("each dimension must be 1 to {MAX_INPUT_DIM}, got {d}")));
        }
        match name {
            "mlp" => {
                if self.input_shape.len() != 1 {
                    return Err(invalid(
                        "input_shape",
                        format!(
                            "mlp takes flat features [n] (in_features=n), got {:?}; flatten the input",
                            self.input_shape
                        ),
                    ));
                }
                settings.push(("in_features", self.input_shape[0].to_string()));
            }
            _ => {
                let [c, h, w] = self.input_shape[..] else {
                    return Err(invalid(
                        "input_shape",
                        format!(
                            "small_cnn needs [channels, height, width] (in_channels and image), got {:?}",
                            self.input_shape
                        ),
                    ));
                };
                settings.push(("in_channels", c.to_string()));
                settings.push(("image", format!("{h},{w}")));
            }
        }
        settings.push(("num_classes", self.classes.to_string()));
        self.model = ModelSpec::new(name, settings.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        self.input_shape.clear();
        self.classes = 0;
        Ok(())
    }

    /// The zoo model this plan names.
    pub fn model_name(&self) -> &str {
        &self.model.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earlier_shapes_read_and_today_s_is_written() {
        let earlier: ModelSpec = serde_json::from_str(r#"{"small_cnn": {"channels": [8, 16]}}"#).expect("earlier");
        assert_eq!(earlier.name, "small_cnn");
        assert_eq!(earlier.earlier, Some(Earlier::SmallCnn { channels: vec![8, 16] }));
        let mut plan = Plan { model: earlier, input_shape: vec![3, 32, 32], classes: 10, ..Plan::example_cnn() };
        plan.normalize().expect("normalizes");
        assert_eq!(plan.model.earlier, None);
        assert_eq!(plan.model.settings["channels"], "8,16");
        assert_eq!(plan.model.settings["image"], "32,32");
        assert_eq!((plan.input_shape.len(), plan.classes), (0, 0));
        let json = serde_json::to_value(&plan.model).expect("json");
        assert_eq!(json["zoo"]["name"], "small_cnn");
        let back: ModelSpec = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, plan.model);
    }
}
