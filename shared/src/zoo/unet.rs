//! Segmentation networks as MONAI writes them: `UNet` with residual units (2-D and 3-D)
//! and `SwinUNETR` (3-D), including the channels-last views, the unconditional padding and
//! the explicit window attention of MONAI 1.6.

use super::losses;
use super::{BuildOptions, Settings, ZooError, limits, value_err};
use crate::graph::{Builder, DType, Graph, GraphError, Init, InputKind, Op, Task, ValueId};

type R<T> = Result<T, GraphError>;

/// MONAI's `Convolution`: conv (or transposed conv) then, unless `conv_only`, the norm
/// (instance norm, MONAI's default, or batch norm) and PReLU ("NDA" ordering; a dropout
/// of 0 is no op).
#[allow(clippy::too_many_arguments)]
fn convolution(
    b: &mut Builder,
    x: ValueId,
    out: u64,
    kernel: u64,
    stride: u64,
    transposed: bool,
    conv_only: bool,
    batch_norm: bool,
) -> R<ValueId> {
    let padding = (kernel - 1) / 2;
    let h = if transposed {
        // stride_minus_kernel_padding: the output padding that doubles the size exactly.
        let output_padding = (stride + 2 * padding).saturating_sub(kernel);
        b.conv_transpose("conv", x, out, kernel, stride, padding, output_padding, true)?
    } else {
        b.conv("conv", x, out, kernel, stride, padding, 1, true)?
    };
    if conv_only {
        return Ok(h);
    }
    let h = if batch_norm { b.batch_norm("adn.N", h)? } else { b.instance_norm(h)? };
    Ok(b.prelu("adn.A", h))
}

/// MONAI's `ResidualUnit`: the residual path first (a conv when the shape changes), then
/// `subunits` convolutions; the two are summed.
#[allow(clippy::too_many_arguments)]
fn residual_unit(
    b: &mut Builder,
    x: ValueId,
    out: u64,
    stride: u64,
    kernel: u64,
    subunits: u64,
    last_conv_only: bool,
    batch_norm: bool,
) -> R<ValueId> {
    let inc = b.shape(x)[1];
    let res = if stride != 1 || inc != out {
        let (k, p) = if stride == 1 { (1, 0) } else { (kernel, (kernel - 1) / 2) };
        b.conv("residual", x, out, k, stride, p, 1, true)?
    } else {
        x
    };
    let mut h = x;
    let subunits = subunits.max(1);
    for su in 0..subunits {
        let s = if su == 0 { stride } else { 1 };
        let conv_only = last_conv_only && su == subunits - 1;
        h = b.scope(format!("conv.unit{su}"), |b| convolution(b, h, out, kernel, s, false, conv_only, batch_norm))?;
    }
    b.add(h, res)
}

struct UNetCfg {
    res_units: u64,
    batch_norm: bool,
}

fn down(b: &mut Builder, x: ValueId, out: u64, stride: u64, cfg: &UNetCfg) -> R<ValueId> {
    if cfg.res_units > 0 {
        residual_unit(b, x, out, stride, 3, cfg.res_units, false, cfg.batch_norm)
    } else {
        convolution(b, x, out, 3, stride, false, false, cfg.batch_norm)
    }
}

fn up(b: &mut Builder, x: ValueId, out: u64, stride: u64, top: bool, cfg: &UNetCfg) -> R<ValueId> {
    let conv_only = top && cfg.res_units == 0;
    let h = b.scope("0", |b| convolution(b, x, out, 3, stride, true, conv_only, cfg.batch_norm))?;
    if cfg.res_units > 0 { b.scope("1", |b| residual_unit(b, h, out, 1, 3, 1, top, cfg.batch_norm)) } else { Ok(h) }
}

