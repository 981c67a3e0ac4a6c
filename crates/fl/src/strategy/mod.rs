//! Strategies in Flower's shape: what clients are told each round, and how their results become
//! the next global parameters. The round loop lives in one driver (`simulation`), not here.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::params::ParamSet;

pub mod bulyan;
pub mod dp;
pub mod fedadam;
pub mod fedavg;
pub mod fedavgm;
pub mod fedex;
pub mod fedprox;
pub mod fedyogi;
pub mod krum;
pub mod median;
pub mod norm_bounding;
pub mod pfedme;
pub mod trimmed_mean;

/// One client's answer to a fit request.
#[derive(Debug, Clone)]
pub struct FitResult {
    pub client: usize,
    pub params: ParamSet,
    pub num_samples: usize,
    pub metrics: BTreeMap<String, f64>,
}

/// One client's evaluation answer: (client, [(split, mean loss, tokens)]).
pub type EvalResult = (usize, Vec<(String, f64, usize)>);

/// A client that was asked but did not answer (or answered with an error).
#[derive(Debug, Clone)]
pub struct Failure {
    pub client: usize,
    pub reason: String,
}

/// Per-round instructions for clients' local training beyond the run config. They travel to
/// distributed clients as versioned JSON, so a new field needs no transport change.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FitConfig {
    /// FedProx: weight of the proximal term μ/2‖w − w_global‖².
    pub proximal_mu: f64,
    /// The run's optimizer steps before this round (set by the server): where this round's
    /// local steps sit on the learning-rate schedule, which spans the whole run.
    pub start_step: usize,
    /// This client's learning rate this round, instead of `train.lr`.
    pub lr: Option<f64>,
    /// This client's local steps (or epochs) this round, instead of `train.local_update_steps`.
    pub local_steps: Option<usize>,
    /// Name patterns of the tensors this client keeps to itself this round: the server sends
    /// and expects back only the others. None: the run's `federate.local_tensors`.
    pub local_tensors: Option<Vec<String>>,
    /// Measure the client's val loss before and after its local training (metrics
    /// `val_before`, `val_after`): FedEx's reward.
    pub report_val: bool,
    /// Differential privacy: clip the update (what is sent back minus what was received) to
    /// this L2 norm (metrics `dp_norm`, `dp_within`).
    pub dp_clip: Option<f64>,
    /// Local DP: Gaussian noise of this standard deviation on the clipped update.
    pub dp_local_std: f64,
    /// Secure aggregation: send the update masked (stage 3), with these envelopes.
    pub secagg: Option<crate::secagg::protocol::FitMask>,
}

pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    /// What `client` is told for this round's local training (each client may differ).
    fn configure_fit(&self, _round: usize, _client: usize) -> FitConfig {
        FitConfig::default()
    }

    /// The next global parameters, or None to keep the current ones (e.g. nobody answered).
    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        failures: &[Failure],
    ) -> Result<Option<ParamSet>>;

    /// The splits `client` evaluates after a round (none: the client is not asked).
    fn configure_evaluate(&self, _round: usize, _client: usize) -> Vec<String> {
        vec!["val".into(), "test".into()]
    }

    /// One loss per split from the clients' (client, [(split, mean loss, tokens)]) answers;
    /// by default the token-weighted mean, so every evaluated token counts once.
    fn aggregate_evaluate(
        &mut self,
        _round: usize,
        results: &[EvalResult],
    ) -> BTreeMap<String, f64> {
        let mut acc: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (_, losses) in results {
            for (split, l, n) in losses {
                let e = acc.entry(split.clone()).or_default();
                e.0 += l * *n as f64;
                e.1 += n;
            }
        }
        acc.into_iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(k, (sum, n))| (k, sum / n as f64))
            .collect()
    }

    /// Server-side evaluation after a round, on the server's held-out data: `loss` scores any
    /// parameter set there. By default the global parameters; None skips it.
    fn evaluate(
        &mut self,
        _round: usize,
        global: &ParamSet,
        loss: &mut dyn FnMut(&ParamSet) -> Result<f64>,
    ) -> Result<Option<f64>> {
        loss(global).map(Some)
    }

    /// Values the strategy wants in every round's record (FedEx: its distribution).
    fn report(&self) -> BTreeMap<String, Vec<f64>> {
        BTreeMap::new()
    }

    /// Server optimiser state for checkpoints (empty for stateless strategies).
    fn state(&self) -> Result<ParamSet> {
        Ok(ParamSet::new())
    }

    fn load_state(&mut self, _state: &ParamSet) -> Result<()> {
        Ok(())
    }
}

