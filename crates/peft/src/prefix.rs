//! Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
//! Generation"; PEFT's `PrefixEncoder`. Every layer attends to trainable virtual keys/values,
//! laid out as PEFT lays out `past_key_values`: [n, layers × 2 × kv_heads × head_dim], K then V.

use std::collections::BTreeMap;

use candle_core::Tensor;
use fedllm_model::{CausalLm, ModelConfig};
use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::error::{cfg, Result};
use crate::prompt::{normal, EMBEDDING};
use crate::ptuning::linear_init;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// Reparameterise through Linear-Tanh-Linear (PEFT's `prefix_projection`).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden size of the projection MLP; None = the token dimension (PEFT's default).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
}

impl PrefixConfig {
    pub fn hidden(&self, model: &CausalLm) -> usize {
        let (_, kv, hd) = geometry(model);
        self.encoder_hidden_size.unwrap_or(kv * hd)
    }
}

/// (layers, kv heads, head dim) of the model as built.
pub fn geometry(model: &CausalLm) -> (usize, usize, usize) {
    let layers = model.layer_ids().len();
    match &model.config {
        ModelConfig::Llama(c) => (layers, c.num_kv_heads, c.head_dim),
        ModelConfig::Gpt2(c) => (layers, c.num_heads, c.hidden_size / c.num_heads),
    }
}

fn transform(i: usize, wb: &str) -> String {
    format!("prompt_encoder.transform.{i}.{wb}")
}

pub(crate) fn init(
    model: &CausalLm,
    c: &PrefixConfig,
    rng: &mut Rng,
) -> Result<BTreeMap<String, Tensor>> {
    if c.num_virtual_tokens == 0 {
        return Err(cfg("num_virtual_tokens must be at least 1"));
    }
    let (l, kv, hd) = geometry(model);
    let token_dim = kv * hd;
    let full = l * 2 * token_dim;
    if !c.prefix_projection {
        return Ok(BTreeMap::from([(
            EMBEDDING.to_string(),
            normal(rng, (c.num_virtual_tokens, full))?,
        )]));
    }
    let mut out = BTreeMap::from([(
        EMBEDDING.to_string(),
        normal(rng, (c.num_virtual_tokens, token_dim))?,
    )]);
    let eh = c.hidden(model);
    for (i, (o, inp)) in [(0, (eh, token_dim)), (2, (full, eh))] {
        let (w, b) = linear_init(rng, o, inp)?;
        out.insert(transform(i, "weight"), w);
        out.insert(transform(i, "bias"), b);
    }
    Ok(out)
}

/// [n, layers × 2 × kv_heads × head_dim]: what PEFT saves as `prompt_embeddings`.
pub(crate) fn embeddings(a: &Adapter, c: &PrefixConfig) -> Result<Tensor> {
    let e = a.var(EMBEDDING)?.as_tensor().clone();
    if !c.prefix_projection {
        return Ok(e);
    }
    let lin = |x: &Tensor, i: usize| -> Result<Tensor> {
        let w = a.var(&transform(i, "weight"))?.as_tensor();
        let b = a.var(&transform(i, "bias"))?.as_tensor();
        Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
    };
    lin(&lin(&e, 0)?.tanh()?, 2)
}

/// Per-layer (K, V), each [batch, kv_heads, n, head_dim] in the model's dtype.
pub(crate) fn key_values(
    a: &Adapter,
    c: &PrefixConfig,
    model: &CausalLm,
    batch: usize,
) -> Result<Vec<(Tensor, Tensor)>> {
    let (l, kv, hd) = geometry(model);
    let n = c.num_virtual_tokens;
    let e = embeddings(a, c)?.to_dtype(model.dtype)?;
    // [n, L*2, kv, hd] → [L*2, kv, n, hd]
    let e = e.reshape((n, l * 2, kv, hd))?.permute((1, 2, 0, 3))?;
    let mut out = Vec::with_capacity(l);
    for i in 0..l {
        let k = e
            .get(2 * i)?
            .unsqueeze(0)?
            .broadcast_as((batch, kv, n, hd))?
            .contiguous()?;
        let v = e
            .get(2 * i + 1)?
            .unsqueeze(0)?
            .broadcast_as((batch, kv, n, hd))?
            .contiguous()?;
        out.push((k, v));
    }
    Ok(out)
}
