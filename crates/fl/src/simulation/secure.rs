//! Secure aggregation in the round loop: the server's four SecAgg+ stages through the same
//! request/answer path as a plain round (in process or through a `Remote`), and each client's
//! answers, so standalone and distributed runs share one protocol.

use fedllm_rng::Rng;

use super::Simulation;
use crate::error::{FlError, Result};
use crate::message::{ToClient, ToServer};
use crate::params::{flatten, layout, unflatten, ParamSet};
use crate::secagg::client::ClientRound;
use crate::secagg::protocol::{Params, Reply, Stage};
use crate::secagg::server::ServerRound;
use crate::secagg::{dequantize_sum, masked_set, masked_values};
use crate::server::RoundOutcome;

impl Simulation {
    /// Client `c`'s answer to `msg`: secure-aggregation stages here, a masked fit as a plain
    /// fit whose update is then masked, anything else by the client itself.
    pub(super) fn answer_as(
        &mut self,
        c: usize,
        msg: ToClient,
        state: &mut ParamSet,
    ) -> Result<Option<ToServer>> {
        let client = self
            .clients
            .iter()
            .position(|k| k.id == c)
            .expect("own data");
        match msg {
            ToClient::SecAgg { round, stage } => {
                let reply = self.secagg_stage(c, round, stage)?;
                Ok(Some(ToServer::SecAgg {
                    round,
                    client: c,
                    reply,
                }))
            }
            ToClient::Fit {
                round,
                params,
                config,
                seed,
            } if config.secagg.is_some() => {
                let sent = params.clone();
                let fm = config.secagg.clone().expect("checked");
                let msg = ToClient::Fit {
                    round,
                    params,
                    config,
                    seed,
                };
                let Some(ToServer::FitRes { round, mut result }) =
                    self.clients[client].handle(msg, &self.shared(), state)?
                else {
                    return Err(FlError::Protocol("a fit without a result".into()));
                };
                let st = self.secagg.get_mut(&c).filter(|s| s.round == round).ok_or_else(|| {
                    FlError::Protocol(format!("secure aggregation: no keys of round {round} (this client missed stage 1)"))
                })?;
                let lay = layout(&sent);
                let (new, old) = (flatten(&result.params)?, flatten(&sent)?);
                let delta: Vec<f32> = new.iter().zip(&old).map(|(a, b)| a - b).collect();
                let y = st.mask_update(&fm, &delta, result.num_samples)?;
                result.params = masked_set(&y, &lay)?;
                result.num_samples = 0;
                Ok(Some(ToServer::FitRes { round, result }))
            }
            msg => self.clients[client].handle(msg, &self.shared(), state),
        }
    }

    fn secagg_stage(&mut self, c: usize, round: usize, stage: Stage) -> Result<Reply> {
        if let Stage::Setup { params, neighbours } = stage {
            let (st, reply) = ClientRound::setup(round, c, params, neighbours)?;
            self.secagg.insert(c, st);
            return Ok(reply);
        }
        let st = self
            .secagg
            .get_mut(&c)
            .filter(|s| s.round == round)
            .ok_or_else(|| {
                FlError::Protocol(format!(
                    "secure aggregation: no keys of round {round} (this client missed stage 1)"
                ))
            })?;
        match stage {
            Stage::ShareKeys { keys } => st.share_keys(keys),
            Stage::Unmask { survivors, dropped } => st.unmask(&survivors, &dropped),
            Stage::Setup { .. } => unreachable!("handled above"),
        }
    }

    /// One stage: requests out, (client, reply) pairs back; failures go to the round's record.
    fn ask_stage(
        &mut self,
        round: usize,
        reqs: Vec<(usize, Stage)>,
        log: &mut dyn FnMut(String),
    ) -> Result<Vec<(usize, Reply)>> {
        let msgs: Vec<(usize, ToClient)> = reqs
            .into_iter()
            .map(|(c, stage)| (c, ToClient::SecAgg { round, stage }))
            .collect();
        let answers = match self.remote.as_mut() {
            Some(r) => r.exchange(round, msgs, 0)?,
            None => {
                self.answer_here(round, msgs, &fedllm_train::Progress::new("", "", 0, false))?
            }
        };
        let mut out = Vec::new();
        for a in answers {
            match a {
                ToServer::SecAgg {
                    round: r,
                    client,
                    reply,
                } if r == round => out.push((client, reply)),
                other => {
                    if let Err(e) = self.server.on_message(other) {
                        log(format!("ignored message: {e}"));
                    }
                }
            }
        }
        Ok(out)
    }

