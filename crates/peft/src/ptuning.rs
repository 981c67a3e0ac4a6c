//! P-tuning: Liu et al. 2021, "GPT Understands, Too"; PEFT's `PromptEncoder` with the MLP
//! reparameterisation: virtual embeddings pass through Linear-ReLU-Linear-ReLU-Linear.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedllm_model::CausalLm;
use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::error::{cfg, Result};
use crate::prompt::{hidden_size, normal, EMBEDDING};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PtuningConfig {
    pub num_virtual_tokens: usize,
    pub encoder_hidden_size: usize,
}

fn head(i: usize, wb: &str) -> String {
    format!("prompt_encoder.mlp_head.{i}.{wb}")
}

/// torch's nn.Linear init: weight and bias uniform in ±1/sqrt(in).
pub(crate) fn linear_init(rng: &mut Rng, out: usize, inp: usize) -> Result<(Tensor, Tensor)> {
    let b = 1.0 / (inp as f64).sqrt();
    let w: Vec<f32> = (0..out * inp).map(|_| rng.uniform(b) as f32).collect();
    let bias: Vec<f32> = (0..out).map(|_| rng.uniform(b) as f32).collect();
    Ok((
        Tensor::from_vec(w, (out, inp), &Device::Cpu)?,
        Tensor::from_vec(bias, out, &Device::Cpu)?,
    ))
}

pub(crate) fn init(
    model: &CausalLm,
    c: &PtuningConfig,
    rng: &mut Rng,
) -> Result<BTreeMap<String, Tensor>> {
    if c.num_virtual_tokens == 0 || c.encoder_hidden_size == 0 {
        return Err(cfg(
            "p-tuning needs num_virtual_tokens and encoder_hidden_size of at least 1",
        ));
    }
    let (h, e) = (hidden_size(model), c.encoder_hidden_size);
    let mut out = BTreeMap::from([(
        EMBEDDING.to_string(),
        normal(rng, (c.num_virtual_tokens, h))?,
    )]);
    for (i, (o, inp)) in [(0, (e, h)), (2, (e, e)), (4, (h, e))] {
        let (w, b) = linear_init(rng, o, inp)?;
        out.insert(head(i, "weight"), w);
        out.insert(head(i, "bias"), b);
    }
    Ok(out)
}

/// The MLP's output for every virtual token: [n, hidden].
pub(crate) fn embeddings(a: &Adapter, _c: &PtuningConfig) -> Result<Tensor> {
    let mut x = a.var(EMBEDDING)?.as_tensor().clone();
    for i in [0, 2, 4] {
        let w = a.var(&head(i, "weight"))?.as_tensor();
        let b = a.var(&head(i, "bias"))?.as_tensor();
        x = x.matmul(&w.t()?)?.broadcast_add(b)?;
        if i != 4 {
            x = x.relu()?;
        }
    }
    Ok(x)
}
