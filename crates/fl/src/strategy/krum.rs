//! (Multi-)Krum (Blanchard et al. 2017): keep the updates closest to their neighbours.

use super::{flat_results, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{layout, unflatten, ParamSet};

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
        if results.is_empty() {
            return Ok(None);
        }
        let (flats, _) = flat_results(results)?;
        let refs: Vec<&[f32]> = flats.iter().map(|v| v.as_slice()).collect();
        if refs.len() == 1 {
            return Ok(Some(results[0].params.clone()));
        }
        let (agg, _) = crate::aggregate::krum(&refs, self.byzantine, self.select);
        Ok(Some(unflatten(&agg, &layout(global))?))
    }
}
