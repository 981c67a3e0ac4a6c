//! Per-sample results as JSON lines: appended as they are produced, read back to skip finished
//! samples when a run is resumed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{EvalError, Result};

pub fn append<T: Serialize>(path: &Path, row: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| EvalError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
    writeln!(f, "{}", serde_json::to_string(row).expect("json")).map_err(|e| EvalError::File {
        path: path.into(),
        msg: e.to_string(),
    })
}

/// Rows already in `path` by their `key` field (a torn last line is ignored).
pub fn done_keys(path: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(BTreeMap::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            v.get("key")
                .and_then(|k| k.as_str())
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect())
}
