//! Coordinate-wise trimmed mean (Yin et al. 2018): drop the `beta` fraction at each end.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::ParamSet;

pub struct TrimmedMean {
    pub beta: f64,
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed_mean"
    }

    fn aggregate_fit(
        &mut self,
        _r: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        aggregate_flat(global, results, |u, _| {
            Ok(crate::aggregate::trimmed_mean(u, self.beta))
        })
    }
}
