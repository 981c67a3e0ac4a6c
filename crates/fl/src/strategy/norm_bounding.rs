//! Norm bounding (Sun et al. 2019): each client's update is clipped to an L2 norm before the
//! sample-weighted mean, so no single client can move the model far.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{flatten, layout, unflatten, ParamSet};

pub struct NormBounding {
    /// Largest L2 norm of an update (w − global) that is kept as is.
    pub bound: f64,
}

impl Strategy for NormBounding {
    fn name(&self) -> &'static str {
        "norm_bounding"
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
        let (flats, w) = flat_results(results)?;
        let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
        let g = flatten(global)?;
        let agg = crate::aggregate::norm_bounded_mean(&g, &refs, &w, self.bound);
        Ok(Some(unflatten(&agg, &layout(global))?))
    }
}