/// `_create_block`: down, a skip connection around the deeper levels, up. At the top the
/// three are the model's stages.
fn level(
    b: &mut Builder,
    x: ValueId,
    out: u64,
    channels: &[u64],
    strides: &[u64],
    top: bool,
    cfg: &UNetCfg,
) -> R<ValueId> {
    let c = channels[0];
    let s = strides[0];
    let stage = |b: &mut Builder, f: &mut dyn FnMut(&mut Builder) -> R<ValueId>| if top { b.stage(f) } else { f(b) };
    let d = stage(b, &mut |b| b.scope("0", |b| down(b, x, c, s, cfg)))?;
    let cat = stage(b, &mut |b| {
        let sub = b.scope("1.submodule", |b| {
            if channels.len() > 2 {
                level(b, d, c, &channels[1..], &strides[1..], false, cfg)
            } else {
                // The bottom layer: a stride-1 down layer to the last channel count.
                down(b, d, channels[1], 1, cfg)
            }
        })?;
        b.cat(vec![d, sub], 1)
    })?;
    stage(b, &mut |b| b.scope("2", |b| up(b, cat, out, s, top, cfg)))
}

pub fn unet(s: &Settings, batch: u64, dims: usize, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let in_ch = s.u64("in_channels", 1, 1, limits::MAX_WIDTH)?;
    let out_ch = s.u64("out_channels", 2, 1, limits::MAX_WIDTH)?;
    let channels = s.list("channels", &[16, 32, 64, 128, 256], 1, limits::MAX_WIDTH)?;
    let strides = s.list("strides", &[2, 2, 2, 2], 1, 8)?;
    let res_units = s.u64("num_res_units", 2, 0, 16)?;
    let batch_norm = s.choice("norm", &["instance", "batch"])? == "batch";
    let (key, default, max) =
        if dims == 2 { ("image", 256, limits::MAX_IMAGE) } else { ("volume", 96, limits::MAX_VOLUME) };
    let size = s.sizes(key, default, dims, max)?;
    if channels.len() < 2 || channels.len() as u64 > limits::MAX_DEPTH {
        return Err(value_err("channels", format!("needs 2 to {} entries, got {}", limits::MAX_DEPTH, channels.len())));
    }
    if strides.len() != channels.len() - 1 {
        return Err(value_err(
            "strides",
            format!("needs one entry fewer than channels ({}), got {}", channels.len() - 1, strides.len()),
        ));
    }
    let total: u64 = strides.iter().try_fold(1u64, |acc, &s| acc.checked_mul(s)).unwrap_or(u64::MAX);
    if size.iter().any(|&d| d % total != 0) {
        return Err(value_err(
            key,
            format!("each size must be divisible by the product of strides {total}, got {size:?}"),
        ));
    }
    check_loss_channels(out_ch, opts)?;
    let mut b = Builder::new(Task::Segment { classes: out_ch });
    let mut shape = vec![batch, in_ch];
    shape.extend(&size);
    let x = b.input(shape, InputKind::Real);
    let cfg = UNetCfg { res_units, batch_norm };
    let out = b.scope("model", |b| level(b, x, out_ch, &channels, &strides, true, &cfg))?;
    let (loss, start) = losses::segment(&mut b, out, opts.loss, opts.surface)?;
    Ok(b.finish(vec![out], loss, start))
}

/// One output channel needs a binary loss; cross-entropy needs two or more.
fn check_loss_channels(out_ch: u64, opts: &BuildOptions) -> Result<(), ZooError> {
    use losses::LossKind;
    match (opts.loss.kind, out_ch) {
        (LossKind::Ce, 1) => Err(value_err(
            "out_channels",
            "1 output channel needs a binary loss: use loss=bce, dice or dice_ce (cross-entropy needs 2 or more)",
        )),
        (LossKind::Bce, c) if c != 1 => Err(value_err(
            "loss",
            format!("bce needs out_channels=1 (a binary mask), got {c}; use ce, dice or dice_ce"),
        )),
        _ => Ok(()),
    }
}

/// MONAI's `UnetResBlock`: conv-norm-lrelu-conv-norm plus a 1x1 conv-norm residual when
/// the channels change, then a leaky ReLU (in place, as MONAI's is).
fn res_block(b: &mut Builder, x: ValueId, out: u64) -> R<ValueId> {
    let lrelu = Op::LeakyRelu { inplace: true };
    let inc = b.shape(x)[1];
    let h = b.conv("conv1.conv", x, out, 3, 1, 1, 1, false)?;
    let h = b.instance_norm(h)?;
    let h = b.unary(lrelu.clone(), h);
    let h = b.conv("conv2.conv", h, out, 3, 1, 1, 1, false)?;
    let h = b.instance_norm(h)?;
    let res = if inc != out {
        let r = b.conv("conv3.conv", x, out, 1, 1, 0, 1, false)?;
        b.instance_norm(r)?
    } else {
        x
    };
    let h = b.add_inplace(h, res)?;
    Ok(b.unary(lrelu, h))
}

