//! FedAvgM (Hsu et al. 2019): server momentum on the pseudo-gradient Δ = w_global − mean(w_i):
//! v ← βv + Δ; w ← w − η v.

use super::{fedavg::weighted_average, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{flatten, layout, unflatten, ParamSet};

pub struct FedAvgM {
    lr: f64,
    momentum: f64,
    v: Option<Vec<f32>>,
}

impl FedAvgM {
    pub fn new(lr: f64, momentum: f64) -> Self {
        Self {
            lr,
            momentum,
            v: None,
        }
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn aggregate_fit(
        &mut self,
        _round: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        let Some(avg) = weighted_average(global, results)? else {
            return Ok(None);
        };
        let g = flatten(global)?;
        let v = moment(&mut self.v, g.len())?;
        let (b, lr) = (self.momentum as f32, self.lr as f32);
        let mut out = g.clone();
        for i in 0..g.len() {
            let delta = g[i] - avg[i];
            v[i] = b * v[i] + delta;
            out[i] = g[i] - lr * v[i];
        }
        Ok(Some(unflatten(&out, &layout(global))?))
    }

    fn state(&self) -> Result<ParamSet> {
        state_of(&[("v", &self.v)])
    }

    fn load_state(&mut self, s: &ParamSet) -> Result<()> {
        self.v = load_vec(s, "v")?;
        Ok(())
    }
}

/// A server optimiser's per-value state for `n` values (zeros at first). A different length
/// means the aggregated tensors changed between rounds (per-client tensor subsets that vary),
/// which a stateful server optimiser cannot follow: an error, not a wrong update.
pub(crate) fn moment(slot: &mut Option<Vec<f32>>, n: usize) -> Result<&mut Vec<f32>> {
    let v = slot.get_or_insert_with(|| vec![0.0; n]);
    if v.len() != n {
        return Err(crate::error::FlError::Protocol(format!(
            "the server optimiser's state covers {} values but this round aggregates {n}: a stateful strategy needs the same shared tensors every round",
            v.len()
        )));
    }
    Ok(v)
}

pub(crate) fn state_of(vs: &[(&str, &Option<Vec<f32>>)]) -> Result<ParamSet> {
    let mut p = ParamSet::new();
    for (k, v) in vs {
        if let Some(v) = v {
            p.insert(
                k.to_string(),
                candle_core::Tensor::from_slice(v, v.len(), &candle_core::Device::Cpu)?,
            );
        }
    }
    Ok(p)
}

pub(crate) fn load_vec(s: &ParamSet, k: &str) -> Result<Option<Vec<f32>>> {
    Ok(match s.get(k) {
        Some(t) => Some(t.to_vec1::<f32>()?),
        None => None,
    })
}
