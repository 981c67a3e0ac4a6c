//! FedRep (Collins et al. 2021) on an adapter: the tensors matching `personal.head` are the
//! client's head; each round it first trains the head alone (`personal.personal_steps`), then
//! the shared representation alone (the round's local steps). Only the representation travels
//! (the server keeps the head patterns out of what it sends). With no head it is FedAvg.

use std::collections::BTreeSet;

use fedllm_data::Sample;
use fedllm_rng::Rng;
use fedllm_train::finetune::Budget;
use fedllm_train::StepStats;

use crate::client::{train, Local, Shared};
use crate::error::Result;
use crate::params::{kept_local, ParamSet};
use crate::strategy::FitConfig;

pub fn fit(
    s: &Shared,
    samples: &[Sample],
    start: &ParamSet,
    config: &FitConfig,
    seed: u64,
) -> Result<(Vec<StepStats>, ParamSet)> {
    let head: BTreeSet<String> = start
        .keys()
        .filter(|k| kept_local(&s.personal.head, k))
        .cloned()
        .collect();
    let proximal = (config.proximal_mu > 0.0).then(|| (config.proximal_mu, start.clone()));
    if head.is_empty() {
        let l = Local {
            start,
            config,
            seed,
            trainable: None,
            budget: None,
            proximal,
        };
        return train(s, samples, l);
    }
    let mut after_head = start.clone();
    if s.personal.personal_steps > 0 {
        let l = Local {
            start,
            config,
            seed: Rng::derive(&[seed, 1]),
            trainable: Some(head.clone()),
            budget: Some(Budget::Steps(s.personal.personal_steps)),
            proximal: None,
        };
        after_head = train(s, samples, l)?.1;
    }
    let body = start
        .keys()
        .filter(|k| !head.contains(*k))
        .cloned()
        .collect();
    let l = Local {
        start: &after_head,
        config,
        seed,
        trainable: Some(body),
        budget: None,
        proximal,
    };
    train(s, samples, l)
}