/// MONAI's `UnetrUpBlock`: a 2x transposed conv, concatenation with the skip, a res block.
fn up_block(b: &mut Builder, x: ValueId, skip: ValueId, out: u64) -> R<ValueId> {
    let h = b.conv_transpose("transp_conv.conv", x, out, 2, 2, 0, 0, false)?;
    let h = b.cat(vec![h, skip], 1)?;
    b.scope("conv_block", |b| res_block(b, h, out))
}

/// `rearrange(x, "b c d h w -> b d h w c")`: a permuted view, no copy.
fn channels_last(b: &mut Builder, x: ValueId) -> R<ValueId> {
    b.permute(x, vec![0, 2, 3, 4, 1])
}

fn channels_first(b: &mut Builder, x: ValueId) -> R<ValueId> {
    b.permute(x, vec![0, 4, 1, 2, 3])
}

/// `proj_out`: `F.layer_norm` over the channels of a channels-last view, back to a
/// channels-first view.
fn proj_out(b: &mut Builder, x: ValueId) -> R<ValueId> {
    let v = channels_last(b, x)?;
    let n = b.layer_norm_plain(v);
    channels_first(b, n)
}

const WINDOW: u64 = 7;

/// MONAI's `WindowAttention` on windows `[B*nW, N, C]`: qkv as views of one projection,
/// explicit scores with the relative position bias (and the shift mask), softmax, values.
fn window_attention(b: &mut Builder, x: ValueId, heads: u64, mask: Option<ValueId>) -> R<ValueId> {
    let s = b.shape(x).to_vec();
    let (bw, n, c) = (s[0], s[1], s[2]);
    let hd = c / heads;
    let qkv = b.linear("qkv", x, 3 * c, true)?;
    let qkv = b.reshape(qkv, vec![bw, n, 3, heads, hd])?;
    let qkv = b.permute(qkv, vec![2, 0, 3, 1, 4])?;
    let (q, k, v) = (b.select(qkv, 0, 0), b.select(qkv, 0, 1), b.select(qkv, 0, 2));
    let full = WINDOW.pow(3);
    let table = b.param("relative_position_bias_table", vec![(2 * WINDOW - 1).pow(3), heads], Init::Normal(0.02));
    let index = b.buffer(
        "relative_position_index",
        vec![full, full],
        DType::I64,
        Init::RelativePositionIndex { window: [WINDOW; 3] },
    );
    let index = b.param_value(index);
    let index = b.clone_value(index);
    let index = b.slice(index, 0, 0, n, 1);
    let index = b.slice(index, 1, 0, n, 1);
    let index = b.reshape(index, vec![n * n])?;
    let table = b.param_value(table);
    let bias = b.index(table, index);
    let bias = b.reshape(bias, vec![n, n, heads])?;
    let bias = b.permute(bias, vec![2, 0, 1])?;
    let bias = b.contiguous(bias);
    let q = b.mul_scalar(q, (hd as f64).powf(-0.5));
    let kt = b.transpose(k, 2, 3);
    let mut attn = b.matmul(q, kt)?;
    let bias = b.unsqueeze(bias, 0);
    attn = b.add(attn, bias)?;
    if let Some(mask) = mask {
        let nw = b.shape(mask)[0];
        let a5 = b.view(attn, vec![bw / nw, nw, heads, n, n])?;
        let m = b.unsqueeze(mask, 1);
        let m = b.unsqueeze(m, 0);
        let a5 = b.add(a5, m)?;
        attn = b.view(a5, vec![bw, heads, n, n])?;
    }
    let attn = b.softmax(attn, 3);
    let o = b.matmul(attn, v)?;
    let o = b.transpose(o, 1, 2);
    let o = b.reshape(o, vec![bw, n, c])?;
    b.linear("proj", o, c, true)
}

