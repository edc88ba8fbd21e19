//! The losses, written as their references compute them: PyTorch's `cross_entropy`
//! (log-softmax then NLL, with label smoothing as ATen adds it), `BCEWithLogitsLoss`,
//! MONAI's `DiceLoss` and `DiceCELoss` (softmax or sigmoid, one-hot targets), Hugging
//! Face's causal-LM loss and open_clip's `ClipLoss`.

use serde::{Deserialize, Serialize};

use crate::graph::{Builder, GraphError, InputKind, ValueId};

/// The loss a segmentation or classification plan trains with (`--set loss=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// `nn.CrossEntropyLoss` (optionally label-smoothed).
    Ce,
    /// `nn.BCEWithLogitsLoss` on one output channel against a 0/1 mask.
    Bce,
    /// MONAI `DiceLoss(to_onehot_y=True, softmax=True)` (sigmoid for one channel).
    Dice,
    /// MONAI `DiceCELoss(to_onehot_y=True, softmax=True)` (sigmoid and BCE for one channel).
    DiceCe,
    /// `F.cross_entropy(out.reshape(-1, V), y.reshape(-1))`: a class per position.
    TokenCe,
    /// `F.cross_entropy(out[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))`: the next token.
    CausalLm,
    /// `F.mse_loss(out, y)` against a float target of the output's shape.
    Mse,
}

impl LossKind {
    pub fn from_word(word: &str) -> Option<LossKind> {
        Some(match word {
            "ce" => LossKind::Ce,
            "bce" => LossKind::Bce,
            "dice" => LossKind::Dice,
            "dice_ce" => LossKind::DiceCe,
            "token_ce" => LossKind::TokenCe,
            "causal_lm" => LossKind::CausalLm,
            "mse" => LossKind::Mse,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            LossKind::Ce => "ce",
            LossKind::Bce => "bce",
            LossKind::Dice => "dice",
            LossKind::DiceCe => "dice_ce",
            LossKind::TokenCe => "token_ce",
            LossKind::CausalLm => "causal_lm",
            LossKind::Mse => "mse",
        }
    }
}

/// The loss of a plan: its kind and label smoothing (cross-entropy only).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossSpec {
    pub kind: LossKind,
    #[serde(default)]
    pub label_smoothing: f64,
}

impl Default for LossSpec {
    fn default() -> LossSpec {
        LossSpec { kind: LossKind::Ce, label_smoothing: 0.0 }
    }
}

type R<T> = Result<T, GraphError>;

/// `F.cross_entropy(logits, target, label_smoothing=s)` with classes on dimension 1.
/// Autocast runs the whole loss in fp32 (`cross_entropy_loss` is on its fp32 list on the
/// CPU): half-precision logits are copied to fp32 first, and the log-probabilities, the
/// smoothing term and their gradients are fp32. On CUDA `log_softmax` computes in fp32
/// (the estimate counts the same copy there; not measured on a GPU yet). Returns the
/// loss value.
pub fn cross_entropy(b: &mut Builder, logits: ValueId, target: ValueId, smoothing: f64) -> R<ValueId> {
    let logits = b.to_f32(logits);
    let lp = b.log_softmax(logits, 1);
    let nll = b.nll_loss(lp, target, -100)?;
    if smoothing <= 0.0 {
        return Ok(nll);
    }
    // ATen's label smoothing: -(log_probs.sum(class_dim)) averaged over the samples, mixed
    // with the NLL as (1 - s) * nll + s / classes * smooth.
    let classes = b.shape(logits)[1] as f64;
    let s = b.sum(lp, vec![1], false);
    let s = b.mul_scalar(s, -1.0);
    let all = b.all_dims(s);
    let s = b.mean(s, all, false);
    let a = b.mul_scalar(nll, 1.0 - smoothing);
    let c = b.mul_scalar(s, smoothing / classes);
    b.add(a, c)
}

/// A classification loss on `[B, C]` logits: labels `[B]` become a graph input.
/// Returns `(loss, first node of the loss)`.
pub fn classify(b: &mut Builder, logits: ValueId, smoothing: f64) -> R<(ValueId, usize)> {
    let s = b.shape(logits).to_vec();
    let labels = b.input(vec![s[0]], InputKind::ClassIndex { classes: s[1] });
    let start = b.next_node();
    Ok((cross_entropy(b, logits, labels, smoothing)?, start))
}

