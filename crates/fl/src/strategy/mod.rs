//! Strategies in Flower's shape: what clients are told each round, and how their results become
//! the next global parameters. The round loop lives in one driver (`simulation`), not here.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::params::ParamSet;

pub mod fedadam;
pub mod fedavg;
pub mod fedavgm;
pub mod fedprox;
pub mod fedyogi;
pub mod krum;
pub mod median;
pub mod trimmed_mean;

/// One client's answer to a fit request.
#[derive(Debug, Clone)]
pub struct FitResult {
    pub client: usize,
    pub params: ParamSet,
    pub num_samples: usize,
    pub metrics: BTreeMap<String, f64>,
}

/// A client that was asked but did not answer (or answered with an error).
#[derive(Debug, Clone)]
pub struct Failure {
    pub client: usize,
    pub reason: String,
}

/// Per-round instructions for clients' local training beyond the run config.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitConfig {
    /// FedProx: weight of the proximal term μ/2‖w − w_global‖².
    pub proximal_mu: f64,
}

pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    fn configure_fit(&self, _round: usize) -> FitConfig {
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
    pub krum_byzantine: usize,
    pub krum_select: usize,
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
        }
    }
}

pub fn build(kind: &StrategyKind, p: &StrategyParams) -> Box<dyn Strategy> {
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
            // The state survives a checkpoint round trip.
            let st = s.state().unwrap();
            assert_eq!(st.len(), 2);
        }
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
