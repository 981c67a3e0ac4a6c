//! From a validated config to a ready engine: the federated data split, the model, the
//! adapter, the clients (their tokenised data) and the server with its strategy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedllm_data::federated::{build, preset, Federated, Source, SplitConfig};
use fedllm_data::record::Record;
use fedllm_data::split::Splitter;
use fedllm_data::{tokenize_all, Sample};
use fedllm_eval::gsm8k::{self, Question};
use fedllm_model::{CausalLm, Tokenizer};
use fedllm_peft::Adapter;

use super::Simulation;
use crate::assemble::{self, adapter_config, format, splitter, template, train_config};
use crate::checkpoint;
use crate::client::{snapshot, Client};
use crate::client_state::ClientStates;
use crate::config::{
    AccuracySplit, AccuracyTask, Baseline, LocalBudget, PersonalMethod, RunConfig,
};
use crate::error::{FlError, Result};
use crate::manifest;
use crate::message::ToServer;
use crate::offsite;
use crate::params::kept_local;
use crate::params::ParamSet;
use crate::personal;
use crate::remote::Role;
use crate::server::Server;
use crate::strategy;

impl Simulation {
    /// `fresh`: a new run, which may not reuse another run's folder (see `manifest::claim`).
    /// `base`: the model and tokenizer already loaded for `cfg.model` (shared by runs in one
    /// process, e.g. tuning trials; the run works on its own cheap copy: tensors are shared,
    /// adapters attach to the copy only).
    pub(super) fn setup(
        mut cfg: RunConfig,
        role: Role,
        fresh: bool,
        base: Option<(&CausalLm, &Tokenizer)>,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut notes = Vec::new();
        if let (crate::config::DpMode::Central | crate::config::DpMode::Local, Some(t)) =
            (cfg.dp.mode, cfg.dp.target_epsilon)
        {
            let (n, m, r) = (
                cfg.federate.client_num,
                cfg.clients_per_round(),
                cfg.federate.total_round_num,
            );
            let z = crate::dp::noise_for_target(&cfg.dp, n, m, r, t).ok_or_else(|| {
                FlError::Config(format!(
                    "dp.target_epsilon {t}: no noise multiplier up to 10^4 reaches it in {r} rounds"
                ))
            })?;
            cfg.dp.noise_multiplier = z;
            notes.push(format!(
                "dp: noise multiplier {z:.4} for ε = {t} after {r} rounds ({m} of {n} clients per round, δ = {})",
                cfg.dp.delta
            ));
        }
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
        let (source, fed) = split_data(&cfg)?;
        let (mut model, tokenizer) = match base {
            Some((m, t)) => (m.clone(), t.clone()),
            None => load_model(&cfg)?,
        };
        let context = model.config.context_length();
        if cfg.data.tok_len > context {
            return Err(FlError::Config(format!(
                "data.tok_len = {} exceeds the model's context length ({context})",
                cfg.data.tok_len
            )));
        }
        let (clients, server_test) = client_data(&cfg, role, &source, &fed, &tokenizer)?;
        let accuracy_set = match role {
            Role::Client(_) => Vec::new(),
            _ => accuracy_questions(&cfg, &fed)?,
        };
        let pad_id = tokenizer
            .pad_token_id
            .or(tokenizer.eos_token_ids.first().copied())
            .unwrap_or(0);
        let mut acfg = adapter_config(&cfg.adapter, &model);
        let mut plugin = None;
        if cfg.offsite.enabled {
            let o = offsite_setup(&cfg, role, fresh, model, &tokenizer, acfg, pad_id)?;
            (model, acfg, plugin) = (o.model, o.adapter, o.plugin);
            notes.extend(o.notes);
        }
        let adapter = Adapter::init(&model, acfg, cfg.federate.seed, Some(&tokenizer))?;
        adapter.attach(&mut model, true)?;
        let initial = snapshot(&adapter)?;
        let mut server = build_server(&cfg, &initial)?;
        let mut local = ClientStates::new(
            cfg.outdir.join("client_state"),
            cfg.federate.client_state_memory_mb << 20,
        );
        if let Role::Client(i) = role {
            if let Some(st) = checkpoint::load_client_state(&cfg.outdir)? {
                local.put(i, st)?;
            }
        }
        for c in &clients {
            server.on_message(ToServer::Join { client: c.id })?;
        }
        write_run_files(&cfg, &fed)?;
        Ok(Self {
            train: train_config(
                &cfg.train,
                server.steps_per_round * cfg.federate.total_round_num,
            ),
            cfg,
            model,
            adapter,
            tokenizer,
            server,
            clients,
            server_test,
            accuracy_set,
            plugin,
            notes,
            records: Vec::new(),
            local,
            best: None,
            remote: None,
            role,
            initial,
            pad_id,
            last_failures: Vec::new(),
            last_shared: ParamSet::new(),
            secagg: Default::default(),
        })
    }
}

