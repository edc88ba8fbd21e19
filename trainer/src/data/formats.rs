//! Reading samples: formats by file name, `.npy` arrays, NIfTI volumes, PNG/JPEG images
//! and token files, each header-checked and decoded to f32 `[channels, spatial...]`.

use std::path::Path;

use super::sources::split_shape;
use super::*;

/// A file format, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    Npy,
    Nifti,
    Image,
}

pub(super) fn format_of(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".npy") {
        Some(Format::Npy)
    } else if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        Some(Format::Nifti)
    } else if name.ends_with(".png") || name.ends_with(".jpg") || name.ends_with(".jpeg") {
        Some(Format::Image)
    } else {
        None
    }
}

/// The file name without its format's extension (`x` for `x.nii.gz`).
pub(super) fn stem(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii", ".npy", ".png", ".jpeg", ".jpg"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_owned();
        }
    }
    name.to_owned()
}

pub(super) fn is_mask_name(path: &Path) -> bool {
    let s = stem(path);
    s.ends_with("_mask") || s.ends_with("_seg")
}

#[derive(Debug)]
pub(super) struct TokenFile {
    pub(super) len: usize,
    pub(super) dtype: String,
    pub(super) data_start: u64,
}

/// A decoded sample: `[channels, spatial...]` row-major f32.
#[derive(Clone, Debug)]
pub(super) struct Array {
    pub(super) channels: usize,
    pub(super) spatial: Vec<usize>,
    /// The stored spatial size before an image was resized (masks are read at it).
    pub(super) spatial_before_resize: Vec<usize>,
    pub(super) data: Vec<f32>,
}

/// A `.npy` dtype as `f4`, `i8`, …; big-endian and structured types are `None`.
pub(super) fn npy_type(dtype: &npyz::DType) -> Option<String> {
    let d = dtype.descr();
    let d = d.trim_matches('\'');
    if d.starts_with('>') || d.starts_with('[') {
        return None;
    }
    Some(d.trim_start_matches(['<', '|', '=']).to_owned())
}

/// A token file's item type and where its data starts, from its header.
pub(super) fn token_file(path: &Path, len: usize) -> Result<TokenFile, DataError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).map_err(|e| err(path, e))?;
    let dtype = npy_type(&npy.dtype()).unwrap_or_default();
    if !["i2", "u2", "i4", "u4", "i8"].contains(&dtype.as_str()) {
        return Err(err(
            path,
            format!("token ids must be little-endian int16/uint16/int32/uint32/int64, not {}", npy.dtype().descr()),
        ));
    }
    // The header: magic (6), version (2), its length (2 bytes in v1, 4 later), itself.
    let mut head = [0u8; 12];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).map_err(|e| err(path, e))?;
    let data_start = if head[6] == 1 {
        10 + u64::from(u16::from_le_bytes([head[8], head[9]]))
    } else {
        12 + u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]))
    };
    Ok(TokenFile { len, dtype, data_start })
}

