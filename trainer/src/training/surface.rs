//! W4's surface term (`graph::SurfaceTerm`): the distance map it needs, made on the CPU
//! from the labels when the term begins.

use shared::graph::Graph;
use tch::{Device, Kind, Tensor};

/// The surface term's distance map (`graph::SurfaceTerm`): the labels copied to host
/// memory, one signed distance map per sample and foreground class made there
/// (`crate::distance`), then copied to the device, laid out `[B, classes - 1, ...]` (one
/// channel for a one-channel model). Returns the map and the host bytes it took at its
/// peak.
pub(super) fn surface_map(graph: &Graph, label: &Tensor, device: Device) -> Result<(Tensor, u64), tch::TchError> {
    let Some(t) = &graph.surface else {
        return Err(tch::TchError::Shape("the graph has no surface term".to_owned()));
    };
    let logits = &graph.values[t.logits].shape;
    let map_shape = graph.values[t.map].shape.clone();
    let (batch, classes) = (logits[0] as usize, logits[1] as usize);
    let spatial: Vec<usize> = logits[2..].iter().map(|&d| d as usize).collect();
    let voxels: usize = spatial.iter().product();
    let channels = map_shape[1] as usize;
    let labels = Vec::<f32>::try_from(&label.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
    if labels.len() != batch * voxels {
        return Err(tch::TchError::Shape(format!(
            "surface term: {} labels for {batch} samples of {voxels} voxels",
            labels.len()
        )));
    }
    let mut map = vec![0f32; batch * channels * voxels];
    let mut working = 0u64;
    for s in 0..batch {
        let sample = &labels[s * voxels..(s + 1) * voxels];
        for c in 0..channels {
            // A one-channel model's region is its mask; otherwise class c + 1's voxels.
            let region: Vec<bool> = if classes == 1 {
                sample.iter().map(|&v| v > 0.5).collect()
            } else {
                sample.iter().map(|&v| v.round() as usize == c + 1).collect()
            };
            let (d, bytes) = crate::distance::signed_distance(&region, &spatial);
            working = working.max(bytes);
            let at = (s * channels + c) * voxels;
            map[at..at + voxels].copy_from_slice(&d);
        }
    }
    let host = (labels.len() + map.len()) as u64 * 4 + working;
    let dims: Vec<i64> = map_shape.iter().map(|&d| d as i64).collect();
    let tensor = Tensor::f_from_slice(&map)?.f_view(dims.as_slice())?.f_to_device(device)?;
    Ok((tensor, host))
}
