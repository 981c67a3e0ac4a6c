//! Checkpoints, written atomically (a complete new folder is renamed over the old one): the
//! global adapter, the strategy's server state, the round, the sampling RNG, the sampled-client
//! history, per-client state of the `local` baseline and the metrics so far.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client_state::{load_set, save_set, ClientStates};
use crate::error::{FlError, Result};
use crate::metrics::RoundRecord;
use crate::params::ParamSet;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub round: usize,
    pub rng_state: u64,
    pub history: Vec<Vec<usize>>,
    pub records: Vec<RoundRecord>,
    pub best_round: Option<usize>,
    pub best_loss: Option<f64>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

pub fn dir(outdir: &Path) -> PathBuf {
    outdir.join("checkpoint")
}

pub fn save(
    outdir: &Path,
    global: &ParamSet,
    server: &ParamSet,
    local: &ClientStates,
    state: &State,
) -> Result<()> {
    let fin = dir(outdir);
    let tmp = outdir.join("checkpoint.tmp");
    let old = outdir.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    save_set(&tmp.join("global.safetensors"), global)?;
    save_set(&tmp.join("server.safetensors"), server)?;
    // One client's state in memory at a time (most may be on disk).
    for c in local.ids() {
        local.write_to(c, &tmp.join(format!("local_{c}.safetensors")))?;
    }
    let sp = tmp.join("state.json");
    std::fs::write(&sp, serde_json::to_string_pretty(state).expect("json"))
        .map_err(|e| io(&sp, e))?;
    // Swap: the old checkpoint stays complete until the new one is in place.
    let _ = std::fs::remove_dir_all(&old);
    if fin.exists() {
        std::fs::rename(&fin, &old).map_err(|e| io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io(&tmp, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

const CLIENT_STATE: &str = "client_state.safetensors";

/// A distributed client's own tensors, written atomically into its folder after each fit.
pub fn save_client_state(dir: &Path, state: &ParamSet) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    save_set(&dir.join(CLIENT_STATE), state)
}

/// The client's own tensors from a previous life of this client, if any.
pub fn load_client_state(dir: &Path) -> Result<Option<ParamSet>> {
    let p = dir.join(CLIENT_STATE);
    if !p.exists() {
        return Ok(None);
    }
    load_set(&p).map(Some)
}

pub struct Loaded {
    pub global: ParamSet,
    pub server: ParamSet,
    /// Each client's saved state file, read one at a time on resume.
    pub local: BTreeMap<usize, PathBuf>,
    pub state: State,
}

pub fn load(outdir: &Path) -> Result<Loaded> {
    let mut d = dir(outdir);
    if !d.join("state.json").exists() && outdir.join("checkpoint.old/state.json").exists() {
        // Interrupted between the two renames: the previous checkpoint is intact.
        d = outdir.join("checkpoint.old");
    }
    let sp = d.join("state.json");
    let text = std::fs::read_to_string(&sp)
        .map_err(|e| io(&sp, format!("no checkpoint to resume from ({e})")))?;
    let state: State = serde_json::from_str(&text).map_err(|e| io(&sp, e))?;
    let mut local = BTreeMap::new();
    for e in std::fs::read_dir(&d).map_err(|e| io(&d, e))? {
        let p = e.map_err(|e| io(&d, e))?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if let Some(c) = name
            .strip_prefix("local_")
            .and_then(|s| s.strip_suffix(".safetensors"))
        {
            let c: usize = c.parse().map_err(|_| io(&p, "bad local state file name"))?;
            local.insert(c, p);
        }
    }
    Ok(Loaded {
        global: load_set(&d.join("global.safetensors"))?,
        server: load_set(&d.join("server.safetensors"))?,
        local,
        state,
    })
}
