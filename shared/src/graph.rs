//! The model description: one graph of layers that drives both the estimator (shape
//! inference, parameter counts, memory accounting) and the agent's tch module, so that
//! the two can never drift apart.
//!
//! Shapes here are per sample: the batch dimension is added by whoever runs the graph.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A per-sample tensor shape, for example `[3, 32, 32]` for an RGB image.
pub type Shape = Vec<u64>;

/// One layer of a sequential model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer {
    /// Collapses every per-sample dimension into one (a view: no memory).
    Flatten,
    /// `y = x W^T + b` with `W: [out_features, in_features]`.
    Linear { in_features: u64, out_features: u64 },
    /// 2-D convolution with a square kernel and a bias; input `[C, H, W]`.
    Conv2d { in_channels: u64, out_channels: u64, kernel: u64, stride: u64, padding: u64 },
    /// Rectified linear unit, not in place.
    Relu,
    /// 2-D max pooling with a square window.
    MaxPool2d { kernel: u64, stride: u64 },
}

/// A layer together with the shapes it sees, as produced by [`Graph::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub layer: Layer,
    pub input: Shape,
    pub output: Shape,
}

/// A sequential model whose shapes have been checked end to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub input: Shape,
    pub nodes: Vec<Node>,
}

/// Why a layer cannot accept its input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GraphError {
    #[error("layer {index} ({layer}): {reason}")]
    Shape { index: usize, layer: &'static str, reason: String },
}

impl Layer {
    pub fn name(&self) -> &'static str {
        match self {
            Layer::Flatten => "flatten",
            Layer::Linear { .. } => "linear",
            Layer::Conv2d { .. } => "conv2d",
            Layer::Relu => "relu",
            Layer::MaxPool2d { .. } => "maxpool2d",
        }
    }

    /// Shapes of the trainable tensors, in the order the trainer creates them.
    pub fn param_shapes(&self) -> Vec<Shape> {
        match *self {
            Layer::Linear { in_features, out_features } => {
                vec![vec![out_features, in_features], vec![out_features]]
            }
            Layer::Conv2d { in_channels, out_channels, kernel, .. } => {
                vec![vec![out_channels, in_channels, kernel, kernel], vec![out_channels]]
            }
            Layer::Flatten | Layer::Relu | Layer::MaxPool2d { .. } => Vec::new(),
        }
    }

    pub fn n_params(&self) -> u64 {
        self.param_shapes().iter().fold(0u64, |acc, s| acc.saturating_add(numel(s)))
    }

    /// The per-sample output shape for a per-sample input shape.
    pub fn output_shape(&self, input: &[u64]) -> Result<Shape, String> {
        match *self {
            Layer::Flatten => Ok(vec![numel(input)]),
            Layer::Relu => Ok(input.to_vec()),
            Layer::Linear { in_features, out_features } => match input {
                [n] if *n == in_features => Ok(vec![out_features]),
                _ => Err(format!("expects [{in_features}] features, got {input:?}")),
            },
            Layer::Conv2d { in_channels, out_channels, kernel, stride, padding } => match input {
                [c, h, w] if *c == in_channels => {
                    let out = |size: u64| -> Result<u64, String> {
                        let padded = size.saturating_add(padding.saturating_mul(2));
                        if stride == 0 || padded < kernel {
                            return Err(format!(
                                "kernel {kernel} does not fit an input of {size} with padding {padding}"
                            ));
                        }
                        Ok((padded - kernel) / stride + 1)
                    };
                    Ok(vec![out_channels, out(*h)?, out(*w)?])
                }
                _ => Err(format!("expects [{in_channels}, H, W], got {input:?}")),
            },
            Layer::MaxPool2d { kernel, stride } => match input {
                [c, h, w] if *h >= kernel && *w >= kernel && stride > 0 => {
                    Ok(vec![*c, (h - kernel) / stride + 1, (w - kernel) / stride + 1])
                }
                _ => Err(format!("a {kernel}x{kernel} window does not fit {input:?}")),
            },
        }
    }
}

impl Graph {
    /// Checks every layer's input shape and records the shapes between layers.
    pub fn new(input: Shape, layers: Vec<Layer>) -> Result<Graph, GraphError> {
        let mut nodes = Vec::with_capacity(layers.len());
        let mut shape = input.clone();
        for (index, layer) in layers.into_iter().enumerate() {
            let output = layer.output_shape(&shape).map_err(|reason| GraphError::Shape {
                index,
                layer: layer.name(),
                reason,
            })?;
            nodes.push(Node { layer, input: shape, output: output.clone() });
            shape = output;
        }
        Ok(Graph { input, nodes })
    }

    pub fn output(&self) -> &[u64] {
        self.nodes.last().map_or(&self.input, |n| &n.output)
    }

    pub fn n_params(&self) -> u64 {
        self.nodes.iter().fold(0u64, |acc, n| acc.saturating_add(n.layer.n_params()))
    }

    /// Every parameter tensor's shape, in creation order.
    pub fn param_shapes(&self) -> Vec<Shape> {
        self.nodes.iter().flat_map(|n| n.layer.param_shapes()).collect()
    }
}

/// Number of elements of a shape (1 for a scalar). Saturates at `u64::MAX` instead of
/// wrapping, so that limits catch absurd shapes.
pub fn numel(shape: &[u64]) -> u64 {
    shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_counts_weights_and_biases() {
        // The MLP measured in TOOLCHAIN.md: 1024-4096-4096-10 has 21.0 M parameters.
        let g = Graph::new(
            vec![1024],
            vec![
                Layer::Linear { in_features: 1024, out_features: 4096 },
                Layer::Relu,
                Layer::Linear { in_features: 4096, out_features: 4096 },
                Layer::Relu,
                Layer::Linear { in_features: 4096, out_features: 10 },
            ],
        )
        .expect("valid mlp");
        assert_eq!(g.n_params(), 1024 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10);
        assert_eq!(g.output(), &[10]);
    }

    #[test]
    fn conv_and_pool_infer_shapes() {
        let g = Graph::new(
            vec![3, 32, 32],
            vec![
                Layer::Conv2d { in_channels: 3, out_channels: 16, kernel: 3, stride: 1, padding: 1 },
                Layer::Relu,
                Layer::MaxPool2d { kernel: 2, stride: 2 },
                Layer::Flatten,
                Layer::Linear { in_features: 16 * 16 * 16, out_features: 10 },
            ],
        )
        .expect("valid cnn");
        assert_eq!(g.nodes[2].output, vec![16, 16, 16]);
        assert_eq!(g.n_params(), 3 * 16 * 9 + 16 + 4096 * 10 + 10);
    }

    #[test]
    fn mismatched_shapes_name_the_layer() {
        let err = Graph::new(vec![3, 8, 8], vec![Layer::Linear { in_features: 10, out_features: 2 }])
            .expect_err("linear cannot take an image");
        assert_eq!(err.to_string(), "layer 0 (linear): expects [10] features, got [3, 8, 8]");
        let err = Graph::new(vec![1, 1, 1], vec![Layer::MaxPool2d { kernel: 2, stride: 2 }])
            .expect_err("window larger than input");
        assert!(err.to_string().contains("layer 0 (maxpool2d)"), "{err}");
    }
}
