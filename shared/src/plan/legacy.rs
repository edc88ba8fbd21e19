//! The earlier plan format: `mlp` and `small_cnn` with `input_shape` and `classes`, read
//! as the zoo models of the same name, so that every surface has one input path.

use super::limits;
use super::validate::{check_range, invalid};
use super::{ModelSpec, Plan, PlanError};
use crate::zoo::join;

impl Plan {
    /// Turns the earlier `mlp`/`small_cnn` format into the zoo model of the same name, so
    /// that every surface has one input path. Errors say how the old fields map.
    pub fn normalize(&mut self) -> Result<(), PlanError> {
        use limits::*;
        let (name, mut settings) = match &self.model {
            ModelSpec::Zoo { .. } => {
                if !self.input_shape.is_empty() || self.classes != 0 {
                    return Err(invalid(
                        "input_shape",
                        "zoo models take their input size and classes from model settings (image, volume, seq, num_classes), not input_shape/classes",
                    ));
                }
                return Ok(());
            }
            ModelSpec::Mlp { hidden } => ("mlp", vec![("hidden", join(hidden))]),
            ModelSpec::SmallCnn { channels } => ("small_cnn", vec![("channels", join(channels))]),
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
        self.model = ModelSpec::Zoo {
            name: name.to_owned(),
            settings: settings.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        self.input_shape.clear();
        self.classes = 0;
        Ok(())
    }

    /// The zoo model and settings this plan names.
    pub fn model_name(&self) -> &str {
        match &self.model {
            ModelSpec::Zoo { name, .. } => name,
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::SmallCnn { .. } => "small_cnn",
        }
    }
}
