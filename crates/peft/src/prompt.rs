//! Prompt tuning: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning"; PEFT's `PromptEmbedding`. Trainable virtual token embeddings prepended to the input.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use fedllm_model::{CausalLm, Tokenizer};
use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{cfg, Result};

pub const EMBEDDING: &str = "prompt_encoder.embedding.weight";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    /// Initialise from the embeddings of this text's tokens (repeated/truncated) instead of N(0, 1).
    #[serde(default)]
    pub init_text: Option<String>,
}

pub(crate) fn hidden_size(model: &CausalLm) -> usize {
    match &model.config {
        fedllm_model::ModelConfig::Llama(c) => c.hidden_size,
        fedllm_model::ModelConfig::Gpt2(c) => c.hidden_size,
    }
}

/// N(0, 1) as `nn.Embedding` initialises.
pub(crate) fn normal(rng: &mut Rng, shape: (usize, usize)) -> Result<Tensor> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.normal() as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

pub(crate) fn init(
    model: &CausalLm,
    c: &PromptConfig,
    rng: &mut Rng,
    tokenizer: Option<&Tokenizer>,
) -> Result<BTreeMap<String, Tensor>> {
    let n = c.num_virtual_tokens;
    if n == 0 {
        return Err(cfg("num_virtual_tokens must be at least 1"));
    }
    let emb = match &c.init_text {
        None => normal(rng, (n, hidden_size(model)))?,
        Some(text) => {
            let tok = tokenizer
                .ok_or_else(|| cfg("prompt init from text needs the model's tokenizer"))?;
            let ids = tok.encode(text, false)?;
            if ids.is_empty() {
                return Err(cfg("prompt init text has no tokens"));
            }
            // PEFT: repeat the ids until there are enough, then truncate.
            let ids: Vec<u32> = ids.iter().cycle().take(n).copied().collect();
            let ids = Tensor::from_vec(ids, (1, n), &model.device)?;
            model
                .embed(&ids)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
        }
    };
    Ok(BTreeMap::from([(EMBEDDING.to_string(), emb)]))
}
