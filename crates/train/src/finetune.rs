//! Local fine-tuning end to end (what `fedllm finetune` runs and what a client runs each round):
//! records → tokenised samples → batches → optimizer steps, with held-out loss.

use std::path::PathBuf;

use candle_core::Device;
use fedllm_data::{batches, BatchOptions, Sample};
use fedllm_model::{Batch, CausalLm};
use fedllm_peft::Adapter;

use crate::error::{Result, TrainError};
use crate::trainer::{StepStats, Trainer};

/// How long to train: optimizer steps, or whole passes over the data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Steps(usize),
    Epochs(usize),
}

#[derive(Debug, Clone)]
pub struct LoopOptions {
    pub budget: Budget,
    pub batch_size: usize,
    pub pad_id: u32,
    pub seed: u64,
    pub group_by_length: bool,
    /// Where to append one JSON line per step (None = nowhere).
    pub metrics: Option<PathBuf>,
}

/// Mean next-token loss over `batches`, weighted by target tokens (no gradients kept).
pub fn eval_loss(model: &CausalLm, adapter: &Adapter, batches: &[Batch]) -> Result<(f64, usize)> {
    let mut sum = 0f64;
    let mut n = 0usize;
    for b in batches {
        let (loss, count) = adapter.loss(model, b)?;
        sum += loss
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?
            * count as f64;
        n += count;
    }
    if n == 0 {
        return Err(TrainError::Config(
            "evaluation data has no target tokens".into(),
        ));
    }
    Ok((sum / n as f64, n))
}

/// The held-out loss every command reports: the token-weighted mean NLL of the samples'
/// response tokens (as tokenized, i.e. within their `tok_len`), with the adapter when given.
pub fn heldout_loss(
    model: &CausalLm,
    adapter: Option<&Adapter>,
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    let batches = eval_batches(samples, batch_size, pad_id, &model.device)?;
    if let Some(a) = adapter {
        return eval_loss(model, a, &batches);
    }
    let (mut sum, mut n) = (0f64, 0usize);
    for b in &batches {
        let h = model.forward_hidden(&b.input_ids, Some(&b.mask), None)?;
        let (l, c) = model.loss_from_hidden(&h, &b.labels)?;
        sum += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * c as f64;
        n += c;
    }
    if n == 0 {
        return Err(TrainError::Config(
            "evaluation data has no target tokens".into(),
        ));
    }
    Ok((sum / n as f64, n))
}

/// Batches of `samples` for evaluation (fixed order).
pub fn eval_batches(
    samples: &[Sample],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Vec<Batch>> {
    let o = BatchOptions {
        batch_size,
        pad_id,
        shuffle_seed: None,
        group_by_length: true,
    };
    batches(samples, &o, device).map_err(|e| TrainError::Config(e.to_string()))
}

/// Trains until the budget is spent; calls `on_step` after every optimizer step.
pub fn train_loop(
    model: &CausalLm,
    adapter: &Adapter,
    trainer: &mut Trainer,
    samples: &[Sample],
    o: &LoopOptions,
    mut on_step: impl FnMut(&StepStats),
) -> Result<Vec<StepStats>> {
    if samples.is_empty() {
        return Err(TrainError::Config("no training samples".into()));
    }
    if matches!(o.budget, Budget::Steps(0) | Budget::Epochs(0)) {
        return Err(TrainError::Config(
            "--steps / --epochs must be at least 1".into(),
        ));
    }
    let k = trainer.config.grad_accum;
    let mut out = Vec::new();
    let mut metrics = match &o.metrics {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| TrainError::Config(format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut epoch = 0u64;
    let mut steps_done = 0usize;
    loop {
        let bo = BatchOptions {
            batch_size: o.batch_size,
            pad_id: o.pad_id,
            shuffle_seed: Some(o.seed.wrapping_add(epoch)),
            group_by_length: o.group_by_length,
        };
        let all =
            batches(samples, &bo, &model.device).map_err(|e| TrainError::Config(e.to_string()))?;
        for micro in all.chunks(k) {
            let s = trainer.train_step(model, adapter, micro)?;
            if let Some(f) = metrics.as_mut() {
                use std::io::Write;
                let line = serde_json::to_string(&s).expect("json");
                writeln!(f, "{line}").map_err(|e| TrainError::Config(format!("metrics: {e}")))?;
            }
            on_step(&s);
            out.push(s);
            steps_done += 1;
            if o.budget == Budget::Steps(steps_done) {
                return Ok(out);
            }
        }
        epoch += 1;
        if o.budget == Budget::Epochs(epoch as usize) {
            return Ok(out);
        }
    }
}
