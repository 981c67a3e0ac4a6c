//! Workload W1 (../shared/anchors/README.md): one LoRA step on SmolLM2-135M — r=8, alpha=16 on
//! q_proj/v_proj, frozen base, batch 4 × 256 random tokens all carrying loss, AdamW(lr=1e-4).

use std::time::Instant;

use candle_core::{Device, Tensor};
use fedllm_model::{Batch, CausalLm};
use fedllm_peft::lora::LoraConfig;
use fedllm_peft::{Adapter, AdapterConfig};
use fedllm_rng::Rng;

use crate::error::Result;
use crate::trainer::{TrainConfig, Trainer};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub batch: usize,
    pub seq: usize,
    pub step_seconds: Vec<f64>,
    pub median_step_s: f64,
    pub tokens_per_s: f64,
    pub losses: Vec<f64>,
}

/// `steps` measured steps after one warm-up step; returns the median.
pub fn bench_train(
    model: &mut CausalLm,
    batch: usize,
    seq: usize,
    steps: usize,
) -> Result<TrainBench> {
    let cfg = AdapterConfig::Lora(LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]));
    let adapter = Adapter::init(model, cfg, 0, None)?;
    adapter.attach(model, true)?;
    let mut trainer = Trainer::new(TrainConfig::default())?;
    let vocab = model.config.vocab_size() as u64;
    let mut rng = Rng::new(0);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..=steps {
        let ids: Vec<u32> = (0..batch * seq)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let b = Batch {
            input_ids: Tensor::from_vec(ids, (batch, seq), &model.device)?,
            mask: vec![vec![1u8; seq]; batch],
            labels: Tensor::from_vec(labels, (batch, seq), &Device::Cpu)?
                .to_device(&model.device)?,
        };
        let t0 = Instant::now();
        let s = trainer.train_step(model, &adapter, &[b])?;
        let dt = t0.elapsed().as_secs_f64();
        eprintln!("step {step}: loss {:.4} {dt:.3}s", s.loss);
        if step > 0 {
            times.push(dt);
            losses.push(s.loss);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    Ok(TrainBench {
        batch,
        seq,
        step_seconds: times,
        median_step_s: median,
        tokens_per_s: (batch * seq) as f64 / median,
        losses,
    })
}
