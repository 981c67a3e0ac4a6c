//! Differential privacy around a weighted-mean strategy (FedAvg, FedProx): clients clip their
//! updates (told the clip in `FitConfig`); central mode adds the aggregate's Gaussian noise here;
//! adaptive clipping moves C towards a quantile of the update norms; ε so far is reported.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedllm_rng::Rng;

use super::{Failure, FitConfig, FitResult, Strategy};
use crate::config::{DpCfg, DpMode};
use crate::dp;
use crate::error::Result;
use crate::params::ParamSet;

pub struct Dp {
    pub inner: Box<dyn Strategy>,
    pub cfg: DpCfg,
    /// The current clip C (moves when adaptive).
    pub clip: f64,
    pub seed: u64,
    pub clients: usize,
    pub sample: usize,
    rounds: usize,
    last_std: f64,
}

impl Dp {
    pub fn new(
        inner: Box<dyn Strategy>,
        cfg: DpCfg,
        seed: u64,
        clients: usize,
        sample: usize,
    ) -> Self {
        Self {
            clip: cfg.clip,
            inner,
            cfg,
            seed,
            clients,
            sample,
            rounds: 0,
            last_std: 0.0,
        }
    }

    /// The multiplier on the updates: all of z, or z_Δ when σ_b goes to the clipped count.
    fn update_z(&self) -> f64 {
        if !self.cfg.adaptive || self.cfg.noise_multiplier == 0.0 {
            return self.cfg.noise_multiplier;
        }
        dp::update_noise_multiplier(self.cfg.noise_multiplier, self.count_std())
            .unwrap_or(f64::INFINITY)
    }

    fn count_std(&self) -> f64 {
        if self.cfg.count_std > 0.0 {
            self.cfg.count_std
        } else {
            self.sample as f64 / 20.0
        }
    }

    fn rng(&self, round: usize, what: u64) -> Rng {
        Rng::new(self.seed ^ 0xD9_0000_0000 ^ ((round as u64) << 8) ^ what)
    }
}

impl Strategy for Dp {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn configure_fit(&self, round: usize, client: usize) -> FitConfig {
        let mut c = self.inner.configure_fit(round, client);
        c.dp_clip = Some(self.clip);
        if self.cfg.mode == DpMode::Local && self.update_z() > 0.0 {
            c.dp_local_std = self.update_z() * self.clip;
        }
        c
    }

    fn aggregate_fit(
        &mut self,
        round: usize,
        global: &ParamSet,
        results: &[FitResult],
        failures: &[Failure],
    ) -> Result<Option<ParamSet>> {
        let Some(agg) = self.inner.aggregate_fit(round, global, results, failures)? else {
            return Ok(None);
        };
        let total: f64 = results.iter().map(|r| r.num_samples as f64).sum();
        let most = results.iter().map(|r| r.num_samples).max().unwrap_or(0) as f64;
        let agg = if self.cfg.mode == DpMode::Central {
            // One client moves the weighted mean by at most C·(its weight / total weight).
            self.last_std = match self.update_z() {
                0.0 => 0.0, // also with C = ∞: no noise, not ∞·0
                z => z * self.clip * most / total.max(1.0),
            };
            dp::add_noise(agg, self.last_std, &mut self.rng(round, 1))?
        } else {
            agg
        };
        if self.cfg.adaptive && !results.is_empty() {
            let within: f64 = results
                .iter()
                .map(|r| r.metrics.get("dp_within").copied().unwrap_or(0.0))
                .sum();
            let noise = dp::normals(&mut self.rng(round, 2), 1)[0] as f64 * self.count_std();
            let frac = (within + noise) / results.len() as f64;
            self.clip = dp::adapt_clip(self.clip, frac, self.cfg.target_quantile, self.cfg.clip_lr);
        }
        self.rounds = round;
        Ok(Some(agg))
    }

    fn configure_evaluate(&self, round: usize, client: usize) -> Vec<String> {
        self.inner.configure_evaluate(round, client)
    }

    fn aggregate_evaluate(
        &mut self,
        round: usize,
        results: &[super::EvalResult],
    ) -> BTreeMap<String, f64> {
        self.inner.aggregate_evaluate(round, results)
    }

    fn evaluate(
        &mut self,
        round: usize,
        global: &ParamSet,
        loss: &mut dyn FnMut(&ParamSet) -> Result<f64>,
    ) -> Result<Option<f64>> {
        self.inner.evaluate(round, global, loss)
    }

    fn report(&self) -> BTreeMap<String, Vec<f64>> {
        let mut r = self.inner.report();
        let eps = dp::epsilon_of(&self.cfg, self.clients, self.sample, self.rounds);
        r.insert("dp_epsilon".into(), vec![eps]);
        r.insert("dp_clip".into(), vec![self.clip]);
        r.insert("dp_noise_std".into(), vec![self.last_std]);
        r
    }

    fn state(&self) -> Result<ParamSet> {
        let mut s = self.inner.state()?;
        // f64: an adapted clip restores exactly.
        let v = [self.clip, self.rounds as f64];
        s.insert(
            "dp/clip_rounds".into(),
            Tensor::from_slice(&v, 2, &Device::Cpu)?,
        );
        Ok(s)
    }

    fn load_state(&mut self, state: &ParamSet) -> Result<()> {
        let mut inner = state.clone();
        if let Some(t) = inner.remove("dp/clip_rounds") {
            let v: Vec<f64> = t.to_vec1()?;
            self.clip = v[0];
            self.rounds = v[1] as usize;
        }
        self.inner.load_state(&inner)
    }
}