/// MONAI's soft Dice of probabilities against a one-hot target, mean over batch and
/// classes: `1 - (2 tp + 1e-5) / (2 (tp + fp + fn) + 1e-5)` with `fp, fn` halved.
fn dice(b: &mut Builder, probs: ValueId, target: ValueId) -> R<ValueId> {
    let rank = b.shape(probs).len();
    let spatial: Vec<usize> = (2..rank).collect();
    let prod = b.mul(probs, target)?;
    let tp = b.sum(prod, spatial.clone(), false);
    let pred = b.sum(probs, spatial.clone(), false);
    let fp = b.sub(pred, tp)?;
    let truth = b.sum(target, spatial, false);
    let fne = b.sub(truth, tp)?;
    let fp = b.mul_scalar(fp, 0.5);
    let fne = b.mul_scalar(fne, 0.5);
    let num = b.mul_scalar(tp, 2.0);
    let num = b.add_scalar(num, 1e-5);
    let den = b.add(tp, fp)?;
    let den = b.add(den, fne)?;
    let den = b.mul_scalar(den, 2.0);
    let den = b.add_scalar(den, 1e-5);
    let ratio = b.div(num, den)?;
    let f = b.rsub_scalar(ratio, 1.0);
    let all = b.all_dims(f);
    Ok(b.mean(f, all, false))
}

/// A segmentation loss on `[B, C, ...]` logits; the labels it needs become a graph input
/// in the layout the reference expects. With `surface`, the surface term of that weight
/// is added (`surface_term`). Returns `(loss, first node of the loss)`.
pub fn segment(b: &mut Builder, logits: ValueId, spec: LossSpec, surface: Option<f64>) -> R<(ValueId, usize)> {
    let (base, start) = segment_base(b, logits, spec)?;
    match surface {
        Some(weight) => Ok((surface_term(b, logits, base, weight)?, start)),
        None => Ok((base, start)),
    }
}

/// Kervadec et al.'s boundary loss as their `SurfaceLoss` computes it, the surface term
/// W4 adds on every k-th step: `weight × mean(probs[:, 1:] × dist)`, where `probs` is the
/// softmax over classes (the sigmoid for one channel) and `dist` is, per foreground
/// class, the signed Euclidean distance to the labelled region's surface (positive
/// outside, negative inside) — computed from the labels on the CPU and copied to the
/// device as the term begins (`graph::SurfaceTerm`). Returns `base + term`.
pub fn surface_term(b: &mut Builder, logits: ValueId, base: ValueId, weight: f64) -> R<ValueId> {
    let s = b.shape(logits).to_vec();
    let classes = s[1];
    let start = b.next_node();
    let mut map_shape = s.clone();
    map_shape[1] = classes.saturating_sub(1).max(1);
    let map = b.side_input(map_shape);
    let fg = if classes == 1 {
        b.unary(crate::graph::Op::Sigmoid, logits)
    } else {
        let probs = b.softmax(logits, 1);
        b.slice(probs, 1, 1, classes - 1, 1)
    };
    let prod = b.mul(fg, map)?;
    let all = b.all_dims(prod);
    let term = b.mean(prod, all, false);
    let term = b.mul_scalar(term, weight);
    let total = b.add(base, term)?;
    b.surface_term(crate::graph::SurfaceTerm { map, start, base_loss: base, term, logits });
    Ok(total)
}