/// `forward_part1` of MONAI's `SwinTransformerBlock` on a channels-last volume: norm,
/// pad (always a copy), shift, window partition, attention, window reverse, unshift, crop.
fn swin_part1(
    b: &mut Builder,
    x: ValueId,
    heads: u64,
    window: [u64; 3],
    shift: [u64; 3],
    mask: Option<ValueId>,
) -> R<ValueId> {
    let s = b.shape(x).to_vec();
    let (batch, c) = (s[0], s[4]);
    let sizes = [s[1], s[2], s[3]];
    let pads: Vec<u64> = (0..3).map(|i| (window[i] - sizes[i] % window[i]) % window[i]).collect();
    let padded: Vec<u64> = (0..3).map(|i| sizes[i] + pads[i]).collect();
    let n = window.iter().product::<u64>();
    let windows = padded.iter().zip(&window).map(|(p, w)| p / w).product::<u64>();
    let h = b.layer_norm("norm1", x, 1e-5)?;
    let h = b.pad(h, vec![(0, pads[0]), (0, pads[1]), (0, pads[2]), (0, 0)]);
    let shifted = shift.iter().any(|&v| v > 0);
    let h = if shifted { b.roll(h, shift.iter().map(|&v| -(v as i64)).collect(), vec![1, 2, 3]) } else { h };
    // window_partition: [B, D/w, w, H/w, w, W/w, w, C] -> [B*nW, N, C].
    let v = b.view(
        h,
        vec![
            batch,
            padded[0] / window[0],
            window[0],
            padded[1] / window[1],
            window[1],
            padded[2] / window[2],
            window[2],
            c,
        ],
    )?;
    let v = b.permute_copy(v, vec![0, 1, 3, 5, 2, 4, 6, 7])?;
    let w = b.view(v, vec![batch * windows, n, c])?;
    let a = b.scope("attn", |b| window_attention(b, w, heads, if shifted { mask } else { None }))?;
    // window_reverse.
    let a = b.view(a, vec![batch * windows, window[0], window[1], window[2], c])?;
    let r = b.view(
        a,
        vec![
            batch,
            padded[0] / window[0],
            padded[1] / window[1],
            padded[2] / window[2],
            window[0],
            window[1],
            window[2],
            c,
        ],
    )?;
    let r = b.permute_copy(r, vec![0, 1, 4, 2, 5, 3, 6, 7])?;
    let mut r = b.view(r, vec![batch, padded[0], padded[1], padded[2], c])?;
    if shifted {
        r = b.roll(r, shift.iter().map(|&v| v as i64).collect(), vec![1, 2, 3]);
    }
    if pads.iter().any(|&p| p > 0) {
        for (i, &size) in sizes.iter().enumerate() {
            r = b.slice(r, i + 1, 0, size, 1);
        }
        r = b.contiguous(r);
    }
    Ok(r)
}

/// `forward_part2`: the MLP on the normed input.
fn swin_part2(b: &mut Builder, x: ValueId) -> R<ValueId> {
    let c = b.shape(x)[4];
    let m = b.layer_norm("norm2", x, 1e-5)?;
    let m = b.linear("mlp.linear1", m, 4 * c, true)?;
    let m = b.unary(Op::Gelu { tanh: false }, m);
    b.linear("mlp.linear2", m, c, true)
}

/// MONAI's `PatchMerging` (3-D): eight strided sub-volumes — in MONAI's own order, which
/// repeats two of them — concatenated on channels, layer norm, a linear reduction.
fn patch_merging(b: &mut Builder, x: ValueId) -> R<ValueId> {
    let s = b.shape(x).to_vec();
    let c = s[4];
    let mut parts = Vec::with_capacity(8);
    for (i, j, k) in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)] {
        let p = b.slice(x, 1, i, s[1] / 2, 2);
        let p = b.slice(p, 2, j, s[2] / 2, 2);
        parts.push(b.slice(p, 3, k, s[3] / 2, 2));
    }
    let cat = b.cat(parts, 4)?;
    let h = b.layer_norm("norm", cat, 1e-5)?;
    b.linear("reduction", h, 2 * c, false)
}

