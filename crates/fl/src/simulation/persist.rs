//! What a run leaves on disk besides metrics: checkpoints, the run manifest and the final
//! adapters (the global one, and one per client that keeps tensors of its own).

use super::Simulation;
use crate::checkpoint;
use crate::error::Result;
use crate::manifest::{self, Manifest, Status};
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

    /// `adapter/` (the global parameters) and `adapter_client_<i>/` for each client with tensors
    /// of its own: its personal adapter (Ditto, pFedMe), or the global shared tensors completed
    /// by its own (all of them in the `local` baseline). PEFT folders.
    pub(super) fn save_adapters(&self) -> Result<std::path::PathBuf> {
        let adapter_dir = self.cfg.outdir.join("adapter");
        self.adapter.set_tensors(&self.server.global)?;
        let base = self
            .cfg
            .model
            .path
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        fedllm_peft::io::save(&self.adapter, &self.model, &adapter_dir, &base)?;
        for c in self.local.ids() {
            let own = self.local.get(c)?;
            let mut full = self.server.global.clone();
            for (k, v) in &own {
                if !k.starts_with(crate::personal::PERSONAL) {
                    full.insert(k.clone(), v.clone());
                }
            }
            self.adapter
                .set_tensors(&crate::personal::own_params(full, &own))?;
            let dir = self.cfg.outdir.join(format!("adapter_client_{c}"));
            fedllm_peft::io::save(&self.adapter, &self.model, &dir, &base)?;
        }
        Ok(adapter_dir)
    }
}
