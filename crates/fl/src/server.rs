//! The server state machine: who joined, which clients a round asked, what came back, and the
//! aggregation through the strategy when the round closes.

use std::collections::{BTreeMap, BTreeSet};

use fedllm_model::rng::Rng;

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
            results: BTreeMap::new(),
            failures: Vec::new(),
            evals: BTreeMap::new(),
            bytes_down: BTreeMap::new(),
            bytes_up: BTreeMap::new(),
        }
    }

    /// The part of the global parameters that travels: all but the clients' own tensors.
    pub fn shared(&self) -> ParamSet {
        if self.local_patterns.is_empty() {
            return self.global.clone();
        }
        self.global
            .iter()
            .filter(|(k, _)| !crate::params::kept_local(&self.local_patterns, k))
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
        self.results.clear();
        self.failures.clear();
        self.evals.clear();
        self.bytes_down.clear();
        self.bytes_up.clear();
        self.history.push(chosen.clone());
        let start_step = (self.round - 1) * self.steps_per_round;
        let shared = self.shared();
        Ok(chosen
            .into_iter()
            .map(|c| {
                *self.bytes_down.entry(c).or_default() += bytes(&shared);
                let seed = Rng::derive(&[self.seed, self.round as u64, c as u64]);
                let mut config = self.strategy.configure_fit(self.round, c);
                config.start_step = start_step;
                (
                    c,
                    ToClient::Fit {
                        round: self.round,
                        params: shared.clone(),
                        config,
                        seed,
                    },
                )
            })
            .collect())
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
                let shared = self.shared();
                if result.params.keys().ne(shared.keys()) {
                    return Err(FlError::Protocol(format!(
                        "client {c} sent tensors that are not the shared set"
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
        }
        Ok(())
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

    /// Ends the round keeping the global parameters (the `local` baseline).
    pub fn close_round_without_aggregation(&mut self) -> RoundOutcome {
        self.missing_to_failures();
        let results: Vec<FitResult> = self.results.values().cloned().collect();
        RoundOutcome {
            round: self.round,
            results,
            failures: self.failures.clone(),
            updated: false,
        }
    }

    /// Aggregates what arrived; clients that never answered count as failures.
    pub fn close_round(&mut self) -> Result<RoundOutcome> {
        self.missing_to_failures();
        let results: Vec<FitResult> = self.results.values().cloned().collect();
        // Strategies see (and return) only what travels; the clients' own tensors stay as
        // they were in the global set.
        let new =
            self.strategy
                .aggregate_fit(self.round, &self.shared(), &results, &self.failures)?;
        let updated = new.is_some();
        if let Some(g) = new {
            self.global.extend(g);
        }
        Ok(RoundOutcome {
            round: self.round,
            results,
            failures: self.failures.clone(),
            updated,
        })
    }
}