/// `len` token ids from position `offset` of a token file, read directly from disk.
pub(super) fn read_token_window(
    path: &Path,
    file: &TokenFile,
    offset: usize,
    len: usize,
) -> Result<Vec<i64>, DataError> {
    use std::io::{Read, Seek, SeekFrom};
    let size = match file.dtype.as_str() {
        "i2" | "u2" => 2,
        "i4" | "u4" => 4,
        _ => 8,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    f.seek(SeekFrom::Start(file.data_start + (offset * size) as u64)).map_err(|e| err(path, e))?;
    let mut raw = vec![0u8; len * size];
    f.read_exact(&mut raw).map_err(|e| err(path, format!("reading tokens {offset}..{}: {e}", offset + len)))?;
    Ok(raw
        .chunks_exact(size)
        .map(|b| match file.dtype.as_str() {
            "i2" => i64::from(i16::from_le_bytes([b[0], b[1]])),
            "u2" => i64::from(u16::from_le_bytes([b[0], b[1]])),
            "i4" => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "u4" => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

pub(super) fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    let f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).map_err(|e| err(path, e))?;
    if npy.order() == npyz::Order::Fortran {
        return Err(err(path, "is stored in Fortran order; save it with np.ascontiguousarray first"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    if n > MAX_SAMPLE_ELEMENTS {
        return Err(err(path, format!("holds {n} values; the limit per sample is {MAX_SAMPLE_ELEMENTS}")));
    }
    let bad = |e: std::io::Error| err(path, e);
    let dtype = npy_type(&npy.dtype()).unwrap_or_else(|| npy.dtype().descr());
    let data: Vec<f32> = match dtype.as_str() {
        "f4" => npy.into_vec::<f32>().map_err(bad)?,
        "f8" => npy.into_vec::<f64>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "f2" => return Err(err(path, "float16 arrays are not read; save as float32")),
        "u1" => npy.into_vec::<u8>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "b1" => npy.into_vec::<bool>().map_err(bad)?.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect(),
        "i1" => npy.into_vec::<i8>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "i2" => npy.into_vec::<i16>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "u2" => npy.into_vec::<u16>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "i4" => npy.into_vec::<i32>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "u4" => npy.into_vec::<u32>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "i8" => npy.into_vec::<i64>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        other => return Err(err(path, format!("has dtype {other}; expected a little-endian number or bool array"))),
    };
    Ok((shape, data))
}

pub(super) fn read_nifti(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    use nifti::{IntoNdArray, NiftiObject};
    let obj = nifti::ReaderOptions::new().read_file(path).map_err(|e| err(path, format!("not a NIfTI file: {e}")))?;
    let arr = obj.into_volume().into_ndarray::<f32>().map_err(|e| err(path, e))?;
    let shape = arr.shape().to_vec();
    if arr.len() > MAX_SAMPLE_ELEMENTS {
        return Err(err(path, format!("holds {} values; the limit per sample is {MAX_SAMPLE_ELEMENTS}", arr.len())));
    }
    // Logical (x, y, z[, c]) order, whatever the memory layout.
    Ok((shape, arr.iter().copied().collect()))
}

/// Reads `path` as `[C, spatial...]`: images resized so their shorter side matches
/// `target`'s (nearest for masks) and converted to `channels`; arrays as stored.
pub(super) fn read_array(path: &Path, target: &[usize], channels: usize, mask: bool) -> Result<Array, DataError> {
    let n = target.len();
    match format_of(path) {
        Some(Format::Image) => {
            if n != 2 {
                return Err(err(path, format!("is a 2-D image; the model takes {n}-D inputs")));
            }
            let img = image::open(path).map_err(|e| err(path, format!("not a readable image: {e}")))?;
            let before = vec![img.height() as usize, img.width() as usize];
            // Masks come at their input's stored size and are resized with it (by the caller).
            let img = if mask {
                img
            } else {
                let (h, w) = (img.height() as f64, img.width() as f64);
                let scale = (target[0] as f64 / h).max(target[1] as f64 / w);
                let (nh, nw) = ((h * scale).round().max(1.0) as u32, (w * scale).round().max(1.0) as u32);
                img.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
            };
            let (h, w) = (img.height() as usize, img.width() as usize);
            let data: Vec<f32> = match channels {
                // A mask's values are labels: read them as stored, never rescaled.
                1 if mask => match &img {
                    image::DynamicImage::ImageLuma8(m) => m.as_raw().iter().map(|&v| f32::from(v)).collect(),
                    image::DynamicImage::ImageLuma16(m) => m.as_raw().iter().map(|&v| f32::from(v)).collect(),
                    other => {
                        return Err(err(
                            path,
                            format!("a mask image must be 8- or 16-bit gray; this one is {:?}", other.color()),
                        ));
                    }
                },
                1 => img.to_luma32f().into_raw(),
                3 => {
                    let rgb = img.to_rgb32f().into_raw();
                    let mut planar = vec![0.0; 3 * h * w];
                    for (p, px) in rgb.chunks_exact(3).enumerate() {
                        for c in 0..3 {
                            planar[c * h * w + p] = px[c];
                        }
                    }
                    planar
                }
                c => return Err(err(path, format!("images give 1 or 3 channels; the model takes {c}"))),
            };
            Ok(Array { channels, spatial: vec![h, w], spatial_before_resize: before, data })
        }
        Some(f @ (Format::Npy | Format::Nifti)) => {
            let (shape, data) = if f == Format::Npy { read_npy(path)? } else { read_nifti(path)? };
            let (c, spatial) = split_shape(path, &shape, n, channels)?;
            let data = if f == Format::Nifti && shape.len() == n + 1 {
                // NIfTI keeps channels last: move them first.
                let per: usize = spatial.iter().product();
                let mut out = vec![0.0; data.len()];
                for (i, &v) in data.iter().enumerate() {
                    out[(i % c) * per + i / c] = v;
                }
                out
            } else {
                data
            };
            Ok(Array { channels: c, spatial: spatial.clone(), spatial_before_resize: spatial, data })
        }
        None => Err(err(path, "is not .npy, .nii, .nii.gz, .png, .jpg or .jpeg")),
    }
}
