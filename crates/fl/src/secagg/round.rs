//! One SecAgg+ round from the server's side, over any way of asking clients (in process or a
//! `Remote`): keys, sealed shares, masked fits, unmasking, and the weighted mean update.

use super::protocol::{Params, Reply, Stage};
use super::server::{Abandon, ServerRound};
use super::{dequantize_sum, masked_values};
use crate::config::SecAggCfg;
use crate::error::Result;
use crate::message::{ToClient, ToServer};
use crate::params::{layout, unflatten, ParamSet};
use crate::strategy::FitResult;

/// Sends requests to clients and returns their answers; the second argument is how many fit
/// results close the exchange early (0: wait for every client or the deadline).
pub type Ask<'a> = dyn FnMut(Vec<(usize, ToClient)>, usize) -> Result<Vec<ToServer>> + 'a;

pub struct Outcome {
    /// Survivors' fit results (metrics; their tensors are not the server's to see) and the
    /// bytes of each masked upload.
    pub masked: Vec<(FitResult, usize)>,
    /// Answers the stages did not take (failures, strays), for the caller's bookkeeping.
    pub other: Vec<ToServer>,
    /// The survivors' weighted mean update by name, or why the round was abandoned.
    pub mean_delta: std::result::Result<ParamSet, Abandon>,
    pub survivors: Vec<usize>,
}

/// Runs the round for the plain fit requests `fits` (one per sampled client).
pub fn run(
    round: usize,
    fits: Vec<(usize, ToClient)>,
    cfg: &SecAggCfg,
    graph_seed: u64,
    min_received: usize,
    ask: &mut Ask<'_>,
    log: &mut dyn FnMut(String),
) -> Result<Outcome> {
    let sampled: Vec<usize> = fits.iter().map(|(c, _)| *c).collect();
    let n = sampled.len();
    let params = Params {
        threshold: cfg.threshold_for(n),
        clip_range: cfg.clip_range as f32,
        bits: cfg.quant_bits,
        max_weight: cfg.max_weight,
    };
    let (mut sr, stage1) =
        ServerRound::new(round, params.clone(), &sampled, cfg.neighbours, graph_seed);
    let mut other = Vec::new();
    let stage = |reqs: Vec<(usize, Stage)>,
                 other: &mut Vec<ToServer>,
                 ask: &mut Ask<'_>|
     -> Result<Vec<(usize, Reply)>> {
        let msgs = reqs
            .into_iter()
            .map(|(c, stage)| (c, ToClient::SecAgg { round, stage }))
            .collect();
        let mut out = Vec::new();
        for a in ask(msgs, 0)? {
            match a {
                ToServer::SecAgg {
                    round: r,
                    client,
                    reply,
                } if r == round => out.push((client, reply)),
                a => other.push(a),
            }
        }
        Ok(out)
    };
    let keys = stage(stage1, &mut other, ask)?;
    let stage2 = sr.on_keys(keys, log);
    let shares = stage(stage2, &mut other, ask)?;
    let masks = sr.on_shares(shares, log);
    let mut lay = None;
    let fits: Vec<(usize, ToClient)> = fits
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
    let len = lay
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum::<usize>()
        + 1;
    let mut masked = Vec::new();
    let min = min_received.min(fits.len());
    for a in ask(fits, min)? {
        match a {
            ToServer::FitRes { round: r, result } if r == round => {
                let c = result.client;
                match masked_values(&result.params, &lay).and_then(|y| sr.on_masked(c, y, len)) {
                    Ok(()) => masked.push((result, 4 * len)),
                    Err(e) => log(format!("secagg: client {c}: masked input refused: {e}")),
                }
            }
            a => other.push(a),
        }
    }
    let mean_delta = match sr.unmask_requests() {
        Err(why) => Err(why),
        Ok(stage4) => {
            let shares = stage(stage4, &mut other, ask)?;
            sr.finish(shares, log)
                .and_then(|sum| mean(&sum, sr.survivors().len(), &params, &lay))
        }
    };
    Ok(Outcome {
        masked,
        other,
        mean_delta,
        survivors: sr.survivors(),
    })
}

/// Σ w·Δ / Σ w by name from the unmasked sum [Σ w·Δ, Σ w] of `n` inputs.
fn mean(
    sum: &[u32],
    n: usize,
    p: &Params,
    lay: &[(String, Vec<usize>)],
) -> std::result::Result<ParamSet, Abandon> {
    let v = dequantize_sum(sum, n, p.clip_range, p.bits);
    let (wd, w) = v.split_at(v.len() - 1);
    if w[0] <= 0.0 {
        return Err(format!(
            "the summed weight is {} (no sample behind the updates)",
            w[0]
        ));
    }
    let mean: Vec<f32> = wd.iter().map(|x| x / w[0]).collect();
    unflatten(&mean, lay).map_err(|e| e.to_string())
}
