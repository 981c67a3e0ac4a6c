//! Evaluation after a round: the server's own test set (through the strategy's `evaluate`) and
//! every client's val/test splits with the parameters it would use (global shared tensors
//! completed by its own), aggregated by the strategy.

use fedllm_train::finetune::{eval_batches, eval_loss};

use super::Simulation;
use crate::error::Result;
use crate::message::{ToClient, ToServer};
use crate::metrics::RoundRecord;
use crate::params::bytes;
use crate::strategy::EvalResult;

/// Up to this many clients, every client is evaluated at each evaluation round.
const MAX_EVAL_ALL_CLIENTS: usize = 32;

impl Simulation {
    /// The server test batches, when there is a global model to test (None: no server test
    /// set, or nothing is shared, as in the `local` baseline).
    fn server_batches(&self) -> Result<Option<Vec<fedllm_model::Batch>>> {
        if self.server_test.is_empty() || self.server.shared().is_empty() {
            return Ok(None);
        }
        let b = eval_batches(
            &self.server_test,
            self.cfg.eval.batch_size,
            self.pad_id,
            &self.model.device,
        )?;
        Ok(Some(b))
    }

    /// The server test loss of the global parameters, through the strategy.
    fn eval_server(&mut self, b: &[fedllm_model::Batch]) -> Result<Option<f64>> {
        let (model, adapter) = (&self.model, &self.adapter);
        let mut loss = |p: &crate::params::ParamSet| -> Result<f64> {
            adapter.set_tensors(p)?;
            Ok(eval_loss(model, adapter, b)?.0)
        };
        let global = self.server.global.clone();
        let round = self.server.round;
        self.server.strategy.evaluate(round, &global, &mut loss)
    }

    /// Offsite tuning: the server test loss of the full model with the global edge layers.
    fn eval_plugin(&self, b: &[fedllm_model::Batch]) -> Result<Option<f64>> {
        let Some(p) = &self.plugin else {
            return Ok(None);
        };
        p.adapter.set_tensors(&self.server.global)?;
        Ok(Some(eval_loss(&p.model, &p.adapter, b)?.0))
    }

    /// `eval.accuracy`: the global adapter's GSM8K accuracy (FS-LLM's 8-shot prompt, greedy) on
    /// the fixed question subset. The adapter must be attached for inference.
    fn eval_accuracy(&mut self) -> Result<Option<f64>> {
        if self.accuracy_set.is_empty() || self.server.shared().is_empty() {
            return Ok(None);
        }
        self.adapter.set_tensors(&self.server.global)?;
        // Prompt-type adapters act through the virtual tokens generation continues from.
        let start = self.adapter.generation_prefix(&self.model)?;
        let s = fedllm_eval::gsm8k::evaluate(
            &self.model,
            start.as_ref(),
            &self.tokenizer,
            &self.accuracy_set,
            self.cfg.eval.accuracy_max_new_tokens,
            self.cfg.eval.batch_size,
            None,
        )?;
        Ok(Some(s.accuracy))
    }

    /// Evaluates the clients on their val and test splits (each client's own losses go into
    /// the record); the strategy aggregates.
    fn eval_clients(&mut self, rec: &mut RoundRecord) -> Result<()> {
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
        let shared = self.server.shared();
        let mut reqs = Vec::with_capacity(ids.len());
        for id in ids {
            let splits = self.server.strategy.configure_evaluate(round, id);
            if splits.is_empty() {
                continue;
            }
            *self.server.bytes_down.entry(id).or_default() += bytes(&shared);
            let msg = ToClient::Evaluate {
                round,
                params: shared.clone(),
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
                    let mut state = self.local.get(id)?;
                    out.extend(client.handle(msg, &self.shared(), &mut state)?);
                }
                out
            }
        };
        let results: Vec<EvalResult> = replies
            .into_iter()
            .filter_map(|reply| match reply {
                ToServer::EvalRes { client, losses, .. } => Some((client, losses)),
                _ => None,
            })
            .collect();
        for (c, losses) in &results {
            let l = losses.iter().map(|(k, v, _)| (k.clone(), *v)).collect();
            rec.client_losses.insert(*c, l);
        }
        let agg = self.server.strategy.aggregate_evaluate(round, &results);
        rec.client_val_loss = agg.get("val").copied();
        rec.client_test_loss = agg.get("test").copied();
        rec.client_global_test_loss = agg.get("global_test").copied();
        let sp = rec.spread("test");
        rec.client_test_mean = sp.map(|s| s.mean);
        rec.client_test_worst = sp.map(|s| s.worst);
        rec.client_test_best = sp.map(|s| s.best);
        Ok(())
    }

    /// Fills the record's losses and tracks the best round (server test loss, else client val).
    pub(super) fn evaluate(&mut self, rec: &mut RoundRecord) -> Result<()> {
        self.adapter.attach(&mut self.model, false)?;
        // One set of server test batches for the global model and, offsite, the plug-in.
        if let Some(b) = self.server_batches()? {
            rec.server_test_loss = self.eval_server(&b)?;
            rec.plugin_test_loss = self.eval_plugin(&b)?;
        }
        rec.server_accuracy = self.eval_accuracy()?;
        self.eval_clients(rec)?;
        self.adapter.attach(&mut self.model, true)?;
        let key = rec.server_test_loss.or(rec.client_val_loss);
        if let Some(l) = key {
            if self.best.is_none_or(|(_, b)| l < b) {
                self.best = Some((rec.round, l));
            }
        }
        Ok(())
    }
}
