//! Standalone simulation: N clients in one process sharing one frozen base model and one
//! adapter whose values are swapped per message; only parameter sets and data are per client,
//! so memory does not grow with the base model per client. The round loop lives here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fedllm_data::federated::{build, preset, Source, SplitConfig};
use fedllm_data::record::Record;
use fedllm_data::split::Splitter;
use fedllm_data::{tokenize_all, Sample};
use fedllm_model::rng::Rng;
use fedllm_model::{CausalLm, Tokenizer};
use fedllm_peft::Adapter;
use fedllm_train::finetune::{eval_batches, eval_loss, Budget};
use fedllm_train::TrainConfig;

use crate::assemble::{self, adapter_config, format, splitter, template, train_config};
use crate::checkpoint;
use crate::client::{snapshot, Client, Shared};
use crate::config::{Baseline, LocalBudget, RunConfig};
use crate::error::{FlError, Result};
use crate::manifest::{self, Manifest, Status};
use crate::message::{ToClient, ToServer};
use crate::metrics::{summary_table, write_all, RoundRecord};
use crate::params::{bytes, ParamSet};
use crate::remote::{Remote, Role};
use crate::server::Server;
use crate::strategy;

/// Up to this many clients, every client is evaluated at each evaluation round.
const MAX_EVAL_ALL_CLIENTS: usize = 32;

