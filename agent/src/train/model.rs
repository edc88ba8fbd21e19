//! Builds the tch module from `shared::graph` — the same description the estimator
//! walks — and runs it with the fallible `f_*` ops so that errors (out of memory above
//! all) come back as values instead of panics.

use shared::graph::{Graph, Layer};
use tch::{Kind, Tensor, nn};

enum Op {
    Flatten,
    Linear { weight: Tensor, bias: Tensor },
    Conv2d { weight: Tensor, bias: Tensor, stride: i64, padding: i64 },
    Relu,
    MaxPool2d { kernel: i64, stride: i64 },
}

pub struct Net {
    ops: Vec<Op>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// PyTorch's default init for linear and conv layers: kaiming-uniform weights with
/// a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
fn param(path: &nn::Path, name: &str, shape: &[u64], fan_in: u64) -> Result<Tensor, tch::TchError> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let dims: Vec<i64> = shape.iter().map(|&d| i(d)).collect();
    path.f_var(name, &dims, nn::Init::Uniform { lo: -bound, up: bound })
}

impl Net {
    pub fn new(path: &nn::Path, graph: &Graph) -> Result<Net, tch::TchError> {
        let ops = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let p = path / index.to_string();
                Ok(match node.layer {
                    Layer::Flatten => Op::Flatten,
                    Layer::Relu => Op::Relu,
                    Layer::MaxPool2d { kernel, stride } => Op::MaxPool2d { kernel: i(kernel), stride: i(stride) },
                    Layer::Linear { in_features, out_features } => Op::Linear {
                        weight: param(&p, "weight", &[out_features, in_features], in_features)?,
                        bias: param(&p, "bias", &[out_features], in_features)?,
                    },
                    Layer::Conv2d { in_channels, out_channels, kernel, stride, padding } => {
                        let fan_in = in_channels * kernel * kernel;
                        Op::Conv2d {
                            weight: param(&p, "weight", &[out_channels, in_channels, kernel, kernel], fan_in)?,
                            bias: param(&p, "bias", &[out_channels], fan_in)?,
                            stride: i(stride),
                            padding: i(padding),
                        }
                    }
                })
            })
            .collect::<Result<Vec<Op>, tch::TchError>>()?;
        Ok(Net { ops })
    }

    /// Logits `[batch, classes]` for an input `[batch, ...input_shape]`.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut h = input.shallow_clone();
        for op in &self.ops {
            h = match op {
                Op::Flatten => h.f_flatten(1, -1)?,
                // at::linear on 2-D input with a bias is one addmm, as in PyTorch.
                Op::Linear { weight, bias } => h.f_linear(weight, Some(bias))?,
                Op::Conv2d { weight, bias, stride, padding } => {
                    h.f_conv2d(weight, Some(bias), [*stride, *stride], [*padding, *padding], [1, 1], 1)?
                }
                Op::Relu => h.f_relu()?,
                Op::MaxPool2d { kernel, stride } => {
                    h.f_max_pool2d([*kernel, *kernel], [*stride, *stride], [0, 0], [1, 1], false)?
                }
            };
        }
        Ok(h)
    }
}

/// Mean cross-entropy as `log_softmax` then `nll_loss`, the way `F.cross_entropy` does it.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, tch::TchError> {
    logits.f_log_softmax(-1, None::<Kind>)?.f_nll_loss(labels, None::<Tensor>, tch::Reduction::Mean, -100)
}
