//! LLaMA family decoder (LLaMA 1/2/3, Mistral, Qwen2, SmolLM2): Touvron et al. 2023,
//! "LLaMA: Open and Efficient Foundation Language Models". Matches transformers'
//! `modeling_llama.py` (eager attention): RMSNorm, SwiGLU MLP, rotary embeddings in the
//! non-interleaved `rotate_half` layout, grouped-query attention.

use candle_core::{Result as CResult, Tensor};

use crate::cache::{Ctx, KvCache, Outputs};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::Result;
use crate::ops;
use crate::ops::linear::{Embedding, Linear};
use crate::weights::WeightSource;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    fn load(ws: &WeightSource, p: &str, c: &LlamaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let lin = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = ws.get(&format!("{p}.{name}.weight"), &[out, inp], true)?;
            let b = if bias {
                Some(ws.dense(&format!("{p}.{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(w, b)?)
        };
        Ok(Self {
            q_proj: lin("q_proj", c.num_heads * d, h, c.qkv_bias)?,
            k_proj: lin("k_proj", c.num_kv_heads * d, h, c.qkv_bias)?,
            v_proj: lin("v_proj", c.num_kv_heads * d, h, c.qkv_bias)?,
            o_proj: lin("o_proj", h, c.num_heads * d, c.o_bias)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: d,
        })
    }

    /// `res + attention(x)` (the residual add fused into o_proj where a kernel path exists),
    /// for the last `tail` positions only when given (with a cache; keys and values of all).
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut crate::cache::LayerKv>,
        res: &Tensor,
        tail: Option<usize>,
    ) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        if cache.is_none() {
            // Whole sequences (training, scoring): one op on the projections' own layout.
            let (cos, sin) = ctx.rope.as_ref().expect("llama needs rotary tables");
            let y = ops::self_attention(
                &self.q_proj.forward(x)?,
                &self.k_proj.forward(x)?,
                &self.v_proj.forward(x)?,
                (cos, sin),
                ctx.bias.as_ref(),
                (self.num_heads, self.num_kv_heads, self.head_dim),
                scale,
            )?;
            return self.o_proj.forward_residual(&y, res);
        }
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
        let [q, k, v] = Linear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = heads(q, self.num_heads)?;
        let k = heads(k, self.num_kv_heads)?;
        let v = heads(v, self.num_kv_heads)?.contiguous()?;
        let (cos, sin) = ctx.rope.as_ref().expect("llama needs rotary tables");
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let shared = cache.as_deref().and_then(|c| c.shared().cloned());
        let (k, v) = crate::profile::span(crate::profile::Phase::Attention, || {
            crate::cache::append(cache, k, v)
        })?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let bias = ctx.bias.as_ref();
        let y = ops::gqa_attention_after(&q, shared.as_ref(), &k, &v, n_rep, scale, bias)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        match tail {
            Some(r) if r < t => {
                let last = |z: &Tensor| z.narrow(1, t - r, r)?.contiguous();
                self.o_proj.forward_residual(&last(&y)?, &last(res)?)
            }
            _ => self.o_proj.forward_residual(&y, res),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn load(ws: &WeightSource, p: &str, c: &LlamaConfig) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let w = ws.get(&format!("{p}.{name}.weight"), &[out, inp], true)?;
            let b = if c.mlp_bias {
                Some(ws.dense(&format!("{p}.{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(w, b)?)
        };
        Ok(Self {
            gate_proj: lin("gate_proj", i, h)?,
            up_proj: lin("up_proj", i, h)?,
            down_proj: lin("down_proj", h, i)?,
        })
    }

    /// `res + mlp(x)`.
    fn forward(&self, x: &Tensor, res: &Tensor) -> CResult<Tensor> {
        if let Some(h) = Linear::swiglu_shared(&self.gate_proj, &self.up_proj, x)? {
            return self.down_proj.forward_residual(&h, res);
        }
        let [g, u] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj.forward_swiglu_residual(&g, &u, res)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    eps: f64,
}

impl Block {
    fn load(ws: &WeightSource, p: &str, c: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(ws, &format!("{p}.self_attn"), c)?,
            mlp: Mlp::load(ws, &format!("{p}.mlp"), c)?,
            input_layernorm: ws.dense(&format!("{p}.input_layernorm.weight"), &[c.hidden_size])?,
            post_attention_layernorm: ws.dense(
                &format!("{p}.post_attention_layernorm.weight"),
                &[c.hidden_size],
            )?,
            eps: c.rms_norm_eps,
        })
    }

    /// The block over x; with a cache and `tail`, only the last `tail` positions leave it.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Ctx,
        cache: Option<&mut crate::cache::LayerKv>,
        tail: Option<usize>,
    ) -> CResult<Tensor> {
        if cache.is_none() {
            // Whole sequences on the CPU kernels: each half-layer as one op.
            let a = &self.self_attn;
            let x2 = crate::ops::block::attention_half(
                x,
                &self.input_layernorm,
                self.eps,
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj],
                (a.num_heads, a.num_kv_heads, a.head_dim),
                1.0 / (a.head_dim as f64).sqrt(),
                ctx,
            )?;
            if let Some(x2) = x2 {
                let m = &self.mlp;
                let out = crate::ops::block::mlp_half(
                    &x2,
                    &self.post_attention_layernorm,
                    self.eps,
                    [&m.gate_proj, &m.up_proj, &m.down_proj],
                )?;
                return match out {
                    Some(out) => Ok(out),
                    None => {
                        let h = ops::rms_norm(&x2, &self.post_attention_layernorm, self.eps)?;
                        self.mlp.forward(&h, &x2)
                    }
                };
            }
        }
        let h = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = self.self_attn.forward(&h, ctx, cache, x, tail)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        self.mlp.forward(&h, &x)
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub embed_tokens: Embedding,
    /// (original layer index, block): names keep the original index when layers are dropped.
    pub layers: Vec<(usize, Block)>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub config: LlamaConfig,
    inv_freq: Vec<f32>,
}

impl Llama {
    pub fn load(ws: &WeightSource, c: &LlamaConfig, layer_ids: &[usize]) -> Result<Self> {
        let dtype = ws.opts.dtype;
        let embed_w = ws.get(
            "model.embed_tokens.weight",
            &[c.vocab_size, c.hidden_size],
            true,
        )?;
        let lm_head = if !c.tie_word_embeddings && ws.contains("lm_head.weight") {
            Linear::new(
                ws.get("lm_head.weight", &[c.vocab_size, c.hidden_size], true)?,
                None,
            )?
        } else {
            Linear::new(embed_w.clone(), None)?
        };
        let mut layers = Vec::with_capacity(layer_ids.len());
        for &i in layer_ids {
            layers.push((i, Block::load(ws, &format!("model.layers.{i}"), c)?));
        }
        Ok(Self {
            embed_tokens: Embedding::new(embed_w, dtype),
            layers,
            norm: ws.dense("model.norm.weight", &[c.hidden_size])?,
            lm_head,
            config: c.clone(),
            inv_freq: inv_freq(c),
        })
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Hidden states after the final norm: [B, T, hidden].
    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// From input embeddings [B, T, hidden] to hidden states after the final norm: of every
    /// position, or with a cache and `Outputs::Last` of the last few (the last layer's
    /// attention output and MLP run for those rows only, as llama.cpp's last layer does).
    pub fn hidden(
        &self,
        x: Tensor,
        ctx: &Ctx,
        mut cache: Option<&mut KvCache>,
        outputs: Outputs,
    ) -> CResult<Tensor> {
        let mut x = x;
        let last = self.layers.len().saturating_sub(1);
        for (li, (_, block)) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.slot(li));
            let tail = if li == last && outputs == Outputs::Last {
                let (b, t, _) = x.dims3()?;
                Some(crate::linear::same_kernel_tail(b, t))
            } else {
                None
            };
            x = block.forward(&x, ctx, slot, tail)?;
        }
        ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        self.lm_head.forward(hidden)
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
            x = block.forward(&x, ctx, None, None)?;
        }
        Ok(x)
    }
}

/// Rotary inverse frequencies in f32 as transformers computes them, with rope scaling applied.
fn inv_freq(c: &LlamaConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base = c.rope_theta as f32;
    let freqs = (0..d)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / d as f32));
    match c.rope_scaling {
        RopeScaling::None => freqs.collect(),
        RopeScaling::Linear(f) => freqs.map(|v| v / f as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => freqs
            .map(|f| {
                let (factor, lo, hi, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max as f32,
                );
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let scaled = if wavelen > low_wavelen { f / factor } else { f };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                if medium {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                }
            })
            .collect(),
    }
}
