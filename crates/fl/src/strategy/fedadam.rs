//! FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"), as Flower implements it:
//! Δ = mean(w_i) − w; m ← β₁m + (1−β₁)Δ; v ← β₂v + (1−β₂)Δ²; w ← w + η m / (√v + τ).

use super::fedavgm::{load_vec, moment, state_of};
use super::{fedavg::weighted_average, Failure, FitResult, Strategy};
use crate::error::Result;
use crate::params::{flatten, layout, unflatten, ParamSet};

pub struct FedAdam {
    pub(crate) eta: f64,
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) tau: f64,
    pub(crate) m: Option<Vec<f32>>,
    pub(crate) v: Option<Vec<f32>>,
}

impl FedAdam {
    pub fn new(eta: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        Self {
            eta,
            beta1,
            beta2,
            tau,
            m: None,
            v: None,
        }
    }
}

/// The adaptive update shared with FedYogi; `second` updates v from (v, Δ²).
pub(crate) fn adaptive_step(
    s: &mut FedAdam,
    global: &ParamSet,
    results: &[FitResult],
    second: impl Fn(f32, f32, f32) -> f32,
) -> Result<Option<ParamSet>> {
    let Some(avg) = weighted_average(global, results)? else {
        return Ok(None);
    };
    let g = flatten(global)?;
    let n = g.len();
    let m = moment(&mut s.m, n)?;
    let v = moment(&mut s.v, n)?;
    let (b1, b2, eta, tau) = (s.beta1 as f32, s.beta2 as f32, s.eta as f32, s.tau as f32);
    let mut out = g.clone();
    for i in 0..n {
        let d = avg[i] - g[i];
        m[i] = b1 * m[i] + (1.0 - b1) * d;
        v[i] = second(v[i], d * d, b2);
        out[i] = g[i] + eta * m[i] / (v[i].sqrt() + tau);
    }
    Ok(Some(unflatten(&out, &layout(global))?))
}

impl Strategy for FedAdam {
    fn name(&self) -> &'static str {
        "fedadam"
    }

    fn aggregate_fit(
        &mut self,
        _r: usize,
        global: &ParamSet,
        results: &[FitResult],
        _f: &[Failure],
    ) -> Result<Option<ParamSet>> {
        adaptive_step(self, global, results, |v, d2, b2| b2 * v + (1.0 - b2) * d2)
    }

    fn state(&self) -> Result<ParamSet> {
        state_of(&[("m", &self.m), ("v", &self.v)])
    }

    fn load_state(&mut self, s: &ParamSet) -> Result<()> {
        self.m = load_vec(s, "m")?;
        self.v = load_vec(s, "v")?;
        Ok(())
    }
}
