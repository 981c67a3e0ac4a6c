//! The client state machine: it holds its tokenised data and answers fit/evaluate requests by
//! training or evaluating the shared adapter on the shared frozen model. How it trains depends
//! on the personalised method (`personal/`); what it keeps across rounds is its state.

use std::collections::{BTreeMap, BTreeSet};

use fedllm_data::Sample;
use fedllm_model::CausalLm;
use fedllm_peft::Adapter;
use fedllm_train::finetune::{eval_batches, eval_loss, train_loop, Budget, LoopOptions};
use fedllm_train::{StepStats, TrainConfig, Trainer};

use crate::config::{PersonalCfg, PersonalMethod};
use crate::error::{FlError, Result};
use crate::message::{ToClient, ToServer};
use crate::params::{kept_local, ParamSet};
use crate::personal;
use crate::strategy::{FitConfig, FitResult};

pub struct Client {
    pub id: usize,
    pub train: Vec<Sample>,
    pub splits: BTreeMap<String, Vec<Sample>>,
}

/// What every client shares in a standalone run: the frozen model and one adapter whose values
/// are set from the message before any work.
pub struct Shared<'a> {
    pub model: &'a CausalLm,
    pub adapter: &'a Adapter,
    pub train: &'a TrainConfig,
    pub budget: Budget,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub pad_id: u32,
    /// The adapter's initial values (what a client's own tensors start from).
    pub initial: &'a ParamSet,
    /// The personalised method and its settings.
    pub personal: &'a PersonalCfg,
}

/// The server's tensors completed by the client's own (or, before its first round, the initial
/// values): the complete set the client trains or evaluates.
fn with_own(params: ParamSet, state: &ParamSet, s: &Shared) -> ParamSet {
    complete(params, state, s.initial)
}

/// `params` completed by `state`'s tensors, then `initial`'s, to a full adapter set.
pub(crate) fn complete(params: ParamSet, state: &ParamSet, initial: &ParamSet) -> ParamSet {
    if params.len() == initial.len() {
        return params;
    }
    let mut full = params;
    for (k, t) in initial {
        if !full.contains_key(k) {
            full.insert(k.clone(), state.get(k).unwrap_or(t).clone());
        }
    }
    full
}

/// Deep copies (the adapter's vars are updated in place by the next client).
pub fn snapshot(a: &Adapter) -> Result<ParamSet> {
    a.tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?.copy()?)))
        .collect()
}

/// One local training run: where it starts, which tensors move, for how long.
pub(crate) struct Local<'c> {
    pub start: &'c ParamSet,
    pub config: &'c FitConfig,
    pub seed: u64,
    /// Only these tensors are updated (None: all).
    pub trainable: Option<BTreeSet<String>>,
    /// Instead of the round's budget (personal phases).
    pub budget: Option<Budget>,
    /// λ and the anchor of λ/2·‖w − anchor‖² (FedProx, Ditto's personal adapter).
    pub proximal: Option<(f64, ParamSet)>,
}

/// Trains from `l.start` on `samples`; returns the steps and the trained set.
pub(crate) fn train(
    s: &Shared,
    samples: &[Sample],
    l: Local,
) -> Result<(Vec<StepStats>, ParamSet)> {
    s.adapter.set_tensors(l.start)?;
    s.adapter.reseed(l.seed);
    let mut train = s.train.clone();
    if let Some(lr) = l.config.lr {
        train.lr = lr;
    }
    let mut trainer = Trainer::new(train)?;
    trainer.step = l.config.start_step;
    trainer.trainable = l.trainable;
    trainer.proximal = l.proximal;
    let budget = l.budget.unwrap_or(match (s.budget, l.config.local_steps) {
        (b, None) => b,
        (Budget::Steps(_), Some(n)) => Budget::Steps(n),
        (Budget::Epochs(_), Some(n)) => Budget::Epochs(n),
    });
    let o = LoopOptions {
        budget,
        batch_size: s.batch_size,
        pad_id: s.pad_id,
        seed: l.seed,
        group_by_length: false,
        metrics: None,
    };
    let stats = train_loop(s.model, s.adapter, &mut trainer, samples, &o, |_| {})?;
    Ok((stats, snapshot(s.adapter)?))
}

/// The round's metrics from its (global-model) steps.
fn fit_metrics(stats: &[StepStats], nan_skipped: usize) -> BTreeMap<String, f64> {
    let done: Vec<_> = stats.iter().filter(|x| !x.skipped).collect();
    let tokens: usize = done.iter().map(|x| x.target_tokens).sum();
    let loss = done
        .iter()
        .map(|x| x.loss * x.target_tokens as f64)
        .sum::<f64>()
        / tokens.max(1) as f64;
    let mut metrics = BTreeMap::from([
        ("train_loss".to_string(), loss),
        ("train_tokens".to_string(), tokens as f64),
        ("steps".to_string(), done.len() as f64),
        ("nan_skipped".to_string(), nan_skipped as f64),
    ]);
    // Where the round sat on the run's learning-rate schedule.
    if let (Some(first), Some(last)) = (stats.first(), stats.last()) {
        metrics.insert("lr_first".into(), first.lr);
        metrics.insert("lr_last".into(), last.lr);
    }
    metrics
}