/// Offsite tuning: the server (or a standalone run) builds the emulator from the full model,
/// writes the file clients load (distributed, or compressed) and keeps the full model for
/// plug-in evaluation; a client trains on the emulator it was given as `model.path`.
fn offsite_setup(
    cfg: &RunConfig,
    role: Role,
    fresh: bool,
    model: CausalLm,
    tokenizer: &Tokenizer,
    acfg: fedllm_peft::AdapterConfig,
    pad_id: u32,
) -> Result<OffsiteSetup> {
    let o = &cfg.offsite;
    let mut notes = Vec::new();
    if let Role::Client(_) = role {
        let layout = offsite::Layout::new(model.config.num_layers(), o)?;
        if model.layer_ids() != layout.emulator_layers() {
            return Err(FlError::Config(format!(
                "offsite: a client trains on the emulator its server wrote (<server outdir>/emulator.gguf or emulator/), given as model.path; {} holds layers {:?}, the emulator {:?}",
                cfg.model.path.display(),
                model.layer_ids(),
                layout.emulator_layers()
            )));
        }
        return Ok(OffsiteSetup {
            adapter: layout.adapter_config(acfg, o)?,
            model,
            plugin: None,
            notes,
        });
    }
    let p = offsite::prepare(cfg, !fresh, model, tokenizer, acfg, pad_id)?;
    let acfg = p.adapter;
    let mut model = p.emulator;
    let mut file = serde_json::json!({
        "edges": p.layout.edges, "middle": p.layout.middle, "kept": p.layout.kept, "align": p.align,
    });
    if role == Role::Server || o.emulator_quant != crate::config::EmulatorQuant::None {
        let (path, bytes) = offsite::handoff::export(
            &model,
            &cfg.model.path,
            &p.layout,
            o.emulator_quant,
            &cfg.outdir,
        )?;
        notes.push(format!(
            "offsite: emulator written to {} ({:.2} MB, middle {}): clients load it as model.path",
            path.display(),
            bytes as f64 / 1e6,
            o.emulator_quant
        ));
        file["emulator"] = path.display().to_string().into();
        file["emulator_bytes"] = bytes.into();
        if role == Role::Standalone {
            // Clients train on what they would receive.
            let mut opts = assemble::load_options(&cfg.model);
            opts.quant = fedllm_model::QuantMode::Keep;
            model = CausalLm::load(&path, opts)?.model;
        }
    }
    let j = cfg.outdir.join("offsite.json");
    std::fs::create_dir_all(&cfg.outdir).map_err(|e| FlError::File {
        path: cfg.outdir.clone(),
        msg: e.to_string(),
    })?;
    std::fs::write(&j, serde_json::to_string_pretty(&file).expect("json")).map_err(|e| {
        FlError::File {
            path: j,
            msg: e.to_string(),
        }
    })?;
    Ok(OffsiteSetup {
        model,
        adapter: acfg,
        plugin: Some(p.plugin),
        notes,
    })
}

/// What offsite tuning changes of a run: the model trained on (the emulator), the adapter
/// (the edge layers), the server's plug-in model, and lines for the run's log.
struct OffsiteSetup {
    model: CausalLm,
    adapter: fedllm_peft::AdapterConfig,
    plugin: Option<offsite::Plugin>,
    notes: Vec<String>,
}

/// The model and tokenizer `cfg.model` names.
pub fn load_model(cfg: &RunConfig) -> Result<(CausalLm, Tokenizer)> {
    let loaded = CausalLm::load(&cfg.model.path, assemble::load_options(&cfg.model))?;
    let tokenizer = loaded
        .tokenizer
        .ok_or_else(|| FlError::Config("the model has no tokenizer".into()))?;
    Ok((loaded.model, tokenizer))
}

