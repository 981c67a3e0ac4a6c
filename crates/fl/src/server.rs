//! The server state machine: who joined, which clients a round asked, what came back, and the
//! aggregation through the strategy when the round closes.

use std::collections::{BTreeMap, BTreeSet};

use fedllm_rng::Rng;

use crate::error::{FlError, Result};
use crate::message::{ToClient, ToServer};
use crate::params::{bytes, ParamSet};
use crate::strategy::{Failure, FitResult, Strategy};

pub struct Server {
    pub strategy: Box<dyn Strategy>,
    pub global: ParamSet,
    /// The last round started (0 = none yet).
    pub round: usize,
    pub rng: Rng,
    pub seed: u64,
    pub clients_per_round: usize,
    /// Local optimizer steps per round (0 when a round's length depends on each client's data),
    /// so each round's fit instructions say where the run's schedule stands.
    pub steps_per_round: usize,
    /// `federate.local_tensors`: name patterns of tensors that never leave the clients. Only
    /// the others travel and are aggregated (by name).
    pub local_patterns: Vec<String>,
    pub joined: BTreeSet<usize>,
    /// Clients sampled in each round so far.
    pub history: Vec<Vec<usize>>,
    asked: BTreeSet<usize>,
    /// The tensor names each asked client was sent this round (and must send back).
    sent: BTreeMap<usize, Vec<String>>,
    results: BTreeMap<usize, FitResult>,
    failures: Vec<Failure>,
    pub evals: BTreeMap<usize, Vec<(String, f64, usize)>>,
    pub bytes_down: BTreeMap<usize, usize>,
    pub bytes_up: BTreeMap<usize, usize>,
}

/// What a closed round produced.
#[derive(Debug, Clone)]
pub struct RoundOutcome {
    pub round: usize,
    pub results: Vec<FitResult>,
    pub failures: Vec<Failure>,
    pub updated: bool,
}

impl Server {
    pub fn new(
        strategy: Box<dyn Strategy>,
        global: ParamSet,
        seed: u64,
        clients_per_round: usize,
    ) -> Self {
        Self {
            strategy,
            global,
            round: 0,
            rng: Rng::new(seed),
            seed,
            clients_per_round,
            steps_per_round: 0,
            local_patterns: Vec::new(),
            joined: BTreeSet::new(),
            history: Vec::new(),
            asked: BTreeSet::new(),
            sent: BTreeMap::new(),
            results: BTreeMap::new(),
            failures: Vec::new(),
            evals: BTreeMap::new(),
            bytes_down: BTreeMap::new(),
            bytes_up: BTreeMap::new(),
        }
    }

    /// The part of the global parameters that travels: all but the clients' own tensors.
    pub fn shared(&self) -> ParamSet {
        self.shared_except(&self.local_patterns)
    }

