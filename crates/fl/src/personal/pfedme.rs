//! pFedMe (T. Dinh et al. 2020), as its reference code runs it: each round the client's local
//! copy w and its personal θ start from the global adapter; at every local step θ takes K SGD
//! steps (`personal.inner_steps`, lr `personal.personal_lr`) on the step's batch for
//! f(θ) + λ/2·‖θ − w‖², then w ← w − η·λ·(w − θ). w is sent; θ stays as the client's personal
//! adapter. The server mixes: w ← (1 − β)·w + β·mean(wᵢ) (`strategy::pfedme`).

use fedllm_data::{batches, BatchOptions, Sample};
use fedllm_train::finetune::Budget;
use fedllm_train::{OptimizerConfig, Schedule, StepStats, TrainConfig, Trainer};

use super::store_personal;
use crate::client::{snapshot, Shared};
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
    let p = s.personal;
    let steps = match (s.budget, config.local_steps) {
        (_, Some(n)) | (Budget::Steps(n), None) => n,
        // The config check refuses epochs for pFedMe.
        (Budget::Epochs(n), None) => n,
    };
    // The outer step η follows the run's schedule; θ's solver is plain SGD at a fixed lr.
    let mut outer = s.train.clone();
    if let Some(lr) = config.lr {
        outer.lr = lr;
    }
    let mut outer = Trainer::new(outer)?;
    let inner_cfg = TrainConfig {
        lr: p.personal_lr,
        optimizer: OptimizerConfig::Sgd {
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        schedule: Schedule::constant(),
        grad_accum: s.train.grad_accum,
        max_grad_norm: s.train.max_grad_norm,
    };
    s.adapter.reseed(seed);
    let mut w = global.clone();
    let mut theta = global.clone();
    let mut stats = Vec::with_capacity(steps);
    let mut epoch = 0u64;
    'steps: while stats.len() < steps {
        let bo = BatchOptions {
            batch_size: s.batch_size,
            pad_id: s.pad_id,
            shuffle_seed: Some(seed.wrapping_add(epoch)),
            group_by_length: false,
        };
        let all = batches(samples, &bo, &s.model.device)?;
        for micro in all.chunks(s.train.grad_accum) {
            s.adapter.set_tensors(&theta)?;
            let mut inner = Trainer::new(inner_cfg.clone())?;
            inner.proximal = Some((p.lambda, w.clone()));
            let mut last = None;
            for _ in 0..p.inner_steps {
                last = Some(inner.train_step(s.model, s.adapter, micro)?);
            }
            theta = snapshot(s.adapter)?;
            outer.step = config.start_step + stats.len();
            let eta = outer.lr();
            let mut st = last.expect("inner_steps >= 1");
            if !st.skipped {
                for (k, wt) in w.iter_mut() {
                    *wt = (&*wt - ((&*wt - &theta[k])? * (eta * p.lambda))?)?;
                }
            }
            st.lr = eta;
            stats.push(st);
            if stats.len() == steps {
                break 'steps;
            }
        }
        epoch += 1;
    }
    store_personal(state, theta);
    Ok((stats, w))
}
