//! One type for every adapter: its configuration, its trainable tensors (fp32 `Var`s under PEFT
//! names) and how it changes a forward pass.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var};
use fedllm_model::{CausalLm, KvCache, Tokenizer};
use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{cfg, Result};
use crate::full::FullConfig;
use crate::lora::LoraConfig;
use crate::prefix::PrefixConfig;
use crate::prompt::PromptConfig;
use crate::ptuning::PtuningConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Prefix(PrefixConfig),
    Prompt(PromptConfig),
    Ptuning(PtuningConfig),
    Full(FullConfig),
}

impl AdapterConfig {
    pub fn name(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => "lora",
            AdapterConfig::Prefix(_) => "prefix",
            AdapterConfig::Prompt(_) => "prompt",
            AdapterConfig::Ptuning(_) => "ptuning",
            AdapterConfig::Full(_) => "full",
        }
    }

    /// Virtual tokens prepended to the input (prompt tuning, P-tuning), else 0.
    pub fn virtual_tokens(&self) -> usize {
        match self {
            AdapterConfig::Prompt(c) => c.num_virtual_tokens,
            AdapterConfig::Ptuning(c) => c.num_virtual_tokens,
            _ => 0,
        }
    }
}

pub use fedllm_model::Batch;

pub struct Adapter {
    pub config: AdapterConfig,
    /// Trainable tensors under PEFT names (for `full`: Hugging Face names), fp32.
    pub params: BTreeMap<String, Var>,
    /// Drives LoRA dropout masks; seeded so training is reproducible.
    pub(crate) dropout_rng: Arc<Mutex<Rng>>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("config", &self.config)
            .field("params", &self.params.keys())
            .finish()
    }
}

impl Adapter {
    /// A freshly initialised adapter for `model` (PEFT's default initialisations).
    pub fn init(
        model: &CausalLm,
        config: AdapterConfig,
        seed: u64,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let tensors = match &config {
            AdapterConfig::Lora(c) => crate::lora::init(model, c, &mut rng)?,
            AdapterConfig::Prefix(c) => crate::prefix::init(model, c, &mut rng)?,
            AdapterConfig::Prompt(c) => crate::prompt::init(model, c, &mut rng, tokenizer)?,
            AdapterConfig::Ptuning(c) => crate::ptuning::init(model, c, &mut rng)?,
            AdapterConfig::Full(c) => crate::full::init(model, c)?,
        };
        Self::from_tensors(model, config, tensors, seed)
    }

    /// An adapter with the given values; names and shapes must be exactly those `init` makes.
    pub fn from_tensors(
        model: &CausalLm,
        config: AdapterConfig,
        tensors: BTreeMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self> {
        let want = Self::shapes(model, &config)?;
        for (n, shape) in &want {
            let t = tensors
                .get(n)
                .ok_or_else(|| cfg(format!("missing tensor `{n}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(cfg(format!(
                    "tensor `{n}`: expected shape {shape:?}, found {:?}",
                    t.dims()
                )));
            }
        }
        if let Some(extra) = tensors.keys().find(|n| !want.contains_key(*n)) {
            return Err(cfg(format!(
                "unexpected tensor `{extra}` for a {} adapter",
                config.name()
            )));
        }
        let mut params = BTreeMap::new();
        for (n, t) in tensors {
            let t = t.to_dtype(DType::F32)?.to_device(&model.device)?;
            params.insert(n, Var::from_tensor(&t)?);
        }
        Ok(Self {
            config,
            params,
            dropout_rng: Arc::new(Mutex::new(Rng::new(seed ^ 0x5EED))),
        })
    }

    /// Names and shapes of the trainable tensors for `config` on `model`.
    pub fn shapes(
        model: &CausalLm,
        config: &AdapterConfig,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        let mut rng = Rng::new(0);
        // Initialisation is cheap next to a model; reuse it as the single source of names/shapes.
        let t = match config {
            AdapterConfig::Lora(c) => crate::lora::init(model, c, &mut rng)?,
            AdapterConfig::Prefix(c) => crate::prefix::init(model, c, &mut rng)?,
            AdapterConfig::Prompt(c) => {
                let mut c = c.clone();
                c.init_text = None;
                crate::prompt::init(model, &c, &mut rng, None)?
            }
            AdapterConfig::Ptuning(c) => crate::ptuning::init(model, c, &mut rng)?,
            AdapterConfig::Full(c) => crate::full::init(model, c)?,
        };
        Ok(t.into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect())
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        self.params
            .get(name)
            .ok_or_else(|| cfg(format!("no tensor `{name}` in the adapter")))
    }

    /// Current values (detached copies share storage with the vars).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Overwrites values in place (same names and shapes), e.g. with the global adapter of a round.
    pub fn set_tensors(&self, new: &BTreeMap<String, Tensor>) -> Result<()> {
        for (n, v) in &self.params {
            let t = new
                .get(n)
                .ok_or_else(|| cfg(format!("missing tensor `{n}`")))?;
            if t.dims() != v.dims() {
                return Err(cfg(format!(
                    "tensor `{n}`: expected shape {:?}, found {:?}",
                    v.dims(),
                    t.dims()
                )));
            }
            v.set(&t.to_dtype(DType::F32)?.to_device(v.device())?)?;
        }
        Ok(())
    }

    /// Restarts the dropout stream (each client/round trains from its own seed).
    pub fn reseed(&self, seed: u64) {
        *self.dropout_rng.lock().unwrap() = Rng::new(seed);
    }

