//! pFedMe's server step (T. Dinh et al. 2020): w ← (1 − β)·w + β·Σ nᵢwᵢ / Σ nᵢ; β = 1 is FedAvg.

use super::{fedavg::weighted_average, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{flatten, layout, unflatten, ParamSet};

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
        let Some(avg) = weighted_average(global, results)? else {
            return Ok(None);
        };
        let g = flatten(global)?;
        let out = crate::aggregate::beta_mix(&g, &avg, self.beta);
        Ok(Some(unflatten(&out, &layout(global))?))
    }
}
