//! The synthetic data's rules, defined once: what each graph input holds when a job has
//! no data set. The trainer has two back-ends for them — on the device with tch, and on
//! the host for loader workers — and both take their rule from here, so the two cannot
//! drift apart.
//!
//! Labels follow from the inputs, so the task is learnable: a class adds a bump to its
//! own stretch of the flattened input, a label map is a bucket of the input's first
//! channel, a binary mask thresholds it (2-D masks are vessels the image is brighter
//! along), token sequences count up from a random start and CLIP's labels are positions.

use crate::graph::{Graph, InputKind, Task};

/// What a class or a vessel adds to the input where it is.
pub const SIGNAL: f32 = 2.0;

/// How one input of a batch is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// Standard normal noise (float).
    Noise,
    /// Each sample's ids count up from a random start, modulo `vocab` (int64).
    Tokens { vocab: u64 },
    /// Each sample's own position in the batch (int64): image `i` matches caption `i`.
    Positions,
    /// A random class per sample (int64); input `signal`, when there is one, gets
    /// [`SIGNAL`] added to the class's stretch of each sample's flattened values.
    Class { classes: u64, signal: Option<usize> },
    /// [`bucket`] of input `from`'s first channel, per value (int64 when `index`, else
    /// float); noise is bucketed where no input lines up.
    Buckets { classes: u64, from: Option<usize>, index: bool },
    /// 2-D masks of thin curving vessels (float 0/1), drawn on the host; input
    /// `brighten`'s first channel gets [`SIGNAL`] along them.
    Vessels { brighten: Option<usize> },
    /// 1 where input `from`'s first channel is positive, else 0 (float); noise where no
    /// input lines up.
    Threshold { from: Option<usize> },
}

/// Which of `classes` equal-probability buckets a standard normal value falls in.
pub fn bucket(v: f32, classes: u64) -> f32 {
    let c = classes.max(1) as f32;
    ((1.0 / (1.0 + (-v).exp())) * c).floor().clamp(0.0, c - 1.0)
}

/// The recipe of every input, in order, from each input's shape without the batch
/// dimension and its kind.
pub fn recipes(inputs: &[(Vec<u64>, InputKind)], contrastive: bool) -> Vec<Recipe> {
    let first_real = inputs.iter().position(|(_, k)| *k == InputKind::Real);
    let real_shape = first_real.map(|r| inputs[r].0.as_slice());
    // The first real input, when its first channel (`[C, ...]`) has `per` values.
    let channel0 = |per: u64| -> Option<usize> {
        let xs = real_shape?;
        let c = *xs.first()?;
        (c > 0 && xs.iter().product::<u64>() / c == per).then_some(first_real?)
    };
    inputs
        .iter()
        .map(|(shape, kind)| {
            let per: u64 = shape.iter().product();
            match *kind {
                InputKind::Real => Recipe::Noise,
                InputKind::Tokens { vocab } => Recipe::Tokens { vocab },
                InputKind::ClassIndex { .. } if contrastive => Recipe::Positions,
                InputKind::ClassIndex { classes } if shape.is_empty() => Recipe::Class { classes, signal: first_real },
                InputKind::ClassIndex { classes } => Recipe::Buckets { classes, from: channel0(per), index: true },
                InputKind::ClassMap { classes } => Recipe::Buckets { classes, from: channel0(per), index: false },
                InputKind::Mask if shape.len() == 3 => Recipe::Vessels {
                    brighten: real_shape.filter(|xs| xs.len() == 3 && xs[1..] == shape[1..]).and(first_real),
                },
                InputKind::Mask => Recipe::Threshold { from: channel0(per) },
            }
        })
        .collect()
}

/// The recipes of a graph's inputs.
pub fn of_graph(graph: &Graph) -> Vec<Recipe> {
    let inputs: Vec<(Vec<u64>, InputKind)> =
        graph.inputs.iter().map(|&(v, kind)| (graph.values[v].shape.iter().skip(1).copied().collect(), kind)).collect();
    recipes(&inputs, matches!(graph.task, Task::Contrastive))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_kind_gets_its_rule_and_a_source_only_where_shapes_line_up() {
        let image = (vec![3, 8, 8], InputKind::Real);
        let r = recipes(&[image.clone(), (vec![], InputKind::ClassIndex { classes: 10 })], false);
        assert_eq!(r, [Recipe::Noise, Recipe::Class { classes: 10, signal: Some(0) }]);
        // A per-pixel label of the image's spatial size buckets its first channel.
        let r = recipes(&[image.clone(), (vec![8, 8], InputKind::ClassIndex { classes: 4 })], false);
        assert_eq!(r[1], Recipe::Buckets { classes: 4, from: Some(0), index: true });
        let r = recipes(
            &[(vec![1, 4, 4, 4], InputKind::Real), (vec![1, 4, 4, 4], InputKind::ClassMap { classes: 3 })],
            false,
        );
        assert_eq!(r[1], Recipe::Buckets { classes: 3, from: Some(0), index: false });
        // Another size: noise is bucketed.
        let r = recipes(&[image.clone(), (vec![4, 4], InputKind::ClassIndex { classes: 4 })], false);
        assert_eq!(r[1], Recipe::Buckets { classes: 4, from: None, index: true });
        // 2-D masks are vessels, brightening the image of their size only.
        let r = recipes(&[image.clone(), (vec![1, 8, 8], InputKind::Mask)], false);
        assert_eq!(r[1], Recipe::Vessels { brighten: Some(0) });
        let r = recipes(&[image, (vec![1, 6, 6], InputKind::Mask)], false);
        assert_eq!(r[1], Recipe::Vessels { brighten: None });
        let r = recipes(&[(vec![1, 4, 4, 4], InputKind::Real), (vec![1, 4, 4, 4], InputKind::Mask)], false);
        assert_eq!(r[1], Recipe::Threshold { from: Some(0) });
        let r = recipes(
            &[(vec![16], InputKind::Tokens { vocab: 50 }), (vec![], InputKind::ClassIndex { classes: 4 })],
            true,
        );
        assert_eq!(r, [Recipe::Tokens { vocab: 50 }, Recipe::Positions]);
    }

    #[test]
    fn buckets_split_a_standard_normal_evenly() {
        assert_eq!(bucket(-10.0, 4), 0.0);
        assert_eq!(bucket(10.0, 4), 3.0);
        assert_eq!(bucket(0.0, 2), 1.0);
        assert_eq!(bucket(0.3, 1), 0.0);
    }
}
