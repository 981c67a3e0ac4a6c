//! FedEx (Khodak et al. 2021): the server tunes the clients' local hyper-parameters during the
//! run. Each round every sampled client draws an arm (a learning rate × local steps pair from
//! the grid) from a categorical distribution θ; after training it reports how much its local
//! training lowered its validation loss. θ is updated by exponentiated gradient on those
//! improvements against their round mean (the baseline): arm j's gradient estimate is
//! ĝⱼ = −Σ_{k drew j} (improvementₖ − mean) / (n·θⱼ) over the round's n clients, then
//! θⱼ ← θⱼ·exp(−η·ĝⱼ), renormalised. Parameters are averaged as FedAvg does. θ is part of the
//! checkpoint and of every round's record.

use std::collections::BTreeMap;

use fedllm_rng::Rng;

use super::{fedavg::FedAvg, Failure, FitConfig, FitResult, Strategy};
use crate::error::{FlError, Result};
use crate::params::ParamSet;

pub struct FedEx {
    /// (learning rate, local steps) per arm.
    pub arms: Vec<(f64, usize)>,
    pub eta: f64,
    pub theta: Vec<f64>,
    pub seed: u64,
}

impl FedEx {
    pub fn new(lrs: &[f64], steps: &[usize], eta: f64, seed: u64) -> Self {
        let arms: Vec<(f64, usize)> = lrs
            .iter()
            .flat_map(|&l| steps.iter().map(move |&s| (l, s)))
            .collect();
        let n = arms.len().max(1);
        Self {
            theta: vec![1.0 / n as f64; n],
            arms,
            eta,
            seed,
        }
    }

    /// The arm `client` draws in `round` (inverse CDF of θ at a seeded uniform).
    pub fn arm(&self, round: usize, client: usize) -> usize {
        let u = Rng::new(Rng::derive(&[
            self.seed,
            0xFE_DE,
            round as u64,
            client as u64,
        ]))
        .next_f64();
        let mut acc = 0.0;
        for (j, p) in self.theta.iter().enumerate() {
            acc += p;
            if u < acc {
                return j;
            }
        }
        self.theta.len() - 1
    }
}

/// One exponentiated-gradient step of θ from (arm, improvement) pairs.
pub fn eg_step(theta: &[f64], eta: f64, draws: &[(usize, f64)]) -> Vec<f64> {
    if draws.is_empty() {
        return theta.to_vec();
    }
    let n = draws.len() as f64;
    let mean = draws.iter().map(|d| d.1).sum::<f64>() / n;
    let mut g = vec![0.0; theta.len()];
    for &(j, imp) in draws {
        g[j] -= (imp - mean) / (n * theta[j]);
    }
    let w: Vec<f64> = theta
        .iter()
        .zip(&g)
        .map(|(t, gj)| t * (-eta * gj).exp())
        .collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

impl Strategy for FedEx {
    fn name(&self) -> &'static str {
        "fedex"
    }

    fn configure_fit(&self, round: usize, client: usize) -> FitConfig {
        let (lr, steps) = self.arms[self.arm(round, client)];
        FitConfig {
            lr: Some(lr),
            local_steps: Some(steps),
            report_val: true,
            ..FitConfig::default()
        }
    }

    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        failures: &[Failure],
    ) -> Result<Option<ParamSet>> {
        let draws: Vec<(usize, f64)> = results
            .iter()
            .filter_map(|r| {
                let (b, a) = (r.metrics.get("val_before")?, r.metrics.get("val_after")?);
                Some((self.arm(round, r.client), b - a))
            })
            .collect();
        self.theta = eg_step(&self.theta, self.eta, &draws);
        FedAvg.aggregate_fit(round, global, results, failures)
    }

    fn report(&self) -> BTreeMap<String, Vec<f64>> {
        BTreeMap::from([("fedex_theta".to_string(), self.theta.clone())])
    }

    /// θ in f64, so a resumed run continues exactly.
    fn state(&self) -> Result<ParamSet> {
        let n = self.theta.len();
        Ok(ParamSet::from([(
            "theta".to_string(),
            candle_core::Tensor::from_vec(self.theta.clone(), n, &candle_core::Device::Cpu)?,
        )]))
    }

    fn load_state(&mut self, s: &ParamSet) -> Result<()> {
        let Some(t) = s.get("theta") else {
            return Ok(());
        };
        let theta: Vec<f64> = t.to_vec1()?;
        if theta.len() != self.theta.len() {
            return Err(FlError::Config(format!(
                "the checkpoint's FedEx distribution has {} arms, the config {}",
                theta.len(),
                self.theta.len()
            )));
        }
        self.theta = theta;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: θ = (½, ½), η = 1, two clients; arm 0 improved by 1.0, arm 1 by 0.0. Mean 0.5;
    /// ĝ₀ = −(0.5)/(2·½) = −0.5, ĝ₁ = +0.5; θ ∝ (½e^0.5, ½e^−0.5) → (0.7311, 0.2689).
    #[test]
    fn exponentiated_gradient_hand_computed() {
        let t = eg_step(&[0.5, 0.5], 1.0, &[(0, 1.0), (1, 0.0)]);
        let want0 = 0.5f64.exp() / (0.5f64.exp() + (-0.5f64).exp());
        assert!((t[0] - want0).abs() < 1e-12 && (t[1] - (1.0 - want0)).abs() < 1e-12);
        assert_eq!(eg_step(&[0.5, 0.5], 1.0, &[]), vec![0.5, 0.5]);
        // Equal improvements carry no signal.
        assert_eq!(
            eg_step(&[0.25, 0.75], 2.0, &[(0, 0.3), (1, 0.3)]),
            vec![0.25, 0.75]
        );
    }

    /// θ survives the checkpoint bit for bit; arms follow θ (all mass on one arm → always it).
    #[test]
    fn state_round_trip_and_sampling() {
        let mut f = FedEx::new(&[0.1, 0.01], &[2, 4], 1.0, 3);
        assert_eq!(f.arms.len(), 4);
        f.theta = vec![0.1, 0.2, 0.3, 0.4 + 1e-17];
        let s = f.state().unwrap();
        let mut g = FedEx::new(&[0.1, 0.01], &[2, 4], 1.0, 3);
        g.load_state(&s).unwrap();
        assert_eq!(g.theta, f.theta);
        g.theta = vec![0.0, 0.0, 1.0, 0.0];
        assert!((0..50).all(|c| g.arm(1, c) == 2));
        assert_eq!(g.configure_fit(1, 0).lr, Some(0.01));
        assert_eq!(g.configure_fit(1, 0).local_steps, Some(2));
    }
}