    /// A round under SecAgg+: keys, sealed shares, masked fits, unmasking; the weighted mean
    /// of the survivors' updates from their masked sum. Below the threshold at any point the
    /// round is abandoned (logged) and the global tensors stay.
    pub(super) fn secure_fit_round(&mut self, log: &mut impl FnMut(&str)) -> Result<RoundOutcome> {
        let reqs = self.server.start_round()?;
        let round = self.server.round;
        let sampled: Vec<usize> = reqs.iter().map(|(c, _)| *c).collect();
        let a = &self.cfg.secagg;
        let n = sampled.len();
        let params = Params {
            threshold: a.threshold_for(n),
            clip_range: a.clip_range as f32,
            bits: a.quant_bits,
            max_weight: a.max_weight,
        };
        let graph_seed = Rng::derive(&[self.server.seed, round as u64, 0x5ec_a66]);
        let (mut sr, stage1) =
            ServerRound::new(round, params.clone(), &sampled, a.neighbours, graph_seed);
        let mut say = |m: String| log(&format!("round {round}: {m}"));
        let keys = self.ask_stage(round, stage1, &mut say)?;
        let stage2 = sr.on_keys(keys, &mut say);
        let shares = self.ask_stage(round, stage2, &mut say)?;
        let masks = sr.on_shares(shares, &mut say);
        let mut lay = None;
        let fits: Vec<(usize, ToClient)> = reqs
            .into_iter()
            .filter_map(|(c, m)| match m {
                ToClient::Fit {
                    round,
                    params,
                    mut config,
                    seed,
                } => {
                    config.secagg = Some(masks.get(&c)?.clone());
                    lay.get_or_insert_with(|| layout(&params));
                    Some((
                        c,
                        ToClient::Fit {
                            round,
                            params,
                            config,
                            seed,
                        },
                    ))
                }
                _ => None,
            })
            .collect();
        let lay = lay.unwrap_or_default();
        let len: usize = lay
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
            + 1;
        let min = self
            .cfg
            .distributed
            .min_received
            .unwrap_or(fits.len())
            .min(fits.len());
        let answers = match self.remote.as_mut() {
            Some(r) => r.exchange(round, fits, min)?,
            None => {
                self.answer_here(round, fits, &fedllm_train::Progress::new("", "", 0, false))?
            }
        };
        for msg in answers {
            match msg {
                ToServer::FitRes { round: r, result } if r == round => {
                    let c = result.client;
                    let got =
                        masked_values(&result.params, &lay).and_then(|y| sr.on_masked(c, y, len));
                    match got {
                        Ok(()) => self.server.on_masked(round, result, 4 * len),
                        Err(e) => say(format!("secagg: client {c}: masked input refused: {e}")),
                    }
                }
                other => {
                    if let Err(e) = self.server.on_message(other) {
                        say(format!("ignored message: {e}"));
                    }
                }
            }
        }
        let mean = match sr.unmask_requests() {
            Err(why) => Err(why),
            Ok(stage4) => {
                let shares = self.ask_stage(round, stage4, &mut say)?;
                sr.finish(shares, &mut say)
                    .and_then(|sum| self.secure_mean(&sum, sr.survivors().len(), &params, &lay))
            }
        };
        match &mean {
            Ok(_) => say(format!(
                "secagg: aggregated the masked inputs of clients {:?}",
                sr.survivors()
            )),
            Err(why) => say(format!(
                "secagg: round abandoned, the global adapter stays as it was: {why}"
            )),
        }
        self.server.close_secure_round(mean)
    }

    /// The new shared tensors from the survivors' unmasked sum [Σ w·Δ, Σ w].
    fn secure_mean(
        &self,
        sum: &[u32],
        n: usize,
        p: &Params,
        lay: &[(String, Vec<usize>)],
    ) -> std::result::Result<ParamSet, String> {
        let v = dequantize_sum(sum, n, p.clip_range, p.bits);
        let (wd, w) = v.split_at(v.len() - 1);
        if w[0] <= 0.0 {
            return Err(format!(
                "the summed weight is {} (no sample behind the updates)",
                w[0]
            ));
        }
        let mean: Vec<f32> = wd.iter().map(|x| x / w[0]).collect();
        let delta = unflatten(&mean, lay).map_err(|e| e.to_string())?;
        delta
            .into_iter()
            .map(|(k, d)| {
                Ok((
                    k.clone(),
                    (&self.server.global[&k] + d).map_err(|e| e.to_string())?,
                ))
            })
            .collect()
    }
}
