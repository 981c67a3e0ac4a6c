//! Emulator alignment (FS-LLM's `emu_align`): before the rounds, the server distils the full
//! model's middle layers into the emulator's kept middle on its own data. The teacher t is the
//! full middle's output, the student s the emulator middle's, both on the same input: the
//! residual stream after the (shared, frozen) first layers.

use std::time::Instant;

use candle_core::{DType, Tensor};
use fedllm_data::{batches, BatchOptions, Sample};
use fedllm_model::{Batch, CausalLm};
use fedllm_peft::full::FullConfig;
use fedllm_peft::{Adapter, AdapterConfig};
use fedllm_train::optim::{Optimizer, OptimizerConfig};

use super::Layout;
use crate::error::{FlError, Result};

#[derive(Debug, Clone)]
pub struct AlignCfg {
    pub steps: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub kd_weight: f64,
    pub lm_weight: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AlignReport {
    /// Mean KD loss on the held-out samples before and after alignment (None: none held out).
    pub kd_before: Option<f64>,
    pub kd_after: Option<f64>,
    /// The training objective at the first and the last step.
    pub first_loss: f64,
    pub last_loss: f64,
    pub steps: usize,
    pub seconds: f64,
}

/// FS-LLM's KD loss over the real tokens (mask [B, T], 1 = token): mean(((t − s)/sqrt(mean(t²)))²),
/// both means over every real token's hidden values. Padding carries no signal, so unlike
/// FS-LLM (which pads nothing away) it is left out.
pub fn kd_loss(t: &Tensor, s: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let h = t.dim(2)? as f64;
    let m = mask.to_dtype(t.dtype())?.unsqueeze(2)?;
    let count = (m.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? * h).max(1.0);
    let t = t.detach();
    let scale = (t.sqr()?.broadcast_mul(&m)?.sum_all()? / count)?;
    let diff = (t - s)?.sqr()?.broadcast_mul(&m)?.sum_all()?;
    (diff / count)? / scale
}

fn mask_tensor(b: &Batch, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    let rows: Vec<Vec<f32>> = b
        .mask
        .iter()
        .map(|r| r.iter().map(|&x| x as f32).collect())
        .collect();
    Tensor::new(rows, device)
}

/// (KD loss, LM loss when weighted) of one batch: the student is `emulator`'s kept middle.
fn losses(
    full: &CausalLm,
    emulator: &CausalLm,
    layout: &Layout,
    b: &Batch,
    lm: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let l = layout.middle[0];
    let r = layout.middle[layout.middle.len() - 1] + 1;
    let (x, ctx) = full.stream_in(&b.input_ids, Some(&b.mask))?;
    let bottom = full.run_layers(x, &ctx, &|i| i < l)?.detach();
    let t = full.run_layers(bottom.clone(), &ctx, &|i| (l..r).contains(&i))?;
    let s = emulator.run_layers(bottom, &ctx, &|i| layout.kept.contains(&i))?;
    let kd = kd_loss(&t, &s, &mask_tensor(b, &full.device)?)?;
    let lm = if lm {
        let top = emulator.run_layers(s, &ctx, &|i| i >= r)?;
        let hidden = emulator.final_norm(&top)?;
        Some(emulator.loss_from_hidden(&hidden, &b.labels)?.0)
    } else {
        None
    };
    Ok((kd, lm))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Mean KD loss over `held` (weighted by batch, each batch a mean over its tokens).
pub fn held_out_kd(
    full: &CausalLm,
    emulator: &CausalLm,
    layout: &Layout,
    held: &[Batch],
) -> Result<Option<f64>> {
    if held.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0;
    for b in held {
        sum += scalar(&losses(full, emulator, layout, b, false)?.0)?;
    }
    Ok(Some(sum / held.len() as f64))
}

/// Trains the emulator's kept middle layers in place (AdamW, `cfg.steps` steps over `train`,
/// reshuffled each pass with the seed).
pub fn align(
    full: &CausalLm,
    emulator: &mut CausalLm,
    layout: &Layout,
    train: &[Sample],
    held: &[Sample],
    cfg: &AlignCfg,
    pad_id: u32,
) -> Result<AlignReport> {
    let t0 = Instant::now();
    if layout.kept.is_empty() {
        return Err(FlError::Config(
            "offsite alignment: the emulator keeps no middle layer to train (lower offsite.drop_ratio)".into(),
        ));
    }
    if train.is_empty() {
        return Err(FlError::Config(
            "offsite alignment: offsite.align_data has no training samples".into(),
        ));
    }
    let dev = full.device.clone();
    let opts = |seed: Option<u64>| BatchOptions {
        batch_size: cfg.batch_size,
        pad_id,
        shuffle_seed: seed,
        group_by_length: false,
    };
    let held = batches(held, &opts(None), &dev)?;
    let kd_before = held_out_kd(full, emulator, layout, &held)?;
    let student = Adapter::init(
        emulator,
        AdapterConfig::Full(FullConfig {
            patterns: vec![],
            layers: Some(layout.kept.clone()),
            non_layer: false,
        }),
        cfg.seed,
        None,
    )?;
    student.attach(emulator, true)?;
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.0));
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut pass = 0u64;
    let mut queue: Vec<Batch> = Vec::new();
    for step in 0..cfg.steps {
        if queue.is_empty() {
            queue = batches(train, &opts(Some(cfg.seed ^ pass)), &dev)?;
            queue.reverse();
            pass += 1;
        }
        let b = queue.pop().expect("refilled");
        let (kd, lm) = losses(full, emulator, layout, &b, cfg.lm_weight > 0.0)?;
        let mut loss = (kd * cfg.kd_weight)?;
        if let Some(lm) = lm {
            loss = (loss + (lm * cfg.lm_weight)?)?;
        }
        let v = scalar(&loss)?;
        if !v.is_finite() {
            return Err(FlError::Config(format!(
                "offsite alignment: the loss is {v} at step {step} (lower offsite.align_lr)"
            )));
        }
        if step == 0 {
            first = v;
        }
        last = v;
        let g = loss.backward()?;
        let grads = student
            .params
            .iter()
            .filter_map(|(n, var)| g.get(var.as_tensor()).map(|t| (n.clone(), t.clone())))
            .collect();
        opt.step(&student.params, &grads, cfg.lr)?;
    }
    student.attach(emulator, false)?;
    let kd_after = held_out_kd(full, emulator, layout, &held)?;
    Ok(AlignReport {
        kd_before,
        kd_after,
        first_loss: first,
        last_loss: last,
        steps: cfg.steps,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