    /// The global parameters but those matching `patterns`.
    fn shared_except(&self, patterns: &[String]) -> ParamSet {
        self.global
            .iter()
            .filter(|(k, _)| !crate::params::kept_local(patterns, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Samples this round's clients (uniformly, without replacement, in id order) and returns
    /// their fit requests.
    pub fn start_round(&mut self) -> Result<Vec<(usize, ToClient)>> {
        if self.joined.is_empty() {
            return Err(FlError::Protocol("no client has joined".into()));
        }
        self.round += 1;
        let mut pool: Vec<usize> = self.joined.iter().copied().collect();
        let k = self.clients_per_round.min(pool.len());
        fedllm_data::batch::shuffle(&mut pool, &mut self.rng);
        let mut chosen: Vec<usize> = pool[..k].to_vec();
        chosen.sort_unstable();
        self.asked = chosen.iter().copied().collect();
        self.sent.clear();
        self.results.clear();
        self.failures.clear();
        self.evals.clear();
        self.bytes_down.clear();
        self.bytes_up.clear();
        self.history.push(chosen.clone());
        let start_step = (self.round - 1) * self.steps_per_round;
        let run_shared = self.shared();
        let mut out = Vec::with_capacity(chosen.len());
        for c in chosen {
            let seed = Rng::derive(&[self.seed, self.round as u64, c as u64]);
            let mut config = self.strategy.configure_fit(self.round, c);
            config.start_step = start_step;
            let params = match &config.local_tensors {
                None => run_shared.clone(),
                Some(p) => self.shared_except(p),
            };
            *self.bytes_down.entry(c).or_default() += bytes(&params);
            self.sent.insert(c, params.keys().cloned().collect());
            let round = self.round;
            out.push((
                c,
                ToClient::Fit {
                    round,
                    params,
                    config,
                    seed,
                },
            ));
        }
        Ok(out)
    }

    pub fn evaluate_requests(
        &mut self,
        clients: &[usize],
        splits: &[&str],
    ) -> Vec<(usize, ToClient)> {
        let shared = self.shared();
        clients
            .iter()
            .map(|&c| {
                *self.bytes_down.entry(c).or_default() += bytes(&shared);
                let splits = splits.iter().map(|s| s.to_string()).collect();
                (
                    c,
                    ToClient::Evaluate {
                        round: self.round,
                        params: shared.clone(),
                        splits,
                    },
                )
            })
            .collect()
    }

    pub fn on_message(&mut self, msg: ToServer) -> Result<()> {
        match msg {
            ToServer::Join { client } => {
                self.joined.insert(client);
            }
            ToServer::FitRes { round, result } => {
                let c = result.client;
                if round != self.round || !self.asked.contains(&c) {
                    // Late, stray or from another round: logged by the caller, never aggregated.
                    return Err(FlError::Protocol(format!(
                        "unexpected update from client {c} for round {round}"
                    )));
                }
                if self.results.contains_key(&c) {
                    return Ok(()); // a retried upload
                }
                if result.params.keys().ne(self.sent[&c].iter()) {
                    return Err(FlError::Protocol(format!(
                        "client {c} sent tensors that are not the set it was sent"
                    )));
                }
                for (k, t) in &result.params {
                    if t.dims() != self.global[k].dims() {
                        return Err(FlError::Protocol(format!(
                            "client {c}: tensor `{k}` has shape {:?}",
                            t.dims()
                        )));
                    }
                }
                *self.bytes_up.entry(c).or_default() += bytes(&result.params);
                self.results.insert(c, result);
            }
            ToServer::EvalRes {
                round,
                client,
                losses,
            } => {
                if round == self.round {
                    self.evals.insert(client, losses);
                }
            }
            ToServer::Failed {
                round,
                client,
                reason,
            } => {
                if round == self.round && self.asked.contains(&client) {
                    self.failures.push(Failure { client, reason });
                }
            }
            ToServer::SecAgg { client, .. } => {
                return Err(FlError::Protocol(format!(
                    "client {client}: a secure-aggregation reply outside its stage"
                )))
            }
        }
        Ok(())
    }

    /// Secure aggregation: a survivor's masked upload, taken apart by the round driver. Its
    /// metrics are kept for the record; its tensors are not the server's to see.
    pub fn on_masked(&mut self, round: usize, mut result: FitResult, wire_bytes: usize) {
        let c = result.client;
        if round == self.round && self.asked.contains(&c) {
            result.params.clear();
            *self.bytes_up.entry(c).or_default() += wire_bytes;
            self.results.insert(c, result);
        }
    }

    /// Secure aggregation: closes the round with the survivors' weighted mean (computed from
    /// their masked sum), through the strategy as one result of weight 1; None = the round was
    /// abandoned, its survivors count as failed for `why` and the global set stays.
    pub fn close_secure_round(
        &mut self,
        mean: std::result::Result<ParamSet, String>,
    ) -> Result<RoundOutcome> {
        self.missing_to_failures();
        let mut updated = false;
        match mean {
            Ok(mean) => {
                let global: ParamSet = mean
                    .keys()
                    .map(|k| (k.clone(), self.global[k].clone()))
                    .collect();
                let one = FitResult {
                    client: usize::MAX,
                    params: mean,
                    num_samples: 1,
                    metrics: BTreeMap::new(),
                };
                if let Some(g) =
                    self.strategy
                        .aggregate_fit(self.round, &global, &[one], &self.failures)?
                {
                    updated = true;
                    self.global.extend(g);
                }
            }
            Err(why) => {
                for c in std::mem::take(&mut self.results).into_keys() {
                    self.failures.push(Failure {
                        client: c,
                        reason: format!("secure aggregation abandoned: {why}"),
                    });
                }
            }
        }
        Ok(RoundOutcome {
            round: self.round,
            results: self.results.values().cloned().collect(),
            failures: self.failures.clone(),
            updated,
        })
    }

    /// Every asked client answered (or failed).
    pub fn round_complete(&self) -> bool {
        self.asked
            .iter()
            .all(|c| self.results.contains_key(c) || self.failures.iter().any(|f| f.client == *c))
    }

    fn missing_to_failures(&mut self) {
        for c in &self.asked {
            if !self.results.contains_key(c) && !self.failures.iter().any(|f| f.client == *c) {
                self.failures.push(Failure {
                    client: *c,
                    reason: "no answer".into(),
                });
            }
        }
    }

    /// Aggregates what arrived, by name; clients that never answered count as failures.
    /// Strategies see (and return) only what travelled; the clients' own tensors stay as they
    /// were in the global set. Tensors sent by different sets of clients (per-client
    /// instructions) are aggregated group by group, each over the clients that sent it.
    pub fn close_round(&mut self) -> Result<RoundOutcome> {
        self.missing_to_failures();
        let results: Vec<FitResult> = self.results.values().cloned().collect();
        let mut updated = false;
        for (names, senders) in groups(&results) {
            let global: ParamSet = names
                .iter()
                .map(|k| (k.clone(), self.global[k].clone()))
                .collect();
            let part: Vec<FitResult> = senders
                .iter()
                .map(|&i| FitResult {
                    params: names
                        .iter()
                        .map(|k| (k.clone(), results[i].params[k].clone()))
                        .collect(),
                    ..results[i].clone()
                })
                .collect();
            let new = self
                .strategy
                .aggregate_fit(self.round, &global, &part, &self.failures)?;
            if let Some(g) = new {
                updated = true;
                self.global.extend(g);
            }
        }
        Ok(RoundOutcome {
            round: self.round,
            results,
            failures: self.failures.clone(),
            updated,
        })
    }
}

/// The names that travelled, grouped by the clients (indices into `results`) that sent them,
/// in name order of each group's first tensor. Usually one group: every client sent the same
/// set. Nothing travelled (every tensor kept local): no group, nothing to aggregate.
fn groups(results: &[FitResult]) -> Vec<(Vec<String>, Vec<usize>)> {
    let mut by_senders: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
    let names: BTreeSet<&String> = results.iter().flat_map(|r| r.params.keys()).collect();
    for name in names {
        let senders: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].params.contains_key(name))
            .collect();
        by_senders.entry(senders).or_default().push(name.clone());
    }
    let mut out: Vec<(Vec<String>, Vec<usize>)> =
        by_senders.into_iter().map(|(s, n)| (n, s)).collect();
    out.sort_by(|a, b| a.0[0].cmp(&b.0[0]));
    out
}
