//! The round engine. Standalone, N clients live in one process sharing one frozen base model
//! and one adapter whose values are swapped per message, so memory does not grow with the base
//! model per client. Split by concern: `setup` (config → data, model, adapter, server),
//! `driver` (the round loop), `evaluate`, `persist` (checkpoints, manifest, adapters) and
//! `role` (a distributed client's answers). The baselines are policies set up once: `global`
//! pools the data in one client, `local` keeps every tensor on its client.

use std::path::{Path, PathBuf};

use fedllm_data::Sample;
use fedllm_model::{CausalLm, Tokenizer};
use fedllm_peft::Adapter;
use fedllm_rng::Rng;
use fedllm_train::finetune::Budget;
use fedllm_train::TrainConfig;

use crate::checkpoint;
use crate::client::{Client, Shared};
use crate::client_state::{load_set, ClientStates};
use crate::config::{LocalBudget, RunConfig};
use crate::error::Result;
use crate::metrics::RoundRecord;
use crate::params::ParamSet;
use crate::remote::{Remote, Role};
use crate::server::Server;

mod driver;
mod evaluate;
mod persist;
mod role;
mod secure;
mod setup;

pub use setup::load_model;

pub struct Simulation {
    pub cfg: RunConfig,
    pub model: CausalLm,
    pub adapter: Adapter,
    pub tokenizer: Tokenizer,
    pub server: Server,
    pub clients: Vec<Client>,
    pub server_test: Vec<Sample>,
    /// `eval.accuracy`'s questions (server side; empty when it is off).
    accuracy_set: Vec<fedllm_eval::gsm8k::Question>,
    /// Offsite tuning (server side): the full model the trained edge layers plug into.
    pub plugin: Option<crate::offsite::Plugin>,
    /// What setup did that the run's log should say (e.g. where the emulator file went).
    notes: Vec<String>,
    pub records: Vec<RoundRecord>,
    /// The tensors each client keeps to itself (`federate.local_tensors`, or all of them in
    /// the `local` baseline).
    pub local: ClientStates,
    pub best: Option<(usize, f64)>,
    /// Distributed server: where requests go instead of `clients`.
    pub remote: Option<Box<dyn Remote>>,
    pub role: Role,
    initial: ParamSet,
    train: TrainConfig,
    pad_id: u32,
    /// The last round's failures, for the error that stops a run.
    last_failures: Vec<String>,
    /// A distributed client: the global tensors it last received (for its final adapter).
    last_shared: ParamSet,
    /// Secure aggregation: the open round's state of each client answered here.
    secagg: std::collections::BTreeMap<usize, crate::secagg::client::ClientRound>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub records: Vec<RoundRecord>,
    pub best_round: Option<usize>,
    pub best_loss: Option<f64>,
    pub adapter_dir: PathBuf,
    pub table: String,
}

impl Simulation {
    /// Loads the model and data, builds the clients and the server. Writes the resolved config.
    pub fn new(cfg: RunConfig) -> Result<Self> {
        Self::with_role(cfg, Role::Standalone)
    }

    /// As `new`, for one side of a distributed run: the server tokenizes no client data, a
    /// client only its own (and writes under `outdir/client-<i>`).
    pub fn with_role(cfg: RunConfig, role: Role) -> Result<Self> {
        Self::setup(cfg, role, true, None)
    }

    /// As `new`, on a model and tokenizer already loaded for `cfg.model` (no reload; the run
    /// attaches its adapter to its own copy).
    pub fn with_model(cfg: RunConfig, model: &CausalLm, tokenizer: &Tokenizer) -> Result<Self> {
        Self::setup(cfg, Role::Standalone, true, Some((model, tokenizer)))
    }

    /// Continues the run in `outdir` from its last checkpoint (same config, same data).
    pub fn resume(outdir: &Path, overrides: &[String]) -> Result<Self> {
        Self::resume_as(outdir, overrides, Role::Standalone)
    }

    pub fn resume_as(outdir: &Path, overrides: &[String], role: Role) -> Result<Self> {
        Self::resume_on(outdir, overrides, role, None)
    }

    /// `resume` on a model and tokenizer already loaded for the run's `model` section.
    pub fn resume_with_model(
        outdir: &Path,
        model: &CausalLm,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        Self::resume_on(outdir, &[], Role::Standalone, Some((model, tokenizer)))
    }

    fn resume_on(
        outdir: &Path,
        overrides: &[String],
        role: Role,
        base: Option<(&CausalLm, &Tokenizer)>,
    ) -> Result<Self> {
        let mut cfg = RunConfig::from_file(&outdir.join("config.yaml"), overrides)?;
        cfg.outdir = outdir.to_path_buf();
        let mut sim = Self::setup(cfg, role, false, base)?;
        let ck = checkpoint::load(outdir)?;
        sim.server.global = ck.global;
        sim.server.strategy.load_state(&ck.server)?;
        sim.server.round = ck.state.round;
        sim.server.rng = Rng::new(ck.state.rng_state);
        sim.server.history = ck.state.history;
        sim.records = ck.state.records;
        sim.best = ck.state.best_round.zip(ck.state.best_loss);
        for (c, file) in ck.local {
            sim.local.put(c, load_set(&file)?)?;
        }
        Ok(sim)
    }

    /// The adapter's parameters before any training (what every client starts from).
    pub fn initial(&self) -> &ParamSet {
        &self.initial
    }

    fn shared(&self) -> Shared<'_> {
        let t = &self.cfg.train;
        Shared {
            initial: &self.initial,
            model: &self.model,
            adapter: &self.adapter,
            train: &self.train,
            budget: match t.batch_or_epoch {
                LocalBudget::Epoch => Budget::Epochs(t.local_update_steps),
                LocalBudget::Batch => Budget::Steps(t.local_update_steps),
            },
            batch_size: t.batch_size,
            eval_batch_size: self.cfg.eval.batch_size,
            pad_id: self.pad_id,
            personal: &self.cfg.personal,
        }
    }
}
