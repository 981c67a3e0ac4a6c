//! The round loop: sample, instruct, collect (in process or through a `Remote`), aggregate,
//! evaluate, record, checkpoint.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Simulation, Summary};
use crate::error::{FlError, Result};
use crate::manifest::Status;
use crate::message::{ToClient, ToServer};
use crate::metrics::{summary_table, write_all, RoundRecord};
use crate::server::RoundOutcome;

impl Simulation {
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

    /// Every request answered by the in-process clients, each with its own state.
    pub(super) fn answer_here(
        &mut self,
        round: usize,
        reqs: Vec<(usize, ToClient)>,
        bar: &fedllm_train::Progress,
    ) -> Result<Vec<ToServer>> {
        let mut out = Vec::with_capacity(reqs.len());
        for (c, msg) in reqs {
            let mut state = self.local.take(c)?;
            match self.answer_as(c, msg, &mut state) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => {}
                Err(e) => out.push(ToServer::Failed {
                    round,
                    client: c,
                    reason: e.to_string(),
                }),
            }
            self.local.put(c, state)?;
            bar.inc(1);
        }
        Ok(out)
    }

    /// One round's fit: requests out, answers in, aggregation.
    fn fit_round(&mut self, progress: bool, log: &mut impl FnMut(&str)) -> Result<RoundOutcome> {
        if self.cfg.secagg.enabled {
            return self.secure_fit_round(log);
        }
        let reqs = self.server.start_round()?;
        let round = self.server.round;
        let total = self.cfg.federate.total_round_num;
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
            None => self.answer_here(round, reqs, &bar)?,
        };
        for msg in replies {
            if let Err(e) = self.server.on_message(msg) {
                log(&format!("round {round}: ignored message: {e}"));
            }
        }
        bar.finish();
        self.server.close_round()
    }

    /// The round's record from its outcome: who trained, who failed, the token-weighted loss.
    fn record(&mut self, o: &RoundOutcome, log: &mut impl FnMut(&str)) -> RoundRecord {
        let round = o.round;
        let mut rec = empty_record(round);
        rec.clients = self.server.history.last().cloned().unwrap_or_default();
        rec.failed = o.failures.iter().map(|f| f.client).collect();
        for f in &o.failures {
            log(&format!(
                "round {round}: client {} failed: {}",
                f.client, f.reason
            ));
        }
        self.last_failures = o
            .failures
            .iter()
            .map(|f| format!("client {}: {}", f.client, f.reason))
            .collect();
        let mut tok = 0f64;
        let mut sum = 0f64;
        for r in &o.results {
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
        rec.strategy = self.server.strategy.report();
        rec
    }

    /// Bytes (payload and, distributed, on the wire) and time, then the line and the files.
    fn finish_record(&mut self, mut rec: RoundRecord, t0: Instant, log: &mut impl FnMut(&str)) {
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
    }

    /// Runs the remaining rounds. `stop_after` ends early after that round (as a crash would;
    /// tests use it), `log` receives one line per round.
    pub fn run(
        &mut self,
        progress: bool,
        stop_after: Option<usize>,
        mut log: impl FnMut(&str),
    ) -> Result<Summary> {
        for n in std::mem::take(&mut self.notes) {
            log(&n);
        }
        if self.cfg.offsite.enabled && self.cfg.offsite.stop_after_align {
            let p = self.cfg.outdir.join("emulator.safetensors");
            log(&format!(
                "offsite: emulator ready ({}); stopping before the rounds (offsite.stop_after_align)",
                p.display()
            ));
            return Ok(Summary {
                table: String::new(),
                records: vec![],
                best_round: None,
                best_loss: None,
                adapter_dir: p,
            });
        }
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
            // Round 0 sends only evaluation requests: their bytes are all it moved.
            self.finish_record(rec, t0, &mut log);
        }
        let mut budget_spent = false;
        while self.server.round < total {
            if let Some(note) = self.privacy_budget_stop() {
                log(&note);
                budget_spent = true;
                break;
            }
            let t0 = Instant::now();
            let outcome = self.fit_round(progress, &mut log)?;
            let round = outcome.round;
            let mut rec = self.record(&outcome, &mut log);
            if freq > 0 && (round.is_multiple_of(freq) || round == total) {
                self.evaluate(&mut rec)?;
            }
            self.finish_record(rec, t0, &mut log);
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
        let done = self.server.round >= total || budget_spent;
        if done {
            if let Some(r) = self.remote.as_mut() {
                r.finish();
            }
        }
        write_all(&self.cfg.outdir, &self.records)?;
        let adapter_dir = self.save_adapters()?;
        if done {
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

impl Simulation {
    /// `dp.max_epsilon`: the line that ends the run when the next round would spend past it.
    fn privacy_budget_stop(&self) -> Option<String> {
        let max = self.cfg.dp.max_epsilon?;
        let next = self.server.round + 1;
        let eps = crate::dp::epsilon_of(
            &self.cfg.dp,
            self.cfg.federate.client_num,
            self.server.clients_per_round,
            next,
        );
        (eps > max).then(|| {
            format!(
                "dp: stopping before round {next}: ε would reach {eps:.4} > dp.max_epsilon {max} (δ = {}); the adapter of round {} is final",
                self.cfg.dp.delta, self.server.round
            )
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
        client_losses: BTreeMap::new(),
        client_global_test_loss: None,
        client_test_mean: None,
        client_test_worst: None,
        client_test_best: None,
        strategy: BTreeMap::new(),
        server_accuracy: None,
        plugin_test_loss: None,
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
    let mut acc = r
        .server_accuracy
        .map(|a| format!(" | accuracy {a:.4}"))
        .unwrap_or_default();
    if let Some(p) = r.plugin_test_loss {
        acc += &format!(" | plug-in test {p:.4}");
    }
    format!(
        "round {:>3}: clients {:?} failed {:?} train {} | server test {} | client val {} | client test {}{acc} | {:.2} MB down {:.2} MB up{wire} | {:.1}s",
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
