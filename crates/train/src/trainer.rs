//! One optimizer step over k micro-batches. Accumulation is exact: each micro-batch's mean loss
//! is weighted by its share of the step's target tokens, so the summed gradient equals the
//! gradient of the mean loss over the whole (big) batch — unlike FS-LLM, whose accumulation only
//! multiplies the number of batches.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use fedllm_model::{Batch, CausalLm};
use fedllm_peft::Adapter;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{global_norm, Optimizer, OptimizerConfig};
use crate::schedule::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            optimizer: OptimizerConfig::adamw(0.0),
            schedule: Schedule::constant(),
            grad_accum: 1,
            max_grad_norm: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Real (unpadded) tokens processed.
    pub tokens: usize,
    pub target_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// The step was skipped because the loss or the gradients were not finite.
    pub skipped: bool,
}

pub struct Trainer {
    pub config: TrainConfig,
    /// FedProx: μ and the round's global parameters; adds μ(w − w_global) to every gradient.
    pub proximal: Option<(f64, BTreeMap<String, Tensor>)>,
    /// Only these of the adapter's tensors are updated (None: all); the others stay as they
    /// are (FedRep's phases, FFA-LoRA's frozen A), also for weight decay and clipping.
    pub trainable: Option<std::collections::BTreeSet<String>>,
    pub optimizer: Optimizer,
    /// Optimizer steps taken (skipped steps excluded).
    pub step: usize,
    pub nan_skipped: usize,
}

impl Trainer {
    pub fn new(config: TrainConfig) -> Result<Self> {
        if config.grad_accum == 0 {
            return Err(TrainError::Config("grad_accum must be at least 1".into()));
        }
        if !(config.lr.is_finite() && config.lr >= 0.0) {
            return Err(TrainError::Config(format!(
                "learning rate must be a finite number >= 0, got {}",
                config.lr
            )));
        }
        Ok(Self {
            optimizer: Optimizer::new(config.optimizer.clone()),
            config,
            proximal: None,
            trainable: None,
            step: 0,
            nan_skipped: 0,
        })
    }

    pub fn lr(&self) -> f64 {
        self.config.lr * self.config.schedule.factor(self.step)
    }

    /// Loss and summed gradients over the micro-batches (no update). The model must carry the
    /// adapter (`Adapter::attach`) when it is LoRA or full.
    pub fn gradients(
        &self,
        model: &CausalLm,
        adapter: &Adapter,
        micro: &[Batch],
    ) -> Result<(f64, BTreeMap<String, Tensor>, usize)> {
        let counts: Vec<usize> = micro
            .iter()
            .map(|b| b.target_tokens())
            .collect::<candle_core::Result<_>>()?;
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Err(TrainError::Config("the batch has no target tokens".into()));
        }
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        for (b, &n) in micro.iter().zip(&counts) {
            if n == 0 {
                continue;
            }
            let (loss, _) = adapter.loss(model, b)?;
            let weighted = (loss * (n as f64 / total as f64))?;
            let v = weighted
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            loss_sum += v;
            if !v.is_finite() {
                return Ok((f64::NAN, grads, total));
            }
            let g = weighted.backward()?;
            for (name, var) in &adapter.params {
                if let Some(gt) = g.get(var.as_tensor()) {
                    let gt = gt.to_dtype(candle_core::DType::F32)?;
                    let acc = match grads.remove(name) {
                        Some(a) => (a + gt)?,
                        None => gt,
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        Ok((loss_sum, grads, total))
    }

    /// One optimizer step over `micro` (grad_accum micro-batches).
    pub fn train_step(
        &mut self,
        model: &CausalLm,
        adapter: &Adapter,
        micro: &[Batch],
    ) -> Result<StepStats> {
        let t0 = Instant::now();
        let tokens: usize = micro.iter().map(|b| b.tokens()).sum();
        let lr = self.lr();
        let (loss, mut grads, target_tokens) = self.gradients(model, adapter, micro)?;
        if let Some(t) = &self.trainable {
            grads.retain(|k, _| t.contains(k));
        }
        if let (Some((mu, anchor)), true) = (&self.proximal, loss.is_finite()) {
            for (name, g) in grads.iter_mut() {
                if let Some(w0) = anchor.get(name) {
                    let w = adapter.params[name].as_tensor();
                    *g = (&*g + ((w - w0.to_device(w.device())?)? * *mu)?)?;
                }
            }
        }
        let mut norm = if loss.is_finite() {
            global_norm(&grads)?
        } else {
            f64::NAN
        };
        let skipped = !loss.is_finite() || !norm.is_finite();
        if skipped {
            self.nan_skipped += 1;
        } else {
            if let Some(max) = self.config.max_grad_norm {
                if norm > max {
                    let c = max / (norm + 1e-6);
                    for g in grads.values_mut() {
                        *g = (&*g * c)?;
                    }
                }
            }
            self.optimizer.step(&adapter.params, &grads, lr)?;
            self.step += 1;
        }
        if skipped {
            norm = f64::NAN;
        }
        let seconds = t0.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            tokens,
            target_tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds,
            skipped,
        })
    }
}
