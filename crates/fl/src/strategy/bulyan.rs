//! Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed mean around the median.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::error::{FlError, Result};
use crate::params::{layout, unflatten, ParamSet};

pub struct Bulyan {
    /// Assumed number of Byzantine clients f (needs at least 4f + 3 results).
    pub byzantine: usize,
}

impl Strategy for Bulyan {
    fn name(&self) -> &'static str {
        "bulyan"
    }

    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        if results.is_empty() {
            return Ok(None);
        }
        let (flats, _) = flat_results(results)?;
        let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
        let agg = crate::aggregate::bulyan(&refs, self.byzantine).ok_or_else(|| {
            FlError::Protocol(format!(
                "round {round}: bulyan with federate.krum_byzantine = {} needs at least {} results, got {}",
                self.byzantine,
                4 * self.byzantine + 3,
                results.len()
            ))
        })?;
        Ok(Some(unflatten(&agg, &layout(global))?))
    }
}
