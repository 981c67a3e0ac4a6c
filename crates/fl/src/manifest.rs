//! `run.json`: what a run folder holds, so nobody has to guess from file dates. Written when a
//! run starts, after every round, and when it ends; a folder with one belongs to a run, and a
//! new run refuses it unless told to overwrite.

use std::path::Path;

use serde::Serialize;

use crate::error::{FlError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Finished,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub status: Status,
    pub rounds_completed: usize,
    pub total_rounds: usize,
    /// What `adapter/` holds: the global adapter after this round (the last one run).
    pub adapter_round: Option<usize>,
    pub adapter_note: &'static str,
    /// The round with the lowest held-out loss, and that loss (server test, else client val).
    pub best_round: Option<usize>,
    pub best_loss: Option<f64>,
    pub error: Option<String>,
}

pub const FILE: &str = "run.json";

/// What a run writes into its folder (and all `--overwrite` removes).
const RUN_ENTRIES: [&str; 11] = [
    FILE,
    crate::tensorboard::FILE,
    "config.yaml",
    "data_manifest.json",
    "metrics.jsonl",
    "metrics.csv",
    "loss.svg",
    "checkpoint",
    "checkpoint.tmp",
    "checkpoint.old",
    "adapter",
];

fn io(p: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: p.into(),
        msg: e.to_string(),
    }
}

pub fn write(dir: &Path, m: &Manifest) -> Result<()> {
    let p = dir.join(FILE);
    let tmp = dir.join("run.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(m).expect("json"))
        .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| io(&p, e))
}

/// The run files already in `dir`, if any (per-client adapters included).
fn used(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            RUN_ENTRIES.contains(&name.as_ref()) || name.starts_with("adapter_client_")
        })
        .collect()
}

/// A fresh run may use `dir` only if it holds no other run's files; with `overwrite` those
/// files (and nothing else) are removed first.
pub fn claim(dir: &Path, overwrite: bool) -> Result<()> {
    let found = used(dir);
    if found.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let names: Vec<String> = found
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        return Err(FlError::File {
            path: dir.into(),
            msg: format!(
                "holds another run ({}): pass --overwrite to replace it, --resume {} to continue it, or choose another outdir",
                names.join(", "),
                dir.display()
            ),
        });
    }
    for p in found {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| io(&p, e))?;
    }
    Ok(())
}
