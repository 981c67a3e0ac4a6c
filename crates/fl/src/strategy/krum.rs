//! (Multi-)Krum (Blanchard et al. 2017): keep the updates closest to their neighbours.

use super::{aggregate_flat, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::ParamSet;

pub struct Krum {
    /// Assumed number of Byzantine clients f.
    pub byzantine: usize,
    /// Updates averaged (1 = Krum, more = Multi-Krum).
    pub select: usize,
}

impl Strategy for Krum {
    fn name(&self) -> &'static str {
        "krum"
    }

    fn aggregate_fit(
        &mut self,
        _r: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        if results.len() == 1 {
            return Ok(Some(results[0].params.clone()));
        }
        aggregate_flat(global, results, |u, _| {
            Ok(crate::aggregate::krum(u, self.byzantine, self.select).0)
        })
    }
}
