//! The weights of a `.pt2` file: `data/weights/model_weights_config.json` (and
//! `data/constants/model_constants_config.json`) name, for each parameter, buffer and
//! constant, the archive entry that holds its storage's raw bytes and how the tensor
//! views it. Read natively by the trainer (`init=file`); nothing here reads the bytes.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

use super::ImportError;

/// The weights configuration entries.
pub const WEIGHTS_CONFIG: &str = "data/weights/model_weights_config.json";
pub const CONSTANTS_CONFIG: &str = "data/constants/model_constants_config.json";
/// The largest configuration read.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;
/// Tensors one configuration may list.
pub const MAX_TENSORS: usize = 1 << 20;

/// One tensor's storage and view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its module path (`layer1.0.conv1.weight`).
    pub fqn: String,
    /// The archive entry holding its storage (`data/weights/weight_3`).
    pub entry: String,
    /// torch.export's `ScalarType` code.
    pub dtype: u32,
    pub sizes: Vec<u64>,
    pub strides: Vec<u64>,
    pub offset: u64,
}

#[derive(Deserialize)]
struct Config {
    config: BTreeMap<String, Json>,
}

/// The tensors a configuration lists; `folder` is `data/weights` or `data/constants`.
pub fn read(text: &[u8], folder: &str) -> Result<Vec<Stored>, ImportError> {
    let bad = |why: String| ImportError::Format(format!("{folder} configuration: {why}"));
    let cfg: Config = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    if cfg.config.len() > MAX_TENSORS {
        return Err(ImportError::TooLarge {
            what: format!("{folder} tensors"),
            size: cfg.config.len() as u64,
            limit: MAX_TENSORS as u64,
        });
    }
    let mut out = Vec::with_capacity(cfg.config.len());
    for (fqn, v) in cfg.config {
        if v.get("use_pickle").and_then(Json::as_bool).unwrap_or(false) {
            return Err(bad(format!("{fqn} is stored as a pickle, which Headroom never opens")));
        }
        let name = v.get("path_name").and_then(Json::as_str).unwrap_or("");
        if name.is_empty() || name.contains('/') || name.contains("..") || name.contains('\\') {
            return Err(bad(format!("{fqn} names the entry {:?}", crate::units::clip(name, 80))));
        }
        let meta = v.get("tensor_meta").ok_or_else(|| bad(format!("{fqn} has no tensor_meta")))?;
        let ints = |key: &str| -> Result<Vec<u64>, ImportError> {
            meta.get(key)
                .and_then(Json::as_array)
                .ok_or_else(|| bad(format!("{fqn}: no {key}")))?
                .iter()
                .map(|d| {
                    d.get("as_int")
                        .and_then(Json::as_u64)
                        .ok_or_else(|| bad(format!("{fqn}: a {key} entry that is not a whole number")))
                })
                .collect()
        };
        let sizes = ints("sizes")?;
        let strides = ints("strides")?;
        if sizes.len() != strides.len() || sizes.len() > 8 {
            return Err(bad(format!("{fqn}: sizes and strides do not match")));
        }
        let offset = meta.get("storage_offset").and_then(|o| o.get("as_int")).and_then(Json::as_u64).unwrap_or(0);
        let dtype = meta.get("dtype").and_then(Json::as_u64).unwrap_or(0) as u32;
        out.push(Stored { fqn, entry: format!("{folder}/{name}"), dtype, sizes, strides, offset });
    }
    Ok(out)
}

impl Stored {
    /// Bytes of storage the view reaches (0 for an empty tensor), or `None` when it
    /// overflows.
    pub fn reach(&self, esize: u64) -> Option<u64> {
        if self.sizes.contains(&0) {
            return Some(0);
        }
        let last = self
            .sizes
            .iter()
            .zip(&self.strides)
            .try_fold(self.offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?))?;
        last.checked_add(1)?.checked_mul(esize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_reads_and_pickles_and_escapes_are_refused() {
        let ok = br#"{"config": {"fc.weight": {"path_name": "weight_0", "is_param": true, "use_pickle": false,
            "tensor_meta": {"dtype": 7, "sizes": [{"as_int": 4}, {"as_int": 3}], "strides": [{"as_int": 3}, {"as_int": 1}],
            "storage_offset": {"as_int": 0}}}}}"#;
        let v = read(ok, "data/weights").expect("reads");
        assert_eq!(v[0].entry, "data/weights/weight_0");
        assert_eq!(v[0].reach(4), Some(48));
        let pickled = String::from_utf8_lossy(ok).replace("\"use_pickle\": false", "\"use_pickle\": true");
        assert!(read(pickled.as_bytes(), "data/weights").expect_err("refused").to_string().contains("pickle"));
        let escape = String::from_utf8_lossy(ok).replace("weight_0", "../../etc/passwd");
        assert!(read(escape.as_bytes(), "data/weights").expect_err("refused").to_string().contains("names the entry"));
    }
}