/// The data source (a preset or a file) and its split across the clients.
fn split_data(cfg: &RunConfig) -> Result<(Source, Federated)> {
    let d = &cfg.data;
    let (source, mut split) = match preset(&d.source) {
        Some(p) => (
            p.source(&cfg.data_root())?,
            p.split_config(cfg.federate.seed),
        ),
        None => {
            let src = Source {
                train: PathBuf::from(&d.source),
                test: d.test_source.clone(),
                format: Some(format(d.format)),
                derive_category: false,
            };
            let fractions = if d.test_source.is_some() {
                [1.0, 0.0, 0.0]
            } else {
                [0.9, 0.05, 0.05]
            };
            let split = SplitConfig {
                splitter: Splitter::Iid,
                clients: 1,
                seed: cfg.federate.seed,
                fractions,
            };
            (src, split)
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
    Ok((source, fed))
}

/// Each client's tokenised data (a distributed server holds none, a client only its own; the
/// `global` baseline pools everyone's into one client) and the server's test set.
fn client_data(
    cfg: &RunConfig,
    role: Role,
    source: &Source,
    fed: &Federated,
    tokenizer: &Tokenizer,
) -> Result<(Vec<Client>, Vec<Sample>)> {
    let d = &cfg.data;
    let template = template(d.template);
    // Samples whose prompt alone fills tok_len are dropped; counted to explain an empty client.
    let dropped = std::cell::Cell::new(0usize);
    let tok = |recs: Vec<&Record>, cap: Option<usize>| -> Result<Vec<Sample>> {
        let owned: Vec<Record> = recs
            .into_iter()
            .take(cap.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        let (s, rep) = tokenize_all(&owned, template, tokenizer, d.tok_len)?;
        dropped.set(dropped.get() + rep.dropped_no_target);
        Ok(s)
    };
    let eval_cap = cfg.eval.max_samples;
    let mut clients = Vec::with_capacity(cfg.federate.client_num);
    for c in 0..cfg.federate.client_num {
        let own = match role {
            Role::Server => false,
            Role::Client(i) if i != c => continue,
            _ => true,
        };
        let mut client = Client {
            id: c,
            train: vec![],
            splits: BTreeMap::new(),
        };
        if own {
            client.splits = BTreeMap::from([
                ("val".to_string(), tok(fed.client("val", c), eval_cap)?),
                ("test".to_string(), tok(fed.client("test", c), eval_cap)?),
            ]);
            client.train = tok(fed.client("train", c), d.max_train_per_client)?;
        }
        clients.push(client);
    }
    if cfg.federate.baseline == Baseline::Global {
        clients = vec![pooled(clients)];
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
    Ok((clients, server_test))
}

/// `eval.accuracy`'s fixed question subset: the first `eval.accuracy_samples` records of the
/// chosen split (val: the clients' parts in client order), each with its reference answer.
fn accuracy_questions(cfg: &RunConfig, fed: &Federated) -> Result<Vec<Question>> {
    if cfg.eval.accuracy == AccuracyTask::None {
        return Ok(Vec::new());
    }
    let recs: Vec<&Record> = match cfg.eval.accuracy_split {
        AccuracySplit::Test => fed.server_test(),
        AccuracySplit::Val => (0..cfg.federate.client_num)
            .flat_map(|c| fed.client("val", c))
            .collect(),
    };
    let qs: Vec<Question> = recs
        .into_iter()
        .take(cfg.eval.accuracy_samples)
        .map(|r| {
            // The GSM8K loader turned `#### N` into `The answer is N`; the reference is N.
            let answer = r.output.replace("The answer is", "####");
            match gsm8k::reference(&answer) {
                Some(_) => Ok(Question {
                    question: r.instruction.clone(),
                    answer,
                }),
                None => Err(FlError::Config(format!(
                    "eval.accuracy gsm8k: a {} record has no final answer (`#### N`) in its output: {:?}; is data.format gsm8k?",
                    cfg.eval.accuracy_split,
                    r.output.chars().take(80).collect::<String>()
                ))),
            }
        })
        .collect::<Result<_>>()?;
    if qs.is_empty() {
        return Err(FlError::Config(format!(
            "eval.accuracy gsm8k: the {} split holds no records (set data fractions or use eval.accuracy_split test)",
            cfg.eval.accuracy_split
        )));
    }
    Ok(qs)
}

/// One client holding everyone's data (the `global` baseline).
fn pooled(clients: Vec<Client>) -> Client {
    let mut all = Client {
        id: 0,
        train: vec![],
        splits: BTreeMap::new(),
    };
    for c in clients {
        all.train.extend(c.train);
        for (k, v) in c.splits {
            all.splits.entry(k).or_default().extend(v);
        }
    }
    all
}

/// The server: the strategy, the sampling, the run's schedule and what stays on the clients.
fn build_server(cfg: &RunConfig, initial: &ParamSet) -> Result<Server> {
    let per_round = if cfg.federate.baseline == Baseline::Global {
        1
    } else {
        cfg.clients_per_round()
    };
    let strat: Box<dyn strategy::Strategy> = match cfg.personal.method {
        PersonalMethod::Pfedme => Box::new(strategy::pfedme::PFedMe {
            beta: cfg.personal.beta,
        }),
        _ => strategy::build(
            &cfg.federate.strategy,
            &cfg.federate.strategy_params,
            cfg.federate.seed,
        ),
    };
    let strat: Box<dyn strategy::Strategy> = if cfg.dp.mode == crate::config::DpMode::None {
        strat
    } else {
        Box::new(strategy::dp::Dp::new(
            strat,
            cfg.dp.clone(),
            cfg.federate.seed,
            cfg.federate.client_num,
            per_round,
        ))
    };
    let mut server = Server::new(strat, initial.clone(), cfg.federate.seed, per_round);
    server.steps_per_round = match cfg.train.batch_or_epoch {
        LocalBudget::Batch => cfg.train.local_update_steps,
        LocalBudget::Epoch => 0,
    };
    let patterns = &cfg.federate.local_tensors;
    server.local_patterns = match cfg.federate.baseline {
        // No sharing at all: every tensor stays on its client, so nothing travels.
        Baseline::Local => vec!["*".to_string()],
        // What the personalised method keeps on the clients (or freezes everywhere) travels
        // no more than `federate.local_tensors` does.
        _ => [patterns.clone(), personal::kept(&cfg.personal)].concat(),
    };
    let kept = personal::kept(&cfg.personal);
    if !kept.is_empty() && !initial.keys().any(|k| kept_local(&kept, k)) {
        return Err(FlError::Config(format!(
            "personal.method `{}` keeps {kept:?} on the clients, which matches no adapter tensor (names look like {})",
            cfg.personal.method,
            initial.keys().next().map(String::as_str).unwrap_or("-")
        )));
    }
    if !patterns.is_empty() {
        let shared = initial.keys().filter(|k| !kept_local(patterns, k)).count();
        if shared == 0 {
            return Err(FlError::Config(format!(
                "federate.local_tensors {patterns:?} keeps every adapter tensor on the clients (for no sharing at all use federate.baseline=local)"
            )));
        }
        if shared == initial.len() {
            return Err(FlError::Config(format!(
                "federate.local_tensors {patterns:?} matches no adapter tensor (names look like {})",
                initial.keys().next().map(String::as_str).unwrap_or("-")
            )));
        }
    }
    Ok(server)
}

/// The resolved config and the data manifest, next to the run's results.
fn write_run_files(cfg: &RunConfig, fed: &Federated) -> Result<()> {
    let io = |path: PathBuf, e: std::io::Error| FlError::File {
        path,
        msg: e.to_string(),
    };
    std::fs::create_dir_all(&cfg.outdir).map_err(|e| io(cfg.outdir.clone(), e))?;
    let cp = cfg.outdir.join("config.yaml");
    std::fs::write(&cp, cfg.to_yaml()).map_err(|e| io(cp.clone(), e))?;
    let mf = cfg.outdir.join("data_manifest.json");
    std::fs::write(&mf, serde_json::to_string(&fed.manifest).expect("json"))
        .map_err(|e| io(mf.clone(), e))
}
