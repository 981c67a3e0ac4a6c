//! The client state machine: it holds its tokenised data and answers fit/evaluate requests by
//! training or evaluating the shared adapter on the shared frozen model.

use std::collections::BTreeMap;

use fedllm_data::Sample;
use fedllm_model::CausalLm;
use fedllm_peft::Adapter;
use fedllm_train::finetune::{eval_batches, eval_loss, train_loop, Budget, LoopOptions};
use fedllm_train::{TrainConfig, Trainer};

use crate::error::Result;
use crate::message::{ToClient, ToServer};
use crate::params::ParamSet;
use crate::strategy::FitResult;

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
}

/// Sets the adapter to the server's tensors, completed by the client's own (or, before its first
/// round, the initial values), and returns the complete set.
fn with_own(params: ParamSet, state: &ParamSet, s: &Shared) -> Result<ParamSet> {
    let full = if params.len() == s.initial.len() {
        params
    } else {
        let mut full = params;
        for (k, t) in s.initial {
            if !full.contains_key(k) {
                full.insert(k.clone(), state.get(k).unwrap_or(t).clone());
            }
        }
        full
    };
    s.adapter.set_tensors(&full)?;
    Ok(full)
}

/// Deep copies (the adapter's vars are updated in place by the next client).
pub fn snapshot(a: &Adapter) -> Result<ParamSet> {
    a.tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&candle_core::Device::Cpu)?.copy()?)))
        .collect()
}

impl Client {
    /// Answers one server message. `state` holds the tensors this client keeps to itself (those
    /// the server does not send: `federate.local_tensors`); it fills in what `params` lacks,
    /// and a fit updates it.
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
                let params = with_own(params, state, s)?;
                s.adapter.reseed(seed);
                let mut train = s.train.clone();
                if let Some(lr) = config.lr {
                    train.lr = lr;
                }
                let mut trainer = Trainer::new(train)?;
                trainer.step = config.start_step;
                if config.proximal_mu > 0.0 {
                    trainer.proximal = Some((config.proximal_mu, params.clone()));
                }
                let o = LoopOptions {
                    budget: match (s.budget, config.local_steps) {
                        (b, None) => b,
                        (Budget::Steps(_), Some(n)) => Budget::Steps(n),
                        (Budget::Epochs(_), Some(n)) => Budget::Epochs(n),
                    },
                    batch_size: s.batch_size,
                    pad_id: s.pad_id,
                    seed,
                    group_by_length: false,
                    metrics: None,
                };
                let stats = train_loop(s.model, s.adapter, &mut trainer, &self.train, &o, |_| {})?;
                let done: Vec<_> = stats.iter().filter(|x| !x.skipped).collect();
                let tokens: usize = done.iter().map(|x| x.target_tokens).sum();
                let loss = done
                    .iter()
                    .map(|x| x.loss * x.target_tokens as f64)
                    .sum::<f64>()
                    / tokens.max(1) as f64;
                let metrics = BTreeMap::from([
                    ("train_loss".to_string(), loss),
                    ("train_tokens".to_string(), tokens as f64),
                    ("steps".to_string(), done.len() as f64),
                    ("nan_skipped".to_string(), trainer.nan_skipped as f64),
                ]);
                // Where the round sat on the run's learning-rate schedule.
                let mut metrics = metrics;
                if let (Some(first), Some(last)) = (stats.first(), stats.last()) {
                    metrics.insert("lr_first".into(), first.lr);
                    metrics.insert("lr_last".into(), last.lr);
                }
                // What the server sent goes back; the rest stays here.
                let mut sent = snapshot(s.adapter)?;
                if received.len() != sent.len() {
                    let own: Vec<String> = sent
                        .keys()
                        .filter(|k| received.binary_search(k).is_err())
                        .cloned()
                        .collect();
                    for name in own {
                        let t = sent.remove(&name).expect("listed above");
                        state.insert(name, t);
                    }
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
                with_own(params, state, s)?;
                let mut losses = Vec::new();
                for name in splits {
                    if let Some(samples) = self.splits.get(&name).filter(|x| !x.is_empty()) {
                        let b =
                            eval_batches(samples, s.eval_batch_size, s.pad_id, &s.model.device)?;
                        let (l, n) = eval_loss(s.model, s.adapter, &b)?;
                        losses.push((name, l, n));
                    }
                }
                Ok(Some(ToServer::EvalRes {
                    round,
                    client: self.id,
                    losses,
                }))
            }
            ToClient::Finish => Ok(None),
        }
    }
}
