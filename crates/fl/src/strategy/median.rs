//! Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{layout, unflatten, ParamSet};

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
        if results.is_empty() {
            return Ok(None);
        }
        let (flats, _) = flat_results(results)?;
        let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
        Ok(Some(unflatten(
            &crate::aggregate::median(&refs),
            &layout(global),
        )?))
    }
}
