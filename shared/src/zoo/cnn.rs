//! Multilayer perceptrons and convolutional classifiers: `nn.Sequential` models,
//! torchvision's ResNets and timm's SE-ResNeXt.

use super::losses;
use super::{BuildOptions, Settings, ZooError, limits, value_err};
use crate::graph::{Builder, Graph, GraphError, InputKind, Op, Task, ValueId, numel};

/// `nn.Sequential(Linear, ReLU, ..., Linear)` on flattened inputs; each module is one
/// stage (what `checkpoint_sequential` splits).
pub fn mlp_graph(
    batch: u64,
    input: &[u64],
    hidden: &[u64],
    classes: u64,
    opts: &BuildOptions,
) -> Result<Graph, GraphError> {
    let mut b = Builder::new(Task::Classify { classes });
    let mut shape = vec![batch];
    shape.extend_from_slice(input);
    let x = b.input(shape, InputKind::Real);
    let mut h = if input.len() > 1 { b.stage(|b| b.view(x, vec![batch, numel(input)]))? } else { x };
    for (i, &w) in hidden.iter().enumerate() {
        h = b.stage(|b| b.linear(&(2 * i).to_string(), h, w, true))?;
        h = b.stage(|b| b.unary(Op::Relu { inplace: false }, h));
    }
    let out = b.stage(|b| b.linear(&(2 * hidden.len()).to_string(), h, classes, true))?;
    let (loss, start) = losses::classify(&mut b, out, opts.loss.label_smoothing)?;
    Ok(b.finish(vec![out], loss, start))
}

/// `nn.Sequential` of `Conv2d(3x3, padding 1) -> ReLU -> MaxPool2d(2)` per entry, then
/// `Flatten` and a linear classifier.
pub fn small_cnn_graph(
    batch: u64,
    input: &[u64],
    channels: &[u64],
    classes: u64,
    opts: &BuildOptions,
) -> Result<Graph, GraphError> {
    let mut b = Builder::new(Task::Classify { classes });
    let mut shape = vec![batch];
    shape.extend_from_slice(input);
    let mut h = b.input(shape, InputKind::Real);
    let mut k = 0;
    for &c in channels {
        h = b.stage(|b| b.conv(&k.to_string(), h, c, 3, 1, 1, 1, true))?;
        h = b.stage(|b| b.unary(Op::Relu { inplace: false }, h));
        h = b.stage(|b| b.max_pool(h, 2, 2, 0))?;
        k += 3;
    }
    let features = numel(&b.shape(h)[1..]);
    h = b.stage(|b| b.reshape(h, vec![batch, features]))?;
    let out = b.stage(|b| b.linear(&(k + 1).to_string(), h, classes, true))?;
    let (loss, start) = losses::classify(&mut b, out, opts.loss.label_smoothing)?;
    Ok(b.finish(vec![out], loss, start))
}

pub fn mlp(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let input = s.u64("in_features", 784, 1, limits::MAX_WIDTH * 64)?;
    let hidden = s.list("hidden", &[512, 256], 1, limits::MAX_WIDTH)?;
    if hidden.len() as u64 > limits::MAX_DEPTH {
        return Err(value_err("hidden", format!("at most {} layers", limits::MAX_DEPTH)));
    }
    let classes = s.u64("num_classes", 10, 2, limits::MAX_CLASSES)?;
    Ok(mlp_graph(batch, &[input], &hidden, classes, opts)?)
}

pub fn small_cnn(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let image = s.sizes("image", 32, 2, limits::MAX_IMAGE)?;
    let in_channels = s.u64("in_channels", 3, 1, limits::MAX_WIDTH)?;
    let channels = s.list("channels", &[16, 32], 1, limits::MAX_WIDTH)?;
    let classes = s.u64("num_classes", 10, 2, limits::MAX_CLASSES)?;
    let min = image.iter().copied().min().unwrap_or(0);
    if channels.len() >= 64 || min >> channels.len() == 0 {
        return Err(value_err(
            "channels",
            format!("{} pooling stages shrink a {min}-pixel side below 1", channels.len()),
        ));
    }
    Ok(small_cnn_graph(batch, &[in_channels, image[0], image[1]], &channels, classes, opts)?)
}

#[derive(Clone, Copy)]
pub enum ResNet {
    /// torchvision's BasicBlock with these blocks per stage.
    Basic([u64; 4]),
    /// torchvision's Bottleneck (v1.5: stride on the 3x3), or timm's with a
    /// squeeze-and-excitation module before the residual sum.
    Bottleneck { layers: [u64; 4], groups: u64, width: u64, se: bool },
}

fn conv_bn(
    b: &mut Builder,
    x: ValueId,
    i: u32,
    out: u64,
    kernel: u64,
    stride: u64,
    groups: u64,
) -> Result<ValueId, GraphError> {
    let c = b.conv(&format!("conv{i}"), x, out, kernel, stride, kernel / 2, groups, false)?;
    b.batch_norm(&format!("bn{i}"), c)
}

/// timm's SEModule: `x * sigmoid(fc2(relu(fc1(x.mean((2, 3), keepdim=True)))))`.
fn squeeze_excite(b: &mut Builder, x: ValueId, channels: u64) -> Result<ValueId, GraphError> {
    // make_divisible(channels / 16, 8) with round_limit 0.
    let rd = ((channels as f64 / 16.0 + 4.0) as u64 / 8 * 8).max(8);
    b.scope("se", |b| {
        let m = b.mean(x, vec![2, 3], true);
        let h = b.conv("fc1", m, rd, 1, 1, 0, 1, true)?;
        let h = b.unary(Op::Relu { inplace: true }, h);
        let h = b.conv("fc2", h, channels, 1, 1, 0, 1, true)?;
        let gate = b.unary(Op::Sigmoid, h);
        b.mul(x, gate)
    })
}