    pub fn num_trainable(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Sets the dropout mode: training applies LoRA dropout, evaluation never does.
    pub fn attach(&self, model: &mut CausalLm, training: bool) -> Result<()> {
        match &self.config {
            AdapterConfig::Lora(c) => crate::lora::attach(self, c, model, training),
            AdapterConfig::Full(_) => {
                // As LoRA's hook: no graph at inference, same storage either way.
                let new = self
                    .params
                    .iter()
                    .map(|(n, v)| {
                        let t = v.as_tensor();
                        (n.clone(), if training { t.clone() } else { t.detach() })
                    })
                    .collect();
                Ok(model.replace_weights(&new)?)
            }
            _ => Ok(()),
        }
    }

    /// Removes LoRA hooks from the model (other adapters never modify it).
    pub fn detach(model: &mut CausalLm) {
        for (_, l) in model.linears_mut() {
            l.lora = None;
        }
    }

    /// Logits [B, V + T, vocab] in f32 (virtual positions first for prompt/P-tuning). LoRA and
    /// full adapters must be attached to `model` first.
    pub fn logits(
        &self,
        model: &CausalLm,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
    ) -> Result<Tensor> {
        let h = self.hidden(model, ids, mask)?;
        Ok(model.logits(&h)?)
    }

    pub fn hidden(
        &self,
        model: &CausalLm,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        match &self.config {
            AdapterConfig::Prompt(_) | AdapterConfig::Ptuning(_) => {
                let v = self.virtual_embeddings()?.to_dtype(model.dtype)?;
                let (n, h) = v.dims2()?;
                let x = Tensor::cat(
                    &[
                        &v.unsqueeze(0)?.broadcast_as((b, n, h))?,
                        &model.embed(ids)?,
                    ],
                    1,
                )?;
                let mask: Vec<Vec<u8>> = match mask {
                    Some(m) => m
                        .iter()
                        .map(|r| [vec![1u8; n], r.clone()].concat())
                        .collect(),
                    None => vec![vec![1u8; n + t]; b],
                };
                Ok(model.hidden_from_embeds(x, Some(&mask), None)?)
            }
            AdapterConfig::Prefix(c) => {
                let mut cache = self.prefix_cache(model, c, b)?;
                Ok(model.forward_hidden(ids, mask, Some(&mut cache))?)
            }
            AdapterConfig::Lora(_) | AdapterConfig::Full(_) => {
                Ok(model.forward_hidden(ids, mask, None)?)
            }
        }
    }

    /// Mean next-token cross-entropy over the batch's target tokens, and their count.
    pub fn loss(&self, model: &CausalLm, batch: &Batch) -> Result<(Tensor, usize)> {
        let hidden = self.hidden(model, &batch.input_ids, Some(&batch.mask))?;
        let labels = match self.config.virtual_tokens() {
            0 => batch.labels.clone(),
            n => {
                let b = batch.labels.dim(0)?;
                let pad = Tensor::full(-100i64, (b, n), batch.labels.device())?;
                Tensor::cat(&[&pad, &batch.labels.to_dtype(DType::I64)?], 1)?
            }
        };
        Ok(model.loss_from_hidden(&hidden, &labels)?)
    }

    /// The virtual token embeddings [n, hidden] of prompt tuning / P-tuning.
    pub fn virtual_embeddings(&self) -> Result<Tensor> {
        match &self.config {
            AdapterConfig::Prompt(_) => Ok(self.var(crate::prompt::EMBEDDING)?.as_tensor().clone()),
            AdapterConfig::Ptuning(c) => crate::ptuning::embeddings(self, c),
            _ => Err(cfg("this adapter has no virtual token embeddings")),
        }
    }

    /// What generation continues from with a prompt-type adapter: the one-row KV cache of its
    /// virtual tokens (prompt tuning and P-tuning: their embeddings run through the model;
    /// prefix tuning: its keys and values), detached, so decoding records no graph. None for
    /// LoRA and full adapters, which are attached to the model instead.
    pub fn generation_prefix(&self, model: &CausalLm) -> Result<Option<KvCache>> {
        match &self.config {
            AdapterConfig::Prefix(c) => {
                let slots = crate::prefix::key_values(self, c, model, 1)?
                    .into_iter()
                    .map(|(k, v)| (k.detach(), v.detach()))
                    .collect();
                Ok(Some(KvCache::from_prefix(slots)?))
            }
            AdapterConfig::Prompt(_) | AdapterConfig::Ptuning(_) => {
                let v = self
                    .virtual_embeddings()?
                    .detach()
                    .to_dtype(model.dtype)?
                    .unsqueeze(0)?;
                let mut cache = KvCache::new();
                model.hidden_from_embeds(v, None, Some(&mut cache))?;
                Ok(Some(cache))
            }
            AdapterConfig::Lora(_) | AdapterConfig::Full(_) => Ok(None),
        }
    }

    /// A KV cache holding the prefix keys/values for `batch` rows.
    pub fn prefix_cache(
        &self,
        model: &CausalLm,
        c: &PrefixConfig,
        batch: usize,
    ) -> Result<KvCache> {
        let slots = crate::prefix::key_values(self, c, model, batch)?;
        Ok(KvCache::from_prefix(slots)?)
    }

    /// What PEFT saves as `prompt_embeddings` for prompt-type adapters ([n, dim]).
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        match &self.config {
            AdapterConfig::Prefix(c) => crate::prefix::embeddings(self, c),
            AdapterConfig::Prompt(_) | AdapterConfig::Ptuning(_) => self.virtual_embeddings(),
            _ => Err(cfg("this adapter has no prompt embeddings")),
        }
    }
}
