//! What clients keep across rounds (their own tensors), held in memory up to a budget and on
//! disk past it: 1,000 clients with 4 MB each must not hold 4 GB of RAM. A state on disk is a
//! safetensors file, written atomically and memory-mapped when its client is sampled again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{FlError, Result};
use crate::params::{bytes, ParamSet};

pub struct ClientStates {
    mem: BTreeMap<usize, ParamSet>,
    on_disk: BTreeSet<usize>,
    dir: PathBuf,
    budget: usize,
    held: usize,
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// Writes `set` to `path` atomically (a complete file is renamed into place).
pub(crate) fn save_set(path: &Path, set: &ParamSet) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let m: std::collections::HashMap<String, candle_core::Tensor> =
        set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_core::safetensors::save(&m, &tmp).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads a safetensors file through a memory map into CPU tensors.
pub(crate) fn load_set(path: &Path) -> Result<ParamSet> {
    // SAFETY: the file is this run's own, written atomically and not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| io(path, e))?;
    let mut out = ParamSet::new();
    for (name, _) in st.tensors() {
        let t = st
            .load(&name, &candle_core::Device::Cpu)
            .map_err(|e| io(path, e))?;
        out.insert(name, t);
    }
    Ok(out)
}

impl ClientStates {
    /// States past `budget_bytes` go to files in `dir` (created when first needed).
    pub fn new(dir: PathBuf, budget_bytes: usize) -> Self {
        Self {
            mem: BTreeMap::new(),
            on_disk: BTreeSet::new(),
            dir,
            budget: budget_bytes,
            held: 0,
        }
    }

    fn file(&self, client: usize) -> PathBuf {
        self.dir.join(format!("client-{client}.safetensors"))
    }

    /// The clients that have a state.
    pub fn ids(&self) -> Vec<usize> {
        let mut ids: Vec<usize> = self.mem.keys().chain(&self.on_disk).copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty() && self.on_disk.is_empty()
    }

    /// Bytes of state held in memory now (never above the budget).
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Writes `client`'s state to `path` (a checkpoint): a state on disk is copied as it is.
    pub fn write_to(&self, client: usize, path: &Path) -> Result<()> {
        if self.on_disk.contains(&client) {
            let from = self.file(client);
            std::fs::copy(&from, path).map_err(|e| io(&from, e))?;
            return Ok(());
        }
        save_set(path, &self.get(client)?)
    }

    /// A copy of `client`'s state (empty if it has none).
    pub fn get(&self, client: usize) -> Result<ParamSet> {
        if let Some(s) = self.mem.get(&client) {
            return Ok(s.clone());
        }
        if self.on_disk.contains(&client) {
            return load_set(&self.file(client));
        }
        Ok(ParamSet::new())
    }

    /// Takes `client`'s state out (empty if it has none); `put` gives it back.
    pub fn take(&mut self, client: usize) -> Result<ParamSet> {
        if let Some(s) = self.mem.remove(&client) {
            self.held -= bytes(&s);
            return Ok(s);
        }
        if self.on_disk.remove(&client) {
            return load_set(&self.file(client));
        }
        Ok(ParamSet::new())
    }

    /// Stores `client`'s state, in memory while the budget allows, else on disk.
    pub fn put(&mut self, client: usize, state: ParamSet) -> Result<()> {
        // Drop any older state without reading it back.
        if let Some(old) = self.mem.remove(&client) {
            self.held -= bytes(&old);
        }
        self.on_disk.remove(&client);
        if state.is_empty() {
            return Ok(());
        }
        let n = bytes(&state);
        if self.held + n <= self.budget {
            self.held += n;
            self.mem.insert(client, state);
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        save_set(&self.file(client), &state)?;
        self.on_disk.insert(client);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn state(c: usize, n: usize) -> ParamSet {
        let v: Vec<f32> = (0..n).map(|i| (c * n + i) as f32 * 0.25 - 3.0).collect();
        ParamSet::from([(
            "w".to_string(),
            Tensor::from_vec(v, n, &Device::Cpu).unwrap(),
        )])
    }

    fn values(s: &ParamSet) -> Vec<f32> {
        s["w"].to_vec1().unwrap()
    }

    /// Memory never holds more than the budget, and every state comes back bit for bit, from
    /// memory or disk: 200 clients × 40 kB under a 1 MB budget (most states spill).
    #[test]
    fn states_past_the_budget_wait_on_disk_and_come_back_exact() {
        let dir = std::env::temp_dir().join(format!("fedllm-states-{}", std::process::id()));
        let (clients, n, budget) = (200, 10_000, 1 << 20);
        let mut st = ClientStates::new(dir.clone(), budget);
        for c in 0..clients {
            st.put(c, state(c, n)).unwrap();
            assert!(st.held_bytes() <= budget);
        }
        assert_eq!(st.ids(), (0..clients).collect::<Vec<_>>());
        let on_disk = std::fs::read_dir(&dir).unwrap().count();
        // 1 MB holds 26 states of 40 kB; the other 174 are files.
        assert_eq!(on_disk, clients - budget / (n * 4));
        for c in (0..clients).rev() {
            assert_eq!(values(&st.get(c).unwrap()), values(&state(c, n)));
            let s = st.take(c).unwrap();
            assert_eq!(values(&s), values(&state(c, n)));
            st.put(c, s).unwrap();
            assert!(st.held_bytes() <= budget);
        }
        assert!(st.take(clients).unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