/// Flattened client updates and their sample counts, in a fixed order.
pub(crate) fn flat_results(results: &[FitResult]) -> Result<(Vec<Vec<f32>>, Vec<f64>)> {
    let mut flats = Vec::with_capacity(results.len());
    for r in results {
        flats.push(crate::params::flatten(&r.params)?);
    }
    Ok((
        flats,
        results.iter().map(|r| r.num_samples as f64).collect(),
    ))
}

/// The shape every flat aggregator shares: no results keep the global; otherwise `rule` gets
/// the flattened updates and their sample counts, and its vector becomes the new parameters.
pub(crate) fn aggregate_flat(
    global: &ParamSet,
    results: &[FitResult],
    rule: impl FnOnce(&[&[f32]], &[f64]) -> Result<Vec<f32>>,
) -> Result<Option<ParamSet>> {
    if results.is_empty() {
        return Ok(None);
    }
    let (flats, weights) = flat_results(results)?;
    let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
    let agg = rule(&refs, &weights)?;
    Ok(Some(crate::params::unflatten(
        &agg,
        &crate::params::layout(global),
    )?))
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    Fedavg,
    Fedprox,
    Fedavgm,
    Fedadam,
    Fedyogi,
    Median,
    TrimmedMean,
    Krum,
    Bulyan,
    NormBounding,
    Fedex,
}

impl StrategyKind {
    /// The name as the config spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Fedavg => "fedavg",
            Self::Fedprox => "fedprox",
            Self::Fedavgm => "fedavgm",
            Self::Fedadam => "fedadam",
            Self::Fedyogi => "fedyogi",
            Self::Median => "median",
            Self::TrimmedMean => "trimmed_mean",
            Self::Krum => "krum",
            Self::Bulyan => "bulyan",
            Self::NormBounding => "norm_bounding",
            Self::Fedex => "fedex",
        }
    }
}

/// Strategy parameters from the run config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StrategyParams {
    pub server_lr: f64,
    pub server_momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    pub proximal_mu: f64,
    pub trim_ratio: f64,
    /// Krum and Bulyan: assumed number of Byzantine clients f.
    pub krum_byzantine: usize,
    pub krum_select: usize,
    /// Norm bounding: the largest L2 norm of a client's update kept as is.
    pub norm_bound: f64,
    /// FedEx: the grid of client learning rates and local steps (its arms: every pair), and
    /// the exponentiated-gradient step size.
    pub fedex_lrs: Vec<f64>,
    pub fedex_steps: Vec<usize>,
    pub fedex_eta: f64,
}

impl Default for StrategyParams {
    fn default() -> Self {
        Self {
            server_lr: 1.0,
            server_momentum: 0.9,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            proximal_mu: 0.01,
            trim_ratio: 0.1,
            krum_byzantine: 0,
            krum_select: 1,
            norm_bound: 1.0,
            fedex_lrs: Vec::new(),
            fedex_steps: Vec::new(),
            fedex_eta: 1.0,
        }
    }
}

