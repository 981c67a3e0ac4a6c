//! Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed mean around the median.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::error::{FlError, Result};
use crate::params::ParamSet;

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
        aggregate_flat(global, results, |u, _| {
            crate::aggregate::bulyan(u, self.byzantine).ok_or_else(|| {
                FlError::Protocol(format!(
                    "round {round}: bulyan with federate.krum_byzantine = {} needs at least {} results, got {}",
                    self.byzantine,
                    4 * self.byzantine + 3,
                    u.len()
                ))
            })
        })
    }
}