pub fn swin_unetr(s: &Settings, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let in_ch = s.u64("in_channels", 1, 1, limits::MAX_WIDTH)?;
    let out_ch = s.u64("out_channels", 2, 1, limits::MAX_WIDTH)?;
    let fs = s.u64("feature_size", 24, 12, limits::MAX_WIDTH)?;
    let volume = s.sizes("volume", 96, 3, limits::MAX_VOLUME)?;
    if fs % 12 != 0 {
        let lower = fs / 12 * 12;
        let suggestion = if lower >= 12 { format!("{lower} or {}", lower + 12) } else { (lower + 12).to_string() };
        return Err(value_err(
            "feature_size",
            format!("must be divisible by 12 (MONAI's SwinUNETR refuses {fs}); use {suggestion}"),
        ));
    }
    if volume.iter().any(|&d| d % 32 != 0) {
        return Err(value_err("volume", format!("each size must be divisible by 32 (2^5), got {volume:?}")));
    }
    check_loss_channels(out_ch, opts)?;
    let depths = [2u64, 2, 2, 2];
    let heads = [3u64, 6, 12, 24];
    let mut b = Builder::new(Task::Segment { classes: out_ch });
    let mut shape = vec![batch, in_ch];
    shape.extend(&volume);
    let x = b.input(shape, InputKind::Real);

    // The Swin encoder: five hidden states, channels-first views for the conv decoder.
    let mut hidden = Vec::with_capacity(5);
    let mut h = b.conv("swinViT.patch_embed.proj", x, fs, 2, 2, 0, 1, true)?;
    hidden.push(proj_out(&mut b, h)?);
    for (layer, (&depth, &nh)) in depths.iter().zip(&heads).enumerate() {
        h = b.scope(format!("swinViT.layers{}.0", layer + 1), |b| -> R<ValueId> {
            let h = b.contiguous(h);
            let sizes = {
                let s = b.shape(h);
                [s[2], s[3], s[4]]
            };
            // get_window_size: a dimension no larger than the window uses its own size and
            // no shift.
            let window: [u64; 3] = std::array::from_fn(|i| if sizes[i] <= WINDOW { sizes[i] } else { WINDOW });
            let shift: [u64; 3] = std::array::from_fn(|i| if sizes[i] <= WINDOW { 0 } else { WINDOW / 2 });
            let padded: [u64; 3] = std::array::from_fn(|i| sizes[i].div_ceil(window[i]) * window[i]);
            let mut h = channels_last(b, h)?;
            // compute_mask runs with the layer's configured shift even where the blocks use none.
            let mask = b.shifted_window_mask(padded, window, [WINDOW / 2; 3]);
            for j in 0..depth {
                let block_shift = if j % 2 == 1 { shift } else { [0; 3] };
                h = b.scope(format!("blocks.{j}"), |b| -> R<ValueId> {
                    let a = b.block(|b| swin_part1(b, h, nh, window, block_shift, Some(mask)))?;
                    let x = b.add(h, a)?;
                    let m = b.block(|b| swin_part2(b, x))?;
                    b.add(x, m)
                })?;
            }
            let s = b.shape(h).to_vec();
            let h = b.view(h, s)?;
            let h = b.scope("downsample", |b| patch_merging(b, h))?;
            channels_first(b, h)
        })?;
        hidden.push(proj_out(&mut b, h)?);
    }

    let enc0 = b.scope("encoder1.layer", |b| res_block(b, x, fs))?;
    let enc1 = b.scope("encoder2.layer", |b| res_block(b, hidden[0], fs))?;
    let enc2 = b.scope("encoder3.layer", |b| res_block(b, hidden[1], 2 * fs))?;
    let enc3 = b.scope("encoder4.layer", |b| res_block(b, hidden[2], 4 * fs))?;
    let dec4 = b.scope("encoder10.layer", |b| res_block(b, hidden[4], 16 * fs))?;
    let dec3 = b.scope("decoder5", |b| up_block(b, dec4, hidden[3], 8 * fs))?;
    let dec2 = b.scope("decoder4", |b| up_block(b, dec3, enc3, 4 * fs))?;
    let dec1 = b.scope("decoder3", |b| up_block(b, dec2, enc2, 2 * fs))?;
    let dec0 = b.scope("decoder2", |b| up_block(b, dec1, enc1, fs))?;
    let out = b.scope("decoder1", |b| up_block(b, dec0, enc0, fs))?;
    let logits = b.conv("out.conv.conv", out, out_ch, 1, 1, 0, 1, true)?;
    let (loss, start) = losses::segment(&mut b, logits, opts.loss, opts.surface)?;
    Ok(b.finish(vec![logits], loss, start))
}
