//! pFedMe's server step (T. Dinh et al. 2020): w ← (1 − β)·w + β·Σ nᵢwᵢ / Σ nᵢ; β = 1 is FedAvg.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::aggregate::{beta_mix, weighted_mean};
use crate::error::Result;
use crate::params::{flatten, ParamSet};

pub struct PFedMe {
    pub beta: f64,
}

impl Strategy for PFedMe {
    fn name(&self) -> &'static str {
        "pfedme"
    }

    fn aggregate_fit(
        &mut self,
        _round: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        aggregate_flat(global, results, |u, w| {
            Ok(beta_mix(&flatten(global)?, &weighted_mean(u, w), self.beta))
        })
    }
}