impl Client {
    /// Answers one server message. `state` holds what this client keeps to itself: tensors the
    /// server does not send (`federate.local_tensors`, a personal head, LoRA B) fill in what
    /// `params` lacks; personal adapters live under `personal/` names. A fit updates it.
    pub fn handle(
        &self,
        msg: ToClient,
        s: &Shared,
        state: &mut ParamSet,
    ) -> Result<Option<ToServer>> {
        match msg {
            ToClient::Fit {
                round,
                params,
                config,
                seed,
            } => {
                let received: Vec<String> = params.keys().cloned().collect();
                let start = with_own(params, state, s);
                let frozen = personal::frozen(s.personal);
                let (stats, trained) = match s.personal.method {
                    PersonalMethod::Ditto => {
                        personal::ditto::fit(s, &self.train, &start, &config, seed, state)?
                    }
                    PersonalMethod::Fedrep => {
                        personal::fedrep::fit(s, &self.train, &start, &config, seed)?
                    }
                    PersonalMethod::Pfedme => {
                        personal::pfedme::fit(s, &self.train, &start, &config, seed, state)?
                    }
                    _ => {
                        let trainable = (!frozen.is_empty()).then(|| {
                            start
                                .keys()
                                .filter(|k| !kept_local(&frozen, k))
                                .cloned()
                                .collect()
                        });
                        let proximal =
                            (config.proximal_mu > 0.0).then(|| (config.proximal_mu, start.clone()));
                        let l = Local {
                            start: &start,
                            config: &config,
                            seed,
                            trainable,
                            budget: None,
                            proximal,
                        };
                        train(s, &self.train, l)?
                    }
                };
                let nan = stats.iter().filter(|x| x.skipped).count();
                let mut metrics = fit_metrics(&stats, nan);
                if config.report_val {
                    // Dropout (if any) stays on here; training has reseeded its own stream.
                    let split = ["val".to_string()];
                    let before = self.eval_splits(s, &start, &split, "")?;
                    let after = self.eval_splits(s, &trained, &split, "")?;
                    if let (Some(b), Some(a)) = (before.first(), after.first()) {
                        metrics.insert("val_before".into(), b.1);
                        metrics.insert("val_after".into(), a.1);
                    }
                }
                // What the server sent goes back; the rest stays here (frozen tensors are the
                // seeded initial values everywhere: nothing to keep).
                let mut sent = trained;
                if received.len() != sent.len() {
                    let own: Vec<String> = sent
                        .keys()
                        .filter(|k| received.binary_search(k).is_err())
                        .cloned()
                        .collect();
                    for name in own {
                        let t = sent.remove(&name).expect("listed above");
                        if !kept_local(&frozen, &name) {
                            state.insert(name, t);
                        }
                    }
                }
                if let Some(c) = config.dp_clip {
                    let (clipped, norm) = crate::dp::clip(sent, &start, c)?;
                    metrics.insert("dp_norm".into(), norm);
                    metrics.insert("dp_within".into(), f64::from(u8::from(norm <= c)));
                    let mut rng = fedllm_rng::Rng::new(seed ^ 0xD1FF_5EED);
                    sent = crate::dp::add_noise(clipped, config.dp_local_std, &mut rng)?;
                }
                let result = FitResult {
                    client: self.id,
                    params: sent,
                    num_samples: self.train.len(),
                    metrics,
                };
                Ok(Some(ToServer::FitRes { round, result }))
            }
            ToClient::Evaluate {
                round,
                params,
                splits,
            } => {
                // The parameters this client uses (personal ones where it has them), and, when
                // they differ, the global ones for comparison (none when nothing is shared, as
                // in the `local` baseline: there is no global model).
                let compare = !state.is_empty() && !params.is_empty();
                let global = compare.then(|| with_own(params.clone(), &ParamSet::new(), s));
                let mine = personal::own_params(with_own(params, state, s), state);
                let mut losses = self.eval_splits(s, &mine, &splits, "")?;
                if let Some(g) = global {
                    losses.extend(self.eval_splits(s, &g, &splits, "global_")?);
                }
                Ok(Some(ToServer::EvalRes {
                    round,
                    client: self.id,
                    losses,
                }))
            }
            ToClient::Finish => Ok(None),
            ToClient::SecAgg { .. } => Err(FlError::Protocol(
                "secure-aggregation stages are answered by the simulation, not a bare client"
                    .into(),
            )),
        }
    }

    /// (prefix + split, mean loss, tokens) for each split this client has data for.
    fn eval_splits(
        &self,
        s: &Shared,
        params: &ParamSet,
        splits: &[String],
        prefix: &str,
    ) -> Result<Vec<(String, f64, usize)>> {
        s.adapter.set_tensors(params)?;
        let mut out = Vec::new();
        for name in splits {
            if let Some(samples) = self.splits.get(name).filter(|x| !x.is_empty()) {
                let b = eval_batches(samples, s.eval_batch_size, s.pad_id, &s.model.device)?;
                let (l, n) = eval_loss(s.model, s.adapter, &b)?;
                out.push((format!("{prefix}{name}"), l, n));
            }
        }
        Ok(out)
    }
}
