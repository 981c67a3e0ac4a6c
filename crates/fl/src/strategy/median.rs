//! Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::ParamSet;

pub struct Median;

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }

    fn aggregate_fit(
        &mut self,
        _r: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        aggregate_flat(global, results, |u, _| Ok(crate::aggregate::median(u)))
    }
}
