//! FedAvg (McMahan et al. 2017): the sample-weighted mean of the clients' parameters.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::aggregate::weighted_mean;
use crate::error::Result;
use crate::params::{layout, unflatten, ParamSet};

pub struct FedAvg;

/// Shared by the strategies that start from the weighted mean.
pub(crate) fn weighted_average(
    global: &ParamSet,
    results: &[FitResult],
) -> Result<Option<Vec<f32>>> {
    if results.is_empty() {
        return Ok(None);
    }
    let _ = global;
    let (flats, w) = flat_results(results)?;
    let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
    Ok(Some(weighted_mean(&refs, &w)))
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate_fit(
        &mut self,
        _round: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        match weighted_average(global, results)? {
            Some(avg) => Ok(Some(unflatten(&avg, &layout(global))?)),
            None => Ok(None),
        }
    }
}
