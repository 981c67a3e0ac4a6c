//! Ditto (Li et al. 2021): the client trains the global adapter as FedAvg does (that is what it
//! sends), and its own personal adapter p on the same data with λ/2·‖p − g‖² pulling it towards
//! the global adapter g it received. p starts as the first global it sees.

use fedllm_data::Sample;
use fedllm_rng::Rng;
use fedllm_train::finetune::Budget;
use fedllm_train::StepStats;

use super::{personal_set, store_personal};
use crate::client::{train, Local, Shared};
use crate::error::Result;
use crate::params::ParamSet;
use crate::strategy::FitConfig;

pub fn fit(
    s: &Shared,
    samples: &[Sample],
    global: &ParamSet,
    config: &FitConfig,
    seed: u64,
    state: &mut ParamSet,
) -> Result<(Vec<StepStats>, ParamSet)> {
    let l = Local {
        start: global,
        config,
        seed,
        trainable: None,
        budget: None,
        proximal: (config.proximal_mu > 0.0).then(|| (config.proximal_mu, global.clone())),
    };
    let (stats, trained) = train(s, samples, l)?;
    let p0 = personal_set(state).unwrap_or_else(|| global.clone());
    let l = Local {
        start: &p0,
        config,
        seed: Rng::derive(&[seed, 1]),
        trainable: None,
        budget: Some(Budget::Steps(s.personal.personal_steps)),
        proximal: Some((s.personal.lambda, global.clone())),
    };
    let (_, p) = train(s, samples, l)?;
    store_personal(state, p);
    Ok((stats, trained))
}
