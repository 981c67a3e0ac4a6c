//! What a run leaves on disk besides metrics: checkpoints, the run manifest and the final
//! adapters (the global one, and one per client that keeps tensors of its own).

use std::path::{Path, PathBuf};

use super::Simulation;
use crate::checkpoint;
use crate::client::complete;
use crate::error::Result;
use crate::manifest::{self, Manifest, Status};
use crate::params::ParamSet;
use crate::personal::own_params;
use crate::remote::Role;

impl Simulation {
    pub(super) fn save_checkpoint(&self) -> Result<()> {
        let state = checkpoint::State {
            round: self.server.round,
            rng_state: self.server.rng.state(),
            history: self.server.history.clone(),
            records: self.records.clone(),
            best_round: self.best.map(|b| b.0),
            best_loss: self.best.map(|b| b.1),
        };
        checkpoint::save(
            &self.cfg.outdir,
            &self.server.global,
            &self.server.strategy.state()?,
            &self.local,
            &state,
        )
    }

    pub(super) fn write_manifest(&self, status: Status, error: Option<String>) -> Result<()> {
        if matches!(self.role, Role::Client(_)) {
            return Ok(());
        }
        let finished = status == Status::Finished;
        manifest::write(
            &self.cfg.outdir,
            &Manifest {
                status,
                rounds_completed: self.server.round,
                total_rounds: self.cfg.federate.total_round_num,
                adapter_round: finished.then_some(self.server.round),
                adapter_note:
                    "adapter/ holds the global adapter after the final round (not the best round's)",
                best_round: self.best.map(|b| b.0),
                best_loss: self.best.map(|b| b.1),
                error,
            },
        )
    }

    /// The base model's file name, which the PEFT config records.
    fn base_name(&self) -> String {
        self.cfg
            .model
            .path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    }

    /// Writes the adapter a client uses to `dir` (PEFT): its personal adapter (Ditto, pFedMe),
    /// or the global `shared` tensors completed by its own.
    pub(super) fn save_client_adapter(
        &self,
        shared: ParamSet,
        own: &ParamSet,
        dir: &Path,
    ) -> Result<()> {
        let full = complete(shared, own, &self.initial);
        self.adapter.set_tensors(&own_params(full, own))?;
        fedllm_peft::io::save(&self.adapter, &self.model, dir, &self.base_name())?;
        Ok(())
    }

    /// `adapter/` (the global parameters) and `adapter_client_<i>/` for each client with tensors
    /// of its own (all of them in the `local` baseline). PEFT folders.
    pub(super) fn save_adapters(&self) -> Result<PathBuf> {
        let adapter_dir = self.cfg.outdir.join("adapter");
        self.adapter.set_tensors(&self.server.global)?;
        fedllm_peft::io::save(&self.adapter, &self.model, &adapter_dir, &self.base_name())?;
        for c in self.local.ids() {
            let dir = self.cfg.outdir.join(format!("adapter_client_{c}"));
            self.save_client_adapter(self.server.shared(), &self.local.get(c)?, &dir)?;
        }
        Ok(adapter_dir)
    }
}
