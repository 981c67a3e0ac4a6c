//! Coordinate-wise trimmed mean (Yin et al. 2018): drop the `beta` fraction at each end.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{layout, unflatten, ParamSet};

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
        if results.is_empty() {
            return Ok(None);
        }
        let (flats, _) = flat_results(results)?;
        let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
        Ok(Some(unflatten(
            &crate::aggregate::trimmed_mean(&refs, self.beta),
            &layout(global),
        )?))
    }
}
