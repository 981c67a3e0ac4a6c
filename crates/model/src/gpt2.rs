//! GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
//! Matches transformers' `modeling_gpt2.py` (eager attention): learned positions, pre-LayerNorm,
//! `gelu_new`, Conv1D weights stored [in, out], LM head tied to `wte`.

use candle_core::{Result as CResult, Tensor};

use crate::cache::{Ctx, KvCache};
use crate::config::Gpt2Config;
use crate::error::Result;
use crate::ops;
use crate::ops::linear::{Embedding, Linear};
use crate::weights::WeightSource;

fn conv1d(ws: &WeightSource, p: &str, inp: usize, out: usize) -> Result<Linear> {
    let w = ws.get(&format!("{p}.weight"), &[inp, out], false)?;
    let b = ws.dense(&format!("{p}.bias"), &[out])?;
    Ok(Linear::conv1d(w, Some(b))?)
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn load(ws: &WeightSource, p: &str, c: &Gpt2Config, layer: usize) -> Result<Self> {
        let h = c.hidden_size;
        let head_dim = h / c.num_heads;
        let mut scale = if c.scale_attn_weights {
            1.0 / (head_dim as f64).sqrt()
        } else {
            1.0
        };
        if c.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: conv1d(ws, &format!("{p}.c_attn"), h, 3 * h)?,
            c_proj: conv1d(ws, &format!("{p}.c_proj"), h, h)?,
            num_heads: c.num_heads,
            scale,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut crate::cache::LayerKv>,
    ) -> CResult<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.num_heads;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> CResult<Tensor> {
            qkv.narrow(2, i * h, h)?
                .reshape((b, t, self.num_heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let shared = cache.as_deref().and_then(|c| c.shared().cloned());
        let (k, v) = crate::cache::append(cache, k, v)?;
        let y = ops::gqa_attention_after(
            &q,
            shared.as_ref(),
            &k,
            &v,
            1,
            self.scale,
            ctx.bias.as_ref(),
        )?;
        let y = y.transpose(1, 2)?.reshape((b, t, h))?;
        self.c_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(ws: &WeightSource, p: &str, n: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: ws.dense(&format!("{p}.weight"), &[n])?,
            bias: ws.dense(&format!("{p}.bias"), &[n])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn load(ws: &WeightSource, p: &str, c: &Gpt2Config, layer: usize) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            ln_1: LayerNorm::load(ws, &format!("{p}.ln_1"), h, eps)?,
            attn: Attention::load(ws, &format!("{p}.attn"), c, layer)?,
            ln_2: LayerNorm::load(ws, &format!("{p}.ln_2"), h, eps)?,
            mlp: Mlp {
                c_fc: conv1d(ws, &format!("{p}.mlp.c_fc"), h, c.intermediate_size)?,
                c_proj: conv1d(ws, &format!("{p}.mlp.c_proj"), c.intermediate_size, h)?,
            },
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut crate::cache::LayerKv>,
    ) -> CResult<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, ctx, cache)?)?;
        let m = self.mlp.c_proj.forward(&ops::gelu_new(
            &self.mlp.c_fc.forward(&self.ln_2.forward(&x)?)?,
        )?)?;
        x + m
    }
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub wte: Embedding,
    pub wpe: Tensor,
    pub layers: Vec<(usize, Block)>,
    pub ln_f: LayerNorm,
    pub lm_head: Linear,
    pub config: Gpt2Config,
    /// "transformer." in transformers' `GPT2LMHeadModel` checkpoints, "" in bare `GPT2Model` ones.
    pub prefix: String,
}

impl Gpt2 {
    pub fn load(ws: &WeightSource, c: &Gpt2Config, layer_ids: &[usize]) -> Result<Self> {
        let prefix = if ws.contains("wte.weight") && !ws.contains("transformer.wte.weight") {
            String::new()
        } else {
            "transformer.".to_string()
        };
        let h = c.hidden_size;
        let wte = ws.get(&format!("{prefix}wte.weight"), &[c.vocab_size, h], false)?;
        let mut layers = Vec::with_capacity(layer_ids.len());
        for &i in layer_ids {
            layers.push((i, Block::load(ws, &format!("{prefix}h.{i}"), c, i)?));
        }
        Ok(Self {
            lm_head: Linear::new(wte.clone(), None)?,
            wte: Embedding::new(wte, ws.opts.dtype),
            wpe: ws.dense(
                &format!("{prefix}wpe.weight"),
                &[c.max_position_embeddings, h],
            )?,
            layers,
            ln_f: LayerNorm::load(ws, &format!("{prefix}ln_f"), h, c.layer_norm_eps)?,
            config: c.clone(),
            prefix,
        })
    }

    /// The LM head is always the token embedding (after the embedding was replaced).
    pub fn retie(&mut self) {
        *self.lm_head.weight_mut() = self.wte.weight().clone();
    }

    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        self.wte.forward(ids)
    }

    /// From token embeddings [B, T, hidden] (positions are added here) to hidden states after `ln_f`.
    pub fn hidden(&self, x: Tensor, ctx: &Ctx, mut cache: Option<&mut KvCache>) -> CResult<Tensor> {
        let mut x = self.add_positions(x, ctx)?;
        for (li, (_, block)) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.slot(li));
            x = block.forward(&x, ctx, slot)?;
        }
        self.ln_f.forward(&x)
    }

    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Token embeddings plus learned positions: the stream entering layer 0.
    pub fn add_positions(&self, x: Tensor, ctx: &Ctx) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let pos = self
            .wpe
            .index_select(&ctx.positions.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let pos = pos.to_dtype(x.dtype())?;
        x + pos
    }

    /// The residual stream after the layers whose original index `keep` accepts (no norm).
    pub fn run_blocks(
        &self,
        x: Tensor,
        ctx: &Ctx,
        keep: &dyn Fn(usize) -> bool,
    ) -> CResult<Tensor> {
        let mut x = x;
        for (_, block) in self.layers.iter().filter(|(i, _)| keep(*i)) {
            x = block.forward(&x, ctx, None)?;
        }
        Ok(x)
    }
}
