//! Data paths as a plan may give them: relative to the agent's data root and unable to
//! leave it. Checked by the plan (its `data` keys) and the zoo (a TorchScript `file`),
//! each naming its own key.

/// A data path's length in bytes.
pub const MAX_DATA_PATH_LEN: usize = 1_024;

/// A data path as a plan may give it: relative to the agent's data root, with no `..`,
/// no empty or `.` components, no backslashes or control characters. The agent confines
/// the resolved path (symlinks included) to the root as well. The error is the reason.
pub fn check_data_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > MAX_DATA_PATH_LEN {
        return Err(format!("must be at most {MAX_DATA_PATH_LEN} bytes, got {}", path.len()));
    }
    if path.starts_with('/') {
        return Err(format!("'{path}' is absolute; give a path relative to the agent's data root"));
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err(format!("'{}' holds a control character or a backslash", path.escape_debug()));
    }
    for part in path.split('/') {
        if part == ".." {
            return Err(format!("'{path}' climbs out of the data root ('..')"));
        }
        if part.is_empty() || part == "." {
            return Err(format!("'{path}' has an empty or '.' component"));
        }
    }
    Ok(())
}