fn segment_base(b: &mut Builder, logits: ValueId, spec: LossSpec) -> R<(ValueId, usize)> {
    let s = b.shape(logits).to_vec();
    let (batch, classes, spatial) = (s[0], s[1], s[2..].to_vec());
    let channel_map = |c: u64| {
        let mut shape = vec![batch, c];
        shape.extend(&spatial);
        shape
    };
    match spec.kind {
        LossKind::TokenCe | LossKind::CausalLm | LossKind::Mse => Err(b.err(
            "loss",
            format!(
                "loss={} applies to exported models; a zoo model trains with ce, bce, dice or dice_ce",
                spec.kind.word()
            ),
        )),
        LossKind::Ce => {
            if classes < 2 {
                return Err(b.err("cross_entropy", "needs 2 or more output channels; use loss=bce for one"));
            }
            let mut shape = vec![batch];
            shape.extend(&spatial);
            let labels = b.input(shape, InputKind::ClassIndex { classes });
            let start = b.next_node();
            Ok((cross_entropy(b, logits, labels, spec.label_smoothing)?, start))
        }
        LossKind::Bce => {
            if classes != 1 {
                return Err(b.err("bce_with_logits", format!("needs out_channels=1, got {classes}")));
            }
            let mask = b.input(channel_map(1), InputKind::Mask);
            let start = b.next_node();
            Ok((b.bce_with_logits(logits, mask)?, start))
        }
        LossKind::Dice | LossKind::DiceCe => {
            if classes == 1 {
                // MONAI with sigmoid=True: the target is the mask itself; DiceCE's CE part is BCE.
                let mask = b.input(channel_map(1), InputKind::Mask);
                let start = b.next_node();
                let probs = b.unary(crate::graph::Op::Sigmoid, logits);
                let d = dice(b, probs, mask)?;
                if spec.kind == LossKind::Dice {
                    return Ok((d, start));
                }
                let bce = b.bce_with_logits(logits, mask)?;
                return Ok((b.add(d, bce)?, start));
            }
            let labels = b.input(channel_map(1), InputKind::ClassMap { classes });
            let start = b.next_node();
            let probs = b.softmax(logits, 1);
            let target = b.one_hot(labels, classes);
            let d = dice(b, probs, target)?;
            if spec.kind == LossKind::Dice {
                return Ok((d, start));
            }
            // DiceCELoss: `target.squeeze(1).long()`, then cross-entropy; lambdas of 1.
            let squeezed = b.squeeze(labels, 1);
            let idx = b.to_i64(squeezed);
            let ce = cross_entropy(b, logits, idx, spec.label_smoothing)?;
            let d = b.mul_scalar(d, 1.0);
            let ce = b.mul_scalar(ce, 1.0);
            Ok((b.add(d, ce)?, start))
        }
    }
}

/// Hugging Face's `ForCausalLMLoss`: fp32 logits, labels padded with -100 and shifted
/// left, then cross-entropy over the flattened logits. `ids` are the input tokens.
pub fn causal_lm(b: &mut Builder, logits: ValueId, ids: ValueId) -> R<(ValueId, usize)> {
    let s = b.shape(logits).to_vec();
    let (batch, seq, vocab) = (s[0], s[1], s[2]);
    let start = b.next_node();
    let logits = b.to_f32(logits);
    let padded = b.pad(ids, vec![(0, 1)]);
    let shifted = b.slice(padded, 1, 1, seq, 1);
    let shifted = b.contiguous(shifted);
    let flat = b.view(logits, vec![batch * seq, vocab])?;
    let labels = b.view(shifted, vec![batch * seq])?;
    let lp = b.log_softmax(flat, 1);
    Ok((b.nll_loss(lp, labels, -100)?, start))
}

/// open_clip's `ClipLoss`: `logit_scale * image @ text.T` and `logit_scale * text @
/// image.T`, each against `arange(B)`, averaged.
pub fn clip(b: &mut Builder, image: ValueId, text: ValueId, scale: ValueId) -> R<(ValueId, usize)> {
    let batch = b.shape(image)[0];
    let labels = b.input(vec![batch], InputKind::ClassIndex { classes: batch });
    let start = b.next_node();
    let si = b.mul(scale, image)?;
    let tt = b.permute(text, vec![1, 0])?;
    let per_image = b.matmul(si, tt)?;
    let st = b.mul(scale, text)?;
    let it = b.permute(image, vec![1, 0])?;
    let per_text = b.matmul(st, it)?;
    let a = cross_entropy(b, per_image, labels, 0.0)?;
    let c = cross_entropy(b, per_text, labels, 0.0)?;
    let sum = b.add(a, c)?;
    Ok((b.mul_scalar(sum, 0.5), start))
}
