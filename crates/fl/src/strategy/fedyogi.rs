//! FedYogi (Reddi et al. 2021): FedAdam with Yogi's additive second moment,
//! v ← v − (1−β₂) Δ² sign(v − Δ²).

use super::fedadam::{adaptive_step, FedAdam};
use super::{Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::ParamSet;

pub struct FedYogi(FedAdam);

impl FedYogi {
    pub fn new(eta: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        Self(FedAdam::new(eta, beta1, beta2, tau))
    }
}

impl Strategy for FedYogi {
    fn name(&self) -> &'static str {
        "fedyogi"
    }

    fn aggregate_fit(
        &mut self,
        _r: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        adaptive_step(&mut self.0, global, results, |v, d2, b2| {
            v - (1.0 - b2) * d2 * (v - d2).signum()
        })
    }

    fn state(&self) -> Result<ParamSet> {
        self.0.state()
    }

    fn load_state(&mut self, s: &ParamSet) -> Result<()> {
        self.0.load_state(s)
    }
}
