//! FedProx (Li et al. 2020): clients minimise loss + μ/2‖w − w_global‖²; the server averages
//! as FedAvg does.

use super::{fedavg::FedAvg, Failure, FitConfig, FitResult, Strategy};
use crate::error::Result;
use crate::params::ParamSet;

pub struct FedProx {
    pub mu: f64,
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn configure_fit(&self, _round: usize, _client: usize) -> FitConfig {
        FitConfig {
            proximal_mu: self.mu,
            ..Default::default()
        }
    }

    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        FedAvg.aggregate_fit(round, global, results, f)
    }
}
