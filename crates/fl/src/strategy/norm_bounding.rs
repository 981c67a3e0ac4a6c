//! Norm bounding (Sun et al. 2019): each client's update is clipped to an L2 norm before the
//! sample-weighted mean, so no single client can move the model far.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{flatten, ParamSet};

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
        let g = flatten(global)?;
        aggregate_flat(global, results, |u, w| {
            Ok(crate::aggregate::norm_bounded_mean(&g, u, w, self.bound))
        })
    }
}