/// torchvision's ResNet (and timm's, which has the same stem and head): each block is a
/// checkpoint unit (timm's `set_grad_checkpointing` checkpoints them one by one); the
/// stages are the stem, the four layers and the head.
pub fn resnet(s: &Settings, batch: u64, kind: ResNet, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let classes = s.u64("num_classes", 1000, 2, limits::MAX_CLASSES)?;
    let image = s.sizes("image", 224, 2, limits::MAX_IMAGE)?;
    let in_channels = s.u64("in_channels", 3, 1, limits::MAX_WIDTH)?;
    if image.iter().any(|&d| d < 32) {
        return Err(value_err("image", "ResNets downsample 32 times: each side must be at least 32"));
    }
    let mut b = Builder::new(Task::Classify { classes });
    let x = b.input(vec![batch, in_channels, image[0], image[1]], InputKind::Real);
    let mut h = b.stage(|b| -> Result<ValueId, GraphError> {
        let h = b.conv("conv1", x, 64, 7, 2, 3, 1, false)?;
        let h = b.batch_norm("bn1", h)?;
        let h = b.unary(Op::Relu { inplace: true }, h);
        b.max_pool(h, 3, 2, 1)
    })?;
    let (layers, expansion) = match kind {
        ResNet::Basic(l) => (l, 1),
        ResNet::Bottleneck { layers, .. } => (layers, 4),
    };
    let mut inplanes = 64;
    for (stage, (&n, planes)) in layers.iter().zip([64u64, 128, 256, 512]).enumerate() {
        h = b.stage(|b| -> Result<ValueId, GraphError> {
            let stage_in = h;
            let mut h = h;
            for j in 0..n {
                let stride = if stage > 0 && j == 0 { 2 } else { 1 };
                let x_in = h;
                h = b.block(|b| {
                    b.scope(format!("layer{}", stage + 1), |b| {
                        b.scope(j.to_string(), |b| -> Result<ValueId, GraphError> {
                            let out_ch = planes * expansion;
                            let out = match kind {
                                ResNet::Basic(_) => {
                                    let o = conv_bn(b, x_in, 1, planes, 3, stride, 1)?;
                                    let o = b.unary(Op::Relu { inplace: true }, o);
                                    conv_bn(b, o, 2, planes, 3, 1, 1)?
                                }
                                ResNet::Bottleneck { groups, width, se, .. } => {
                                    let w = planes * width / 64 * groups;
                                    let o = conv_bn(b, x_in, 1, w, 1, 1, 1)?;
                                    let o = b.unary(Op::Relu { inplace: true }, o);
                                    let o = conv_bn(b, o, 2, w, 3, stride, groups)?;
                                    let o = b.unary(Op::Relu { inplace: true }, o);
                                    let o = conv_bn(b, o, 3, out_ch, 1, 1, 1)?;
                                    if se { squeeze_excite(b, o, out_ch)? } else { o }
                                }
                            };
                            // The shortcut runs after the main branch, as in torchvision and timm.
                            let identity = if stride != 1 || inplanes != out_ch {
                                b.scope("downsample", |b| {
                                    let c = b.conv("0", x_in, out_ch, 1, stride, 0, 1, false)?;
                                    b.batch_norm("1", c)
                                })?
                            } else {
                                x_in
                            };
                            let out = b.add_inplace(out, identity)?;
                            let out = b.unary(Op::Relu { inplace: true }, out);
                            // `forward(self, x)` keeps `x` bound until it returns.
                            b.release(vec![x_in]);
                            Ok(out)
                        })
                    })
                })?;
                inplanes = planes * expansion;
            }
            // `_forward_impl`'s `x = self.layerN(x)`: the stage's input stays bound
            // until the stage returns.
            b.release(vec![stage_in]);
            Ok(h)
        })?;
    }
    let out = b.stage(|b| -> Result<ValueId, GraphError> {
        // adaptive_avg_pool2d to 1x1 is a mean; flatten is a view.
        let pooled = b.mean(h, vec![2, 3], true);
        let c = b.shape(pooled)[1];
        let flat = b.reshape(pooled, vec![batch, c])?;
        b.linear("fc", flat, classes, true)
    })?;
    let (loss, start) = losses::classify(&mut b, out, opts.loss.label_smoothing)?;
    Ok(b.finish(vec![out], loss, start))
}

/// A TorchScript classifier the user brings: `file` (a `.pt` saved with `torch.jit.save`,
/// relative to the agent's data root) takes `[B, input...]` and returns `[B, num_classes]`
/// logits; the loss is cross-entropy. The graph holds only that interface.
pub fn torchscript(s: &Settings<'_>, batch: u64, o: &BuildOptions) -> Result<Graph, ZooError> {
    let file = s.text("file", "")?;
    if file.is_empty() {
        return Err(value_err("file", "give the TorchScript module (.pt) to train, relative to the agent's data root"));
    }
    crate::paths::check_data_path(&file).map_err(|reason| value_err("file", reason))?;
    let input = s.list("input", &[3, 32, 32], 1, limits::MAX_WIDTH)?;
    if input.is_empty() || input.len() > 4 {
        return Err(value_err("input", "one to four sizes, e.g. 3,32,32"));
    }
    let classes = s.u64("num_classes", 10, 2, limits::MAX_CLASSES)?;
    let mut b = Builder::new(Task::Classify { classes });
    let mut shape = vec![batch];
    shape.extend_from_slice(&input);
    let x = b.input(shape, InputKind::Real);
    let out = b.script(x, vec![batch, classes]);
    let (loss, start) = losses::classify(&mut b, out, o.loss.label_smoothing)?;
    Ok(b.finish(vec![out], loss, start))
}