/// The strategy `kind` with its parameters; `seed` is the run's (for strategies that sample).
pub fn build(kind: &StrategyKind, p: &StrategyParams, seed: u64) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::Fedavg => Box::new(fedavg::FedAvg),
        StrategyKind::Fedprox => Box::new(fedprox::FedProx { mu: p.proximal_mu }),
        StrategyKind::Fedavgm => Box::new(fedavgm::FedAvgM::new(p.server_lr, p.server_momentum)),
        StrategyKind::Fedadam => {
            Box::new(fedadam::FedAdam::new(p.server_lr, p.beta1, p.beta2, p.tau))
        }
        StrategyKind::Fedyogi => {
            Box::new(fedyogi::FedYogi::new(p.server_lr, p.beta1, p.beta2, p.tau))
        }
        StrategyKind::Median => Box::new(median::Median),
        StrategyKind::TrimmedMean => Box::new(trimmed_mean::TrimmedMean { beta: p.trim_ratio }),
        StrategyKind::Krum => Box::new(krum::Krum {
            byzantine: p.krum_byzantine,
            select: p.krum_select,
        }),
        StrategyKind::Bulyan => Box::new(bulyan::Bulyan {
            byzantine: p.krum_byzantine,
        }),
        StrategyKind::NormBounding => Box::new(norm_bounding::NormBounding {
            bound: p.norm_bound,
        }),
        StrategyKind::Fedex => Box::new(fedex::FedEx::new(
            &p.fedex_lrs,
            &p.fedex_steps,
            p.fedex_eta,
            seed,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn set(v: &[f32]) -> ParamSet {
        ParamSet::from([(
            "w".to_string(),
            Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap(),
        )])
    }

    fn res(v: &[f32], n: usize) -> FitResult {
        FitResult {
            client: n,
            params: set(v),
            num_samples: n,
            metrics: Default::default(),
        }
    }

    fn get(p: &ParamSet) -> Vec<f32> {
        p["w"].to_vec1().unwrap()
    }

    /// Reddi et al.'s server update written out independently in f64, three rounds.
    #[test]
    fn fedadam_and_fedyogi_follow_the_reference_formula() {
        let clients = [res(&[1.5, 1.0, -0.2], 1), res(&[0.5, 3.0, 0.4], 3)];
        let (eta, b1, b2, tau) = (0.1, 0.9, 0.99, 1e-3);
        for yogi in [false, true] {
            let mut s: Box<dyn Strategy> = if yogi {
                Box::new(fedyogi::FedYogi::new(eta, b1, b2, tau))
            } else {
                Box::new(fedadam::FedAdam::new(eta, b1, b2, tau))
            };
            let mut g = set(&[1.0, 2.0, 0.0]);
            let (mut w, mut m, mut v) = (vec![1.0f64, 2.0, 0.0], vec![0.0f64; 3], vec![0.0f64; 3]);
            for round in 1..=3 {
                g = s.aggregate_fit(round, &g, &clients, &[]).unwrap().unwrap();
                for i in 0..3 {
                    let avg = (get(&clients[0].params)[i] as f64 * 1.0
                        + get(&clients[1].params)[i] as f64 * 3.0)
                        / 4.0;
                    let d = avg - w[i];
                    m[i] = b1 * m[i] + (1.0 - b1) * d;
                    v[i] = if yogi {
                        v[i] - (1.0 - b2) * d * d * (v[i] - d * d).signum()
                    } else {
                        b2 * v[i] + (1.0 - b2) * d * d
                    };
                    w[i] += eta * m[i] / (v[i].sqrt() + tau);
                }
                for (a, b) in get(&g).iter().zip(&w) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5,
                        "yogi={yogi} round {round}: {a} vs {b}"
                    );
                }
            }
            // The state survives a checkpoint round trip: a fresh strategy loaded with it holds
            // the same tensors and takes the next round exactly as the original does.
            let st = s.state().unwrap();
            assert_eq!(st.len(), 2, "m and v");
            let mut fresh: Box<dyn Strategy> = if yogi {
                Box::new(fedyogi::FedYogi::new(eta, b1, b2, tau))
            } else {
                Box::new(fedadam::FedAdam::new(eta, b1, b2, tau))
            };
            fresh.load_state(&st).unwrap();
            let st2 = fresh.state().unwrap();
            for (k, t) in &st {
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    t.flatten_all().unwrap().to_vec1().unwrap(),
                    st2[k].flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert_eq!(a, b, "state {k}");
            }
            let next = s.aggregate_fit(4, &g, &clients, &[]).unwrap().unwrap();
            let next2 = fresh.aggregate_fit(4, &g, &clients, &[]).unwrap().unwrap();
            assert_eq!(get(&next), get(&next2));
        }
    }

    /// Four honest clients near (1, 1) and one sending (100, −100): the robust strategies land
    /// where hand computation says, FedAvg is dragged away.
    #[test]
    fn robust_strategies_resist_an_outlier_client() {
        let rs = [
            res(&[1.0, 1.2], 1),
            res(&[0.8, 1.0], 1),
            res(&[1.2, 0.9], 1),
            res(&[1.0, 0.8], 1),
            res(&[100.0, -100.0], 1),
        ];
        let g = set(&[0.0, 0.0]);
        let run =
            |mut s: Box<dyn Strategy>| get(&s.aggregate_fit(1, &g, &rs, &[]).unwrap().unwrap());
        // Sorted columns: (0.8, 1, 1, 1.2, 100) and (−100, 0.8, 0.9, 1, 1.2).
        assert_eq!(run(Box::new(median::Median)), vec![1.0, 0.9]);
        // beta 0.2 of 5 drops one value at each end: means of (1, 1, 1.2) and (0.8, 0.9, 1).
        let t = run(Box::new(trimmed_mean::TrimmedMean { beta: 0.2 }));
        assert!(
            (t[0] - 3.2 / 3.0).abs() < 1e-6 && (t[1] - 0.9).abs() < 1e-6,
            "{t:?}"
        );
        // Krum with f = 1 scores each by the squared distances to its n − f − 2 = 2 nearest: an
        // honest client's sum is below 0.3, the outlier's about 2·10⁴, so it picks an honest one.
        let k = run(Box::new(krum::Krum {
            byzantine: 1,
            select: 1,
        }));
        assert!(
            rs[..4].iter().any(|r| get(&r.params) == k),
            "krum chose {k:?}"
        );
        let avg = run(Box::new(fedavg::FedAvg));
        assert!(avg[0] > 20.0, "fedavg is not robust: {avg:?}");
        // Empty rounds keep the global.
        for mut s in [
            Box::new(median::Median) as Box<dyn Strategy>,
            Box::new(trimmed_mean::TrimmedMean { beta: 0.2 }),
            Box::new(krum::Krum {
                byzantine: 1,
                select: 1,
            }),
        ] {
            assert!(s.aggregate_fit(1, &g, &[], &[]).unwrap().is_none());
        }
    }

    /// The default evaluation aggregate is the token-weighted mean per split, by hand.
    #[test]
    fn aggregate_evaluate_weights_by_tokens() {
        let r = vec![
            (
                0,
                vec![("val".to_string(), 2.0, 10), ("test".to_string(), 1.0, 5)],
            ),
            (1, vec![("val".to_string(), 4.0, 30)]),
            (2, vec![("test".to_string(), 9.0, 0)]),
        ];
        let m = fedavg::FedAvg.aggregate_evaluate(1, &r);
        assert_eq!(m["val"], (2.0 * 10.0 + 4.0 * 30.0) / 40.0);
        assert_eq!(m["test"], 1.0);
        assert_eq!(m.len(), 2);
    }

    /// Krum with one result returns it unchanged (there is nothing to compare it with).
    #[test]
    fn krum_with_a_single_result_returns_it() {
        let only = [res(&[3.5, -2.25, 7.0], 2)];
        let mut k = krum::Krum {
            byzantine: 1,
            select: 3,
        };
        let out = k
            .aggregate_fit(1, &set(&[0.0; 3]), &only, &[])
            .unwrap()
            .unwrap();
        assert_eq!(get(&out), vec![3.5, -2.25, 7.0]);
    }

    /// FedProx tells clients μ and aggregates as a sample-weighted mean.
    #[test]
    fn fedprox_sends_mu_and_averages_by_samples() {
        let mut p = fedprox::FedProx { mu: 0.25 };
        assert_eq!(p.configure_fit(3, 1).proximal_mu, 0.25);
        assert_eq!(fedavg::FedAvg.configure_fit(3, 1).proximal_mu, 0.0);
        let r = [res(&[2.0, 0.0], 1), res(&[6.0, 4.0], 3)];
        let out = p
            .aggregate_fit(1, &set(&[0.0, 0.0]), &r, &[])
            .unwrap()
            .unwrap();
        assert_eq!(get(&out), vec![5.0, 3.0]);
    }

    #[test]
    fn fedavg_weights_by_samples_and_fedavgm_adds_momentum() {
        let r = [res(&[1.0, 0.0], 1), res(&[3.0, 4.0], 3)];
        let g = set(&[0.0, 0.0]);
        let a = fedavg::FedAvg
            .aggregate_fit(1, &g, &r, &[])
            .unwrap()
            .unwrap();
        assert_eq!(get(&a), vec![2.5, 3.0]);
        assert!(
            fedavg::FedAvg
                .aggregate_fit(1, &g, &[], &[])
                .unwrap()
                .is_none(),
            "no results keep the global"
        );
        // FedAvgM with lr 1, momentum 0.5: v1 = Δ, w1 = avg; v2 = 0.5 v1 + Δ2.
        let mut m = fedavgm::FedAvgM::new(1.0, 0.5);
        let w1 = m.aggregate_fit(1, &g, &r, &[]).unwrap().unwrap();
        assert_eq!(get(&w1), vec![2.5, 3.0]);
        let w2 = m.aggregate_fit(2, &w1, &r, &[]).unwrap().unwrap();
        // Δ2 = 0 → v2 = 0.5·(−2.5, −3) → w2 = w1 + (1.25, 1.5)
        assert_eq!(get(&w2), vec![3.75, 4.5]);
    }
}