pub struct Simulation {
    pub cfg: RunConfig,
    pub model: CausalLm,
    pub adapter: Adapter,
    pub tokenizer: Tokenizer,
    pub server: Server,
    pub clients: Vec<Client>,
    pub server_test: Vec<Sample>,
    pub records: Vec<RoundRecord>,
    /// The `local` baseline's per-client parameters.
    pub local: BTreeMap<usize, ParamSet>,
    pub best: Option<(usize, f64)>,
    /// Distributed server: where requests go instead of `clients`.
    pub remote: Option<Box<dyn Remote>>,
    pub role: Role,
    initial: ParamSet,
    train: TrainConfig,
    pad_id: u32,
    /// The last round's failures, for the error that stops a run.
    last_failures: Vec<String>,
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
        Self::setup(cfg, role, true)
    }

    /// `fresh`: a new run, which may not reuse another run's folder (see `manifest::claim`).
    fn setup(mut cfg: RunConfig, role: Role, fresh: bool) -> Result<Self> {
        cfg.validate()?;
        // A client's folder is its own state, kept across restarts.
        if fresh && !matches!(role, Role::Client(_)) {
            manifest::claim(&cfg.outdir, false)?;
        }
        if let Role::Client(i) = role {
            if i >= cfg.federate.client_num {
                return Err(FlError::Config(format!(
                    "client index {i} is out of range: federate.client_num is {}",
                    cfg.federate.client_num
                )));
            }
            cfg.outdir = cfg.outdir.join(format!("client-{i}"));
        }
        let d = &cfg.data;
        let (source, mut split) = match preset(&d.source) {
            Some(p) => (
                p.source(&cfg.data_root())?,
                p.split_config(cfg.federate.seed),
            ),
            None => {
                let format = format(d.format);
                let train = PathBuf::from(&d.source);
                let fr = if d.test_source.is_some() {
                    [1.0, 0.0, 0.0]
                } else {
                    [0.9, 0.05, 0.05]
                };
                let src = Source {
                    train,
                    test: d.test_source.clone(),
                    format: Some(format),
                    derive_category: false,
                };
                (
                    src,
                    SplitConfig {
                        splitter: Splitter::Iid,
                        clients: 1,
                        seed: cfg.federate.seed,
                        fractions: fr,
                    },
                )
            }
        };
        split.clients = cfg.federate.client_num;
        if let Some(s) = d.splitter {
            split.splitter = splitter(s, d.alpha);
        }
        if let Some(s) = d.splits {
            split.fractions = s;
        }
        let fed = build(&source, &split)?;

        let opts = assemble::load_options(&cfg.model);
        let loaded = CausalLm::load(&cfg.model.path, opts)?;
        let mut model = loaded.model;
        let tokenizer = loaded
            .tokenizer
            .ok_or_else(|| FlError::Config("the model has no tokenizer".into()))?;
        let context = model.config.context_length();
        if d.tok_len > context {
            return Err(FlError::Config(format!(
                "data.tok_len = {} exceeds the model's context length ({context})",
                d.tok_len
            )));
        }
        let template = template(d.template);
        // Samples whose prompt alone fills tok_len are dropped; counted to explain an empty client.
        let dropped = std::cell::Cell::new(0usize);
        let tok = |recs: Vec<&Record>, cap: Option<usize>| -> Result<Vec<Sample>> {
            let owned: Vec<Record> = recs
                .into_iter()
                .take(cap.unwrap_or(usize::MAX))
                .cloned()
                .collect();
            let (s, rep) = tokenize_all(&owned, template, &tokenizer, d.tok_len)?;
            dropped.set(dropped.get() + rep.dropped_no_target);
            Ok(s)
        };
        let eval_cap = cfg.eval.max_samples;
        let mut clients = Vec::with_capacity(cfg.federate.client_num);
        for c in 0..cfg.federate.client_num {
            match role {
                Role::Server => {
                    clients.push(Client {
                        id: c,
                        train: vec![],
                        splits: BTreeMap::new(),
                    });
                    continue;
                }
                Role::Client(i) if i != c => continue,
                _ => {}
            }
            let splits = BTreeMap::from([
                ("val".to_string(), tok(fed.client("val", c), eval_cap)?),
                ("test".to_string(), tok(fed.client("test", c), eval_cap)?),
            ]);
            clients.push(Client {
                id: c,
                train: tok(fed.client("train", c), d.max_train_per_client)?,
                splits,
            });
        }
        if cfg.federate.baseline == Baseline::Global {
            // One client holding everyone's data.
            let mut all = Client {
                id: 0,
                train: vec![],
                splits: BTreeMap::new(),
            };
            for c in clients.drain(..) {
                all.train.extend(c.train);
                for (k, v) in c.splits {
                    all.splits.entry(k).or_default().extend(v);
                }
            }
            clients.push(all);
        }
        if let Some(c) = clients
            .iter()
            .find(|c| c.train.is_empty() && role != Role::Server)
        {
            if dropped.get() > 0 {
                return Err(FlError::Config(format!(
                    "data.tok_len = {} is too short: the prompt fills it, leaving no response token, in {} samples (client {} has none left); raise data.tok_len",
                    d.tok_len,
                    dropped.get(),
                    c.id
                )));
            }
            return Err(FlError::Config(format!(
                "client {} has no training samples: {} holds too few records for {} clients (more data or fewer clients)",
                c.id,
                source.train.display(),
                cfg.federate.client_num
            )));
        }
        let server_test = match role {
            Role::Client(_) => vec![],
            _ => tok(fed.server_test(), eval_cap)?,
        };

        let adapter = Adapter::init(
            &model,
            adapter_config(&cfg.adapter, &model),
            cfg.federate.seed,
            Some(&tokenizer),
        )?;
        adapter.attach(&mut model, true)?;
        let initial = snapshot(&adapter)?;
        let mut local_state: BTreeMap<usize, ParamSet> = BTreeMap::new();
        let per_round = if cfg.federate.baseline == Baseline::Global {
            1
        } else {
            cfg.clients_per_round()
        };
        let strat = strategy::build(&cfg.federate.strategy, &cfg.federate.strategy_params);
        let mut server = Server::new(strat, initial.clone(), cfg.federate.seed, per_round);
        let steps_per_round = match cfg.train.batch_or_epoch {
            LocalBudget::Batch => cfg.train.local_update_steps,
            LocalBudget::Epoch => 0,
        };
        server.steps_per_round = steps_per_round;
        server.local_patterns = cfg.federate.local_tensors.clone();
        if !cfg.federate.local_tensors.is_empty() {
            let shared = server.shared();
            if shared.is_empty() {
                return Err(FlError::Config(format!(
                    "federate.local_tensors {:?} keeps every adapter tensor on the clients (for no sharing at all use federate.baseline=local)",
                    cfg.federate.local_tensors
                )));
            }
            if shared.len() == initial.len() {
                return Err(FlError::Config(format!(
                    "federate.local_tensors {:?} matches no adapter tensor (names look like {})",
                    cfg.federate.local_tensors,
                    initial.keys().next().map(String::as_str).unwrap_or("-")
                )));
            }
        }
        if let Role::Client(i) = role {
            if let Some(st) = checkpoint::load_client_state(&cfg.outdir)? {
                local_state.insert(i, st);
            }
        }
        for c in &clients {
            server.on_message(ToServer::Join { client: c.id })?;
        }
        let pad_id = tokenizer
            .pad_token_id
            .or(tokenizer.eos_token_ids.first().copied())
            .unwrap_or(0);
        std::fs::create_dir_all(&cfg.outdir).map_err(|e| FlError::File {
            path: cfg.outdir.clone(),
            msg: e.to_string(),
        })?;
        let cp = cfg.outdir.join("config.yaml");
        std::fs::write(&cp, cfg.to_yaml()).map_err(|e| FlError::File {
            path: cp,
            msg: e.to_string(),
        })?;
        let mf = cfg.outdir.join("data_manifest.json");
        std::fs::write(&mf, serde_json::to_string(&fed.manifest).expect("json")).map_err(|e| {
            FlError::File {
                path: mf,
                msg: e.to_string(),
            }
        })?;
        Ok(Self {
            train: train_config(&cfg.train, steps_per_round * cfg.federate.total_round_num),
            cfg,
            model,
            adapter,
            tokenizer,
            server,
            clients,
            server_test,
            records: Vec::new(),
            local: local_state,
            best: None,
            remote: None,
            role,
            initial,
            pad_id,
            last_failures: Vec::new(),
        })
    }

    /// Continues the run in `outdir` from its last checkpoint (same config, same data).
    pub fn resume(outdir: &Path, overrides: &[String]) -> Result<Self> {
        Self::resume_as(outdir, overrides, Role::Standalone)
    }

    pub fn resume_as(outdir: &Path, overrides: &[String], role: Role) -> Result<Self> {
        let mut cfg = RunConfig::from_file(&outdir.join("config.yaml"), overrides)?;
        cfg.outdir = outdir.to_path_buf();
        let mut sim = Self::setup(cfg, role, false)?;
        let ck = checkpoint::load(outdir)?;
        sim.server.global = ck.global;
        sim.server.strategy.load_state(&ck.server)?;
        sim.server.round = ck.state.round;
        sim.server.rng = Rng::new(ck.state.rng_state);
        sim.server.history = ck.state.history;
        sim.records = ck.state.records;
        sim.best = ck.state.best_round.zip(ck.state.best_loss);
        sim.local = ck.local;
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
            local_patterns: &self.cfg.federate.local_tensors,
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
        }
    }

    /// A distributed client's answer to one server message (None for `Finish`).
    pub fn handle(&mut self, msg: ToClient) -> Result<Option<ToServer>> {
        let Role::Client(i) = self.role else {
            return Err(FlError::Protocol(
                "only a client answers server messages".into(),
            ));
        };
        let eval = matches!(msg, ToClient::Evaluate { .. });
        if eval {
            self.adapter.attach(&mut self.model, false)?;
        }
        let fit = matches!(msg, ToClient::Fit { .. });
        let mut state = self.local.remove(&i).unwrap_or_default();
        let client = self.clients.iter().find(|c| c.id == i).expect("own data");
        let out = client.handle(msg, &self.shared(), &mut state);
        if eval {
            self.adapter.attach(&mut self.model, true)?;
        }
        if fit && !state.is_empty() && out.is_ok() {
            // The client's own tensors outlive the process (a restarted client resumes them).
            checkpoint::save_client_state(&self.cfg.outdir, &state)?;
        }
        if !state.is_empty() {
            self.local.insert(i, state);
        }
        out
    }

    fn eval_server(&self, params: &ParamSet) -> Result<Option<f64>> {
        if self.server_test.is_empty() {
            return Ok(None);
        }
        self.adapter.set_tensors(params)?;
        let b = eval_batches(
            &self.server_test,
            self.cfg.eval.batch_size,
            self.pad_id,
            &self.model.device,
        )?;
        Ok(Some(eval_loss(&self.model, &self.adapter, &b)?.0))
    }

    /// Evaluates every client on its val and test splits (each with its own parameters in the
    /// `local` baseline); token-weighted means.
    fn eval_clients(&mut self) -> Result<(Option<f64>, Option<f64>)> {
        // Many clients: evaluate the round's sampled ones (round 0: the first k), not everyone.
        let ids: Vec<usize> = if self.clients.len() <= MAX_EVAL_ALL_CLIENTS {
            self.clients.iter().map(|c| c.id).collect()
        } else {
            match self.server.history.last() {
                Some(h) => h.clone(),
                None => (0..self.server.clients_per_round.min(self.clients.len())).collect(),
            }
        };
        let round = self.server.round;
        let mut reqs = Vec::with_capacity(ids.len());
        for id in ids {
            let splits = self.server.strategy.configure_evaluate(round, id);
            if splits.is_empty() {
                continue;
            }
            let params = match self.cfg.federate.baseline {
                Baseline::Local => self
                    .local
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| self.initial.clone()),
                _ => self.server.shared(),
            };
            *self.server.bytes_down.entry(id).or_default() += bytes(&params);
            let msg = ToClient::Evaluate {
                round,
                params,
                splits,
            };
            reqs.push((id, msg));
        }
        let replies = match self.remote.as_mut() {
            Some(r) => {
                let n = reqs.len();
                r.exchange(round, reqs, n)?
            }
            None => {
                let mut out = Vec::new();
                for (id, msg) in reqs {
                    let client = &self.clients[id.min(self.clients.len() - 1)];
                    let mut state = self.local.get(&id).cloned().unwrap_or_default();
                    out.extend(client.handle(msg, &self.shared(), &mut state)?);
                }
                out
            }
        };
        let results: Vec<strategy::EvalResult> = replies
            .into_iter()
            .filter_map(|reply| match reply {
                ToServer::EvalRes { client, losses, .. } => Some((client, losses)),
                _ => None,
            })
            .collect();
        let agg = self.server.strategy.aggregate_evaluate(round, &results);
        Ok((agg.get("val").copied(), agg.get("test").copied()))
    }

    fn evaluate(&mut self, rec: &mut RoundRecord) -> Result<()> {
        self.adapter.attach(&mut self.model, false)?;
        rec.server_test_loss = match self.cfg.federate.baseline {
            Baseline::Local => None,
            _ => self.eval_server(&self.server.global.clone())?,
        };
        let (v, t) = self.eval_clients()?;
        rec.client_val_loss = v;
        rec.client_test_loss = t;
        self.adapter.attach(&mut self.model, true)?;
        let key = rec.server_test_loss.or(rec.client_val_loss);
        if let Some(l) = key {
            if self.best.is_none_or(|(_, b)| l < b) {
                self.best = Some((rec.round, l));
            }
        }
        Ok(())
    }

    fn save_checkpoint(&self) -> Result<()> {
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

    fn write_manifest(&self, status: Status, error: Option<String>) -> Result<()> {
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

    /// After a round in which no client succeeded: the error that stops the run once
    /// `max_failed_rounds` such rounds came in a row (0 = never stop).
    fn failed_rounds_error(&self) -> Option<FlError> {
        let limit = self.cfg.max_failed_rounds();
        let failed = |r: &RoundRecord| !r.failed.is_empty() && r.client_train_loss.is_empty();
        let streak = self.records.iter().rev().take_while(|r| failed(r)).count();
        if limit == 0 || streak < limit {
            return None;
        }
        let last = self.records.last()?;
        Some(FlError::RoundsFailed(format!(
            "round {}: no client succeeded ({}); stopping after {streak} such round(s) in a row (federate.max_failed_rounds = {limit})",
            last.round,
            self.last_failures.join("; ")
        )))
    }

    /// Runs the remaining rounds. `stop_after` ends early after that round (as a crash would;
    /// tests use it), `log` receives one line per round.
    pub fn run(
        &mut self,
        progress: bool,
        stop_after: Option<usize>,
        mut log: impl FnMut(&str),
    ) -> Result<Summary> {
        let total = self.cfg.federate.total_round_num;
        let freq = self.cfg.eval.freq;
        if let Some(r) = self.remote.as_mut() {
            let min = self
                .cfg
                .distributed
                .min_clients
                .unwrap_or(self.cfg.federate.client_num);
            r.wait_for_clients(min)?;
        }
        self.write_manifest(Status::Running, None)?;
        if self.records.is_empty() && freq > 0 {
            let t0 = Instant::now();
            let mut rec = empty_record(0);
            self.evaluate(&mut rec)?;
            rec.seconds = t0.elapsed().as_secs_f64();
            rec.bytes_down = self.server.bytes_down.values().sum();
            if let Some(r) = self.remote.as_mut() {
                (rec.wire_down_per_client, rec.wire_up_per_client) = r.take_wire_bytes();
            }
            log(&round_line(&rec));
            self.records.push(rec);
        }
        while self.server.round < total {
            let t0 = Instant::now();
            let mut reqs = self.server.start_round()?;
            let round = self.server.round;
            if self.cfg.federate.baseline == Baseline::Local {
                for (c, msg) in reqs.iter_mut() {
                    if let ToClient::Fit { params, .. } = msg {
                        *params = self
                            .local
                            .get(c)
                            .cloned()
                            .unwrap_or_else(|| self.initial.clone());
                    }
                }
            }
            let bar = fedllm_train::Progress::new(
                &format!("round {round}/{total}"),
                "clients",
                reqs.len() as u64,
                progress && self.remote.is_none(),
            );
            let replies = match self.remote.as_mut() {
                Some(r) => {
                    let min = self
                        .cfg
                        .distributed
                        .min_received
                        .unwrap_or(reqs.len())
                        .min(reqs.len());
                    r.exchange(round, reqs, min)?
                }
                None => {
                    let mut out = Vec::with_capacity(reqs.len());
                    for (c, msg) in reqs {
                        let mut state = self.local.get(&c).cloned().unwrap_or_default();
                        match self.clients[c].handle(msg, &self.shared(), &mut state) {
                            Ok(Some(m)) => out.push(m),
                            Ok(None) => {}
                            Err(e) => out.push(ToServer::Failed {
                                round,
                                client: c,
                                reason: e.to_string(),
                            }),
                        }
                        if !state.is_empty() {
                            self.local.insert(c, state);
                        }
                        bar.inc(1);
                    }
                    out
                }
            };
            for msg in replies {
                if let Err(e) = self.server.on_message(msg) {
                    log(&format!("round {round}: ignored message: {e}"));
                }
            }
            bar.finish();
            let outcome = if self.cfg.federate.baseline == Baseline::Local {
                // No aggregation: every client keeps its own parameters.
                let o = self.server.close_round_without_aggregation();
                for r in &o.results {
                    self.local.insert(r.client, r.params.clone());
                }
                o
            } else {
                self.server.close_round()?
            };
            let mut rec = empty_record(round);
            rec.clients = self.server.history.last().cloned().unwrap_or_default();
            rec.failed = outcome.failures.iter().map(|f| f.client).collect();
            for f in &outcome.failures {
                log(&format!(
                    "round {round}: client {} failed: {}",
                    f.client, f.reason
                ));
            }
            self.last_failures = outcome
                .failures
                .iter()
                .map(|f| format!("client {}: {}", f.client, f.reason))
                .collect();
            let mut tok = 0f64;
            let mut sum = 0f64;
            for r in &outcome.results {
                let (l, n) = (r.metrics["train_loss"], r.metrics["train_tokens"]);
                rec.client_train_loss.insert(r.client, l);
                if let (Some(a), Some(b)) = (r.metrics.get("lr_first"), r.metrics.get("lr_last")) {
                    rec.client_lr.insert(r.client, (*a, *b));
                }
                rec.nan_skipped += r.metrics["nan_skipped"] as usize;
                sum += l * n;
                tok += n;
            }
            rec.train_loss = (tok > 0.0).then(|| sum / tok);
            if freq > 0 && (round.is_multiple_of(freq) || round == total) {
                self.evaluate(&mut rec)?;
            }
            rec.bytes_down_per_client = self.server.bytes_down.clone();
            rec.bytes_up_per_client = self.server.bytes_up.clone();
            rec.bytes_down = rec.bytes_down_per_client.values().sum();
            rec.bytes_up = rec.bytes_up_per_client.values().sum();
            if let Some(r) = self.remote.as_mut() {
                (rec.wire_down_per_client, rec.wire_up_per_client) = r.take_wire_bytes();
            }
            rec.seconds = t0.elapsed().as_secs_f64();
            log(&round_line(&rec));
            self.records.push(rec);
            write_all(&self.cfg.outdir, &self.records)?;
            if let Some(e) = self.failed_rounds_error() {
                self.write_manifest(Status::Failed, Some(e.to_string()))?;
                return Err(e);
            }
            self.write_manifest(Status::Running, None)?;
            let sf = self.cfg.federate.save_freq;
            if sf > 0 && (round.is_multiple_of(sf) || round == total) {
                self.save_checkpoint()?;
            }
            if stop_after == Some(round) {
                break;
            }
        }
        if self.server.round >= total {
            if let Some(r) = self.remote.as_mut() {
                r.finish();
            }
        }
        write_all(&self.cfg.outdir, &self.records)?;
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
        // Per-client adapters: the `local` baseline's own sets, or the global shared tensors
        // completed by each client's own (`federate.local_tensors`).
        if self.cfg.federate.baseline == Baseline::Local || !self.server.local_patterns.is_empty() {
            for (c, own) in &self.local {
                let mut p = self.server.global.clone();
                p.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
                self.adapter.set_tensors(&p)?;
                fedllm_peft::io::save(
                    &self.adapter,
                    &self.model,
                    &self.cfg.outdir.join(format!("adapter_client_{c}")),
                    &base,
                )?;
            }
        }
        if self.server.round >= total {
            self.write_manifest(Status::Finished, None)?;
        }
        Ok(Summary {
            table: summary_table(&self.records),
            records: self.records.clone(),
            best_round: self.best.map(|b| b.0),
            best_loss: self.best.map(|b| b.1),
            adapter_dir,
        })
    }
}

fn empty_record(round: usize) -> RoundRecord {
    RoundRecord {
        round,
        clients: vec![],
        failed: vec![],
        train_loss: None,
        client_train_loss: BTreeMap::new(),
        server_test_loss: None,
        client_val_loss: None,
        client_test_loss: None,
        bytes_down: 0,
        bytes_up: 0,
        bytes_down_per_client: BTreeMap::new(),
        bytes_up_per_client: BTreeMap::new(),
        seconds: 0.0,
        nan_skipped: 0,
        wire_down_per_client: BTreeMap::new(),
        wire_up_per_client: BTreeMap::new(),
        client_lr: BTreeMap::new(),
    }
}

fn round_line(r: &RoundRecord) -> String {
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let wire = if r.wire_up_per_client.is_empty() && r.wire_down_per_client.is_empty() {
        String::new()
    } else {
        format!(
            " (wire {:.2} down {:.2} up)",
            r.wire_down_per_client.values().sum::<usize>() as f64 / 1e6,
            r.wire_up_per_client.values().sum::<usize>() as f64 / 1e6
        )
    };
    format!(
        "round {:>3}: clients {:?} failed {:?} train {} | server test {} | client val {} | client test {} | {:.2} MB down {:.2} MB up{wire} | {:.1}s",
        r.round,
        r.clients,
        r.failed,
        f(r.train_loss),
        f(r.server_test_loss),
        f(r.client_val_loss),
        f(r.client_test_loss),
        r.bytes_down as f64 / 1e6,
        r.bytes_up as f64 / 1e6,
        r.seconds
    )
}
