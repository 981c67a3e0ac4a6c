//! One entry point over every architecture: load from a Hugging Face folder or a GGUF file,
//! run a forward, name the parameters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result as CResult, Tensor};

use crate::cache::{build_ctx, CtxSpec, KvCache, Outputs};
use crate::config::{Gpt2Config, LlamaConfig, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};
use crate::gpt2::Gpt2;
use crate::llama::Llama;
use crate::ops::linear::Linear;
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadOptions, Weight, WeightSource};

#[derive(Debug, Clone)]
pub enum Arch {
    Llama(Llama),
    Gpt2(Gpt2),
}

#[derive(Debug, Clone)]
pub struct CausalLm {
    pub arch: Arch,
    pub config: ModelConfig,
    pub device: Device,
    pub dtype: DType,
    pub source: PathBuf,
    /// Storage kinds of the loaded weights (e.g. "Q4_1" → element count), for `info`.
    pub storage: BTreeMap<String, usize>,
}

/// A model with its tokenizer (absent if the folder has no `tokenizer.json`).
pub struct Loaded {
    pub model: CausalLm,
    pub tokenizer: Option<Tokenizer>,
}

pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

impl CausalLm {
    /// Loads a model (and its tokenizer) from a Hugging Face folder or a `.gguf` file.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Loaded> {
        let resolved = crate::hub::resolve(path)?;
        let path = resolved.as_path();
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let mut opts = opts;
        if path.is_dir() {
            let config = ModelConfig::from_json_file(&path.join("config.json"))?;
            // An offsite-tuning emulator lists the layers it holds.
            let emu = path.join("fedllm_emulator.json");
            if opts.layers.is_none() && emu.exists() {
                let text = std::fs::read_to_string(&emu).map_err(|e| ModelError::io(&emu, e))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| ModelError::format(&emu, e.to_string()))?;
                let layers = v["layers"]
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
                opts.layers =
                    Some(layers.ok_or_else(|| {
                        ModelError::format(&emu, "`layers` must list layer indices")
                    })?);
            }
            let ws = WeightSource::safetensors_dir(path, opts)?;
            let model = Self::build(&ws, config)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            Ok(Loaded { model, tokenizer })
        } else if is_gguf(path) {
            let file = GgufFile::open(path)?;
            let config = gguf_config(&file)?;
            if let (None, Some(v)) = (&opts.layers, file.meta("fedllm.emulator.layers")) {
                let layers = v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect());
                opts.layers = Some(layers.ok_or_else(|| {
                    ModelError::format(path, "`fedllm.emulator.layers` must list layer indices")
                })?);
            }
            let tokenizer = match file.meta("tokenizer.ggml.model") {
                Some(_) => Some(Tokenizer::from_gguf(&file)?),
                None => None,
            };
            let ws = WeightSource::gguf(file, opts)?;
            let model = Self::build(&ws, config)?;
            Ok(Loaded { model, tokenizer })
        } else {
            Err(ModelError::format(
                path,
                "not a model: expected a Hugging Face folder or a .gguf file",
            ))
        }
    }

    pub fn build(ws: &WeightSource, config: ModelConfig) -> Result<Self> {
        let n = config.num_layers();
        let layer_ids = ws.opts.layers.clone().unwrap_or_else(|| (0..n).collect());
        if let Some(&bad) = layer_ids.iter().find(|&&i| i >= n) {
            return Err(ModelError::Config(format!(
                "layer {bad} out of range (model has {n})"
            )));
        }
        let arch = match &config {
            ModelConfig::Llama(c) => Arch::Llama(Llama::load(ws, c, &layer_ids)?),
            ModelConfig::Gpt2(c) => Arch::Gpt2(Gpt2::load(ws, c, &layer_ids)?),
        };
        let storage = ws.stats.lock().unwrap().clone().into_iter().collect();
        Ok(Self {
            arch,
            config,
            device: ws.opts.device.clone(),
            dtype: ws.opts.dtype,
            source: ws.path.clone(),
            storage,
        })
    }

    /// Original indices of the layers this model was built from.
    pub fn layer_ids(&self) -> Vec<usize> {
        match &self.arch {
            Arch::Llama(m) => m.layers.iter().map(|(i, _)| *i).collect(),
            Arch::Gpt2(m) => m.layers.iter().map(|(i, _)| *i).collect(),
        }
    }

    /// Final hidden states [B, T, hidden]. `mask` is the 0/1 mask of the new tokens (None = all
    /// ones); with a cache, the cached positions' mask is remembered there.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
    ) -> CResult<Tensor> {
        let x = self.embed(ids)?;
        self.hidden_from_embeds(x, mask, cache)
    }

    /// What an inference KV cache stores. With GGUF-quantized weights kept in memory on the
    /// CPU: f16, as llama.cpp does (half the cache; the weights' own 4–8-bit rounding is
    /// far coarser than f16's 2⁻¹¹). Otherwise the compute dtype, so dense models decode
    /// exactly as their full forward computes.
    pub fn kv_dtype(&self) -> DType {
        let first = match &self.arch {
            Arch::Llama(m) => m.layers.first().map(|(_, b)| &b.self_attn.q_proj),
            Arch::Gpt2(m) => m.layers.first().map(|(_, b)| &b.attn.c_attn),
        };
        let quantized = first.is_some_and(|l| matches!(l.weight(), Weight::Quant(_)));
        if quantized && self.device.is_cpu() && self.dtype == DType::F32 {
            DType::F16
        } else {
            self.dtype
        }
    }

    /// Token embeddings [B, T, hidden] of ids [B, T].
    pub fn embed(&self, ids: &Tensor) -> CResult<Tensor> {
        let ids = ids.to_dtype(DType::U32)?;
        match &self.arch {
            Arch::Llama(m) => m.embed(&ids),
            Arch::Gpt2(m) => m.embed(&ids),
        }
    }

    /// Like `forward_hidden`, from input embeddings (prompt tuning prepends virtual tokens here).
    pub fn hidden_from_embeds(
        &self,
        x: Tensor,
        mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
    ) -> CResult<Tensor> {
        self.hidden_for(x, mask, cache, Outputs::All)
    }

    /// `forward_hidden` for generation: hidden states [B, R, hidden] of the last R ≥ 1
    /// positions, the last row being the last position's (LLaMA computes R =
    /// `linear::same_kernel_tail` in its last layer, whose numbers equal those of the full
    /// forward's rows; GPT-2 returns all positions). Every position reaches the cache.
    pub fn forward_hidden_last(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        cache: &mut KvCache,
    ) -> CResult<Tensor> {
        let x = self.embed(ids)?;
        self.hidden_for(x, mask, Some(cache), Outputs::Last)
    }

    fn hidden_for(
        &self,
        x: Tensor,
        mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
        outputs: Outputs,
    ) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (past, key_mask): (usize, Option<Vec<Vec<u8>>>) = match (&cache, mask) {
            (Some(c), m) => {
                let mut rows = if c.len == 0 {
                    vec![vec![]; b]
                } else {
                    c.mask.clone()
                };
                if rows.len() != b {
                    candle_core::bail!("cache holds {} rows, batch has {b}", rows.len());
                }
                for (bi, row) in rows.iter_mut().enumerate() {
                    match m {
                        Some(m) => row.extend_from_slice(&m[bi]),
                        None => row.extend(std::iter::repeat_n(1u8, t)),
                    }
                }
                (c.len, Some(rows))
            }
            (None, m) => (0, m.map(|m| m.to_vec())),
        };
        let (inv_freq, window) = match &self.arch {
            Arch::Llama(m) => (Some(m.inv_freq()), m.config.sliding_window),
            Arch::Gpt2(_) => (None, None),
        };
        let spec = CtxSpec {
            batch: b,
            t,
            past,
            key_mask: key_mask.as_deref(),
            sliding_window: window,
        };
        let ctx = build_ctx(&spec, inv_freq, self.dtype, &self.device)?;
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            c.dtype = Some(self.kv_dtype());
        }
        let run = || -> CResult<Tensor> {
            Ok(match (&self.arch, cache) {
                (Arch::Llama(m), Some(c)) => {
                    let h = m.hidden(x, &ctx, Some(c), outputs)?;
                    c.len += t;
                    c.mask = key_mask.unwrap_or_default();
                    h
                }
                (Arch::Gpt2(m), Some(c)) => {
                    let h = m.hidden(x, &ctx, Some(c))?;
                    c.len += t;
                    c.mask = key_mask.unwrap_or_default();
                    h
                }
                (Arch::Llama(m), None) => m.hidden(x, &ctx, None, outputs)?,
                (Arch::Gpt2(m), None) => m.hidden(x, &ctx, None)?,
            })
        };
        // Prompts' loops split on rayon's workers; a decode step stays on this thread, whose
        // block products run on the spinning pool (a rayon worker idling beside it took their
        // cores: batch-8 decode 330 → 262 tok/s).
        if crate::linear::matvec_rows(b * t) {
            run()
        } else {
            crate::qmatvec::on_worker(|| fedllm_kernels::pool::rayon_awake(run))
        }
    }

    /// The same model over a subset of its layers (original indices, ascending; names keep
    /// them). Tensors are shared, not copied: offsite tuning's emulator is such a view.
    pub fn select_layers(&self, ids: &[usize]) -> Result<Self> {
        let have = self.layer_ids();
        if let Some(bad) = ids.iter().find(|i| !have.contains(i)) {
            return Err(ModelError::Config(format!(
                "layer {bad} is not in this model (it has {have:?})"
            )));
        }
        if ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ModelError::Config(format!(
                "layer indices must ascend without repeats, got {ids:?}"
            )));
        }
        let mut m = self.clone();
        match &mut m.arch {
            Arch::Llama(a) => a.layers.retain(|(i, _)| ids.contains(i)),
            Arch::Gpt2(a) => a.layers.retain(|(i, _)| ids.contains(i)),
        }
        Ok(m)
    }

    /// The residual stream entering layer 0 for ids [B, T] (GPT-2 adds its positions), and
    /// the attention context for those tokens, for `run_layers`.
    pub fn stream_in(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
    ) -> CResult<(Tensor, crate::cache::Ctx)> {
        let x = self.embed(ids)?;
        let (b, t, _) = x.dims3()?;
        let (inv_freq, window) = match &self.arch {
            Arch::Llama(m) => (Some(m.inv_freq()), m.config.sliding_window),
            Arch::Gpt2(_) => (None, None),
        };
        let spec = CtxSpec {
            batch: b,
            t,
            past: 0,
            key_mask: mask,
            sliding_window: window,
        };
        let ctx = build_ctx(&spec, inv_freq, self.dtype, &self.device)?;
        let x = match &self.arch {
            Arch::Llama(_) => x,
            Arch::Gpt2(m) => m.add_positions(x, &ctx)?,
        };
        Ok((x, ctx))
    }

    /// The residual stream after this model's layers whose original index `keep` accepts, in
    /// order, without the final norm.
    pub fn run_layers(
        &self,
        x: Tensor,
        ctx: &crate::cache::Ctx,
        keep: &dyn Fn(usize) -> bool,
    ) -> CResult<Tensor> {
        match &self.arch {
            Arch::Llama(m) => m.run_blocks(x, ctx, keep),
            Arch::Gpt2(m) => m.run_blocks(x, ctx, keep),
        }
    }

    /// The final norm over a residual stream (what `forward_hidden` ends with).
    pub fn final_norm(&self, x: &Tensor) -> CResult<Tensor> {
        match &self.arch {
            Arch::Llama(m) => crate::ops::rms_norm(x, &m.norm, m.config.rms_norm_eps),
            Arch::Gpt2(m) => m.ln_f.forward(x),
        }
    }

    /// Logits over the vocabulary for hidden states, in f32.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        let l = match &self.arch {
            Arch::Llama(m) => m.logits(hidden)?,
            Arch::Gpt2(m) => m.logits(hidden)?,
        };
        l.to_dtype(DType::F32)
    }

    /// Mean next-token loss from final hidden states [B, T, h] and labels [B, T] (-100 = none,
    /// shifted left by one as transformers does). Logits are computed only at positions that
    /// carry loss, and the cross-entropy is one fused op: prompt tokens cost no vocabulary matmul.
    pub fn loss_from_hidden(&self, hidden: &Tensor, labels: &Tensor) -> CResult<(Tensor, usize)> {
        let (b, t, h) = hidden.dims3()?;
        let l: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, row) in l.iter().enumerate() {
            for ti in 0..t.saturating_sub(1) {
                let y = row[ti + 1];
                if y != -100 {
                    if y < 0 || y as usize >= self.config.vocab_size() {
                        candle_core::bail!("label {y} outside the vocabulary");
                    }
                    rows.push((bi * t + ti) as u32);
                    targets.push(y as u32);
                }
            }
        }
        if rows.is_empty() {
            candle_core::bail!("no position carries loss");
        }
        let idx = Tensor::from_vec(rows, targets.len(), hidden.device())?;
        let picked = hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        let head = match &self.arch {
            Arch::Llama(m) => &m.lm_head,
            Arch::Gpt2(m) => &m.lm_head,
        };
        if let Some(per_row) = head.fused_cross_entropy(&picked, &targets) {
            return Ok(((per_row?.sum_all()? / targets.len() as f64)?, targets.len()));
        }
        let logits = self.logits(&picked)?;
        Ok((crate::ops::cross_entropy(&logits, &targets)?, targets.len()))
    }

    /// Logits [B, T, vocab] in f32.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&[Vec<u8>]>,
        cache: Option<&mut KvCache>,
    ) -> CResult<Tensor> {
        let h = self.forward_hidden(ids, mask, cache)?;
        self.logits(&h)
    }

    /// Every weight under its Hugging Face name (tied heads are listed once, as the embedding).
    pub fn named_weights(&self) -> Vec<(String, Weight)> {
        let mut out = Vec::new();
        let lin = |out: &mut Vec<(String, Weight)>, p: String, l: &Linear| {
            out.push((format!("{p}.weight"), l.weight().clone()));
            if let Some(b) = l.bias() {
                out.push((format!("{p}.bias"), Weight::Dense(b.clone())));
            }
        };
        let dense = |out: &mut Vec<(String, Weight)>, n: String, t: &Tensor| {
            out.push((n, Weight::Dense(t.clone())))
        };
        match &self.arch {
            Arch::Llama(m) => {
                out.push((
                    "model.embed_tokens.weight".into(),
                    m.embed_tokens.weight().clone(),
                ));
                for (i, b) in &m.layers {
                    let p = format!("model.layers.{i}");
                    dense(
                        &mut out,
                        format!("{p}.input_layernorm.weight"),
                        &b.input_layernorm,
                    );
                    for (n, l) in [
                        ("q_proj", &b.self_attn.q_proj),
                        ("k_proj", &b.self_attn.k_proj),
                        ("v_proj", &b.self_attn.v_proj),
                        ("o_proj", &b.self_attn.o_proj),
                    ] {
                        lin(&mut out, format!("{p}.self_attn.{n}"), l);
                    }
                    dense(
                        &mut out,
                        format!("{p}.post_attention_layernorm.weight"),
                        &b.post_attention_layernorm,
                    );
                    for (n, l) in [
                        ("gate_proj", &b.mlp.gate_proj),
                        ("up_proj", &b.mlp.up_proj),
                        ("down_proj", &b.mlp.down_proj),
                    ] {
                        lin(&mut out, format!("{p}.mlp.{n}"), l);
                    }
                }
                dense(&mut out, "model.norm.weight".into(), &m.norm);
                if !m.config.tie_word_embeddings
                    && !same_weight(m.lm_head.weight(), m.embed_tokens.weight())
                {
                    lin(&mut out, "lm_head".into(), &m.lm_head);
                }
            }
            Arch::Gpt2(m) => {
                let pre = &m.prefix;
                out.push((format!("{pre}wte.weight"), m.wte.weight().clone()));
                dense(&mut out, format!("{pre}wpe.weight"), &m.wpe);
                for (i, b) in &m.layers {
                    let p = format!("{pre}h.{i}");
                    dense(&mut out, format!("{p}.ln_1.weight"), &b.ln_1.weight);
                    dense(&mut out, format!("{p}.ln_1.bias"), &b.ln_1.bias);
                    lin(&mut out, format!("{p}.attn.c_attn"), &b.attn.c_attn);
                    lin(&mut out, format!("{p}.attn.c_proj"), &b.attn.c_proj);
                    dense(&mut out, format!("{p}.ln_2.weight"), &b.ln_2.weight);
                    dense(&mut out, format!("{p}.ln_2.bias"), &b.ln_2.bias);
                    lin(&mut out, format!("{p}.mlp.c_fc"), &b.mlp.c_fc);
                    lin(&mut out, format!("{p}.mlp.c_proj"), &b.mlp.c_proj);
                }
                dense(&mut out, format!("{pre}ln_f.weight"), &m.ln_f.weight);
                dense(&mut out, format!("{pre}ln_f.bias"), &m.ln_f.bias);
            }
        }
        out
    }

    /// Sets how every frozen product (LM head included) multiplies on the CPU.
    pub fn set_matmul_precision(&mut self, p: crate::ops::linear::MatmulPrecision) {
        for (_, l) in self.linears_mut() {
            l.precision = p;
        }
        match &mut self.arch {
            Arch::Llama(m) => m.lm_head.precision = p,
            Arch::Gpt2(m) => m.lm_head.precision = p,
        }
    }

    /// Every linear layer under its HF module name (without `.weight`), for attaching LoRA.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        match &mut self.arch {
            Arch::Llama(m) => {
                for (i, b) in m.layers.iter_mut() {
                    let p = format!("model.layers.{i}");
                    let a = &mut b.self_attn;
                    out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
                    out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
                    out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
                    out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
                    let f = &mut b.mlp;
                    out.push((format!("{p}.mlp.gate_proj"), &mut f.gate_proj));
                    out.push((format!("{p}.mlp.up_proj"), &mut f.up_proj));
                    out.push((format!("{p}.mlp.down_proj"), &mut f.down_proj));
                }
            }
            Arch::Gpt2(m) => {
                let pre = m.prefix.clone();
                for (i, b) in m.layers.iter_mut() {
                    let p = format!("{pre}h.{i}");
                    out.push((format!("{p}.attn.c_attn"), &mut b.attn.c_attn));
                    out.push((format!("{p}.attn.c_proj"), &mut b.attn.c_proj));
                    out.push((format!("{p}.mlp.c_fc"), &mut b.mlp.c_fc));
                    out.push((format!("{p}.mlp.c_proj"), &mut b.mlp.c_proj));
                }
            }
        }
        out
    }

    /// Replaces weights by name (e.g. with trainable `Var`s for full fine-tuning). Names not in
    /// `new` are left alone; a tied LM head follows its embedding.
    pub fn replace_weights(
        &mut self,
        new: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        fn put(t: &mut Tensor, name: &str, new: &std::collections::HashMap<String, Tensor>) {
            if let Some(n) = new.get(name) {
                *t = n.clone();
            }
        }
        fn put_w(w: &mut Weight, name: &str, new: &std::collections::HashMap<String, Tensor>) {
            if let Some(n) = new.get(name) {
                *w = Weight::Dense(n.clone());
            }
        }
        fn put_lin(l: &mut Linear, p: &str, new: &std::collections::HashMap<String, Tensor>) {
            put_w(l.weight_mut(), &format!("{p}.weight"), new);
            if let Some(b) = l.bias_mut() {
                put(b, &format!("{p}.bias"), new);
            }
        }
        for n in new.keys() {
            if !self.named_weights().iter().any(|(k, _)| k == n) {
                return Err(ModelError::MissingWeight(n.clone()));
            }
        }
        match &mut self.arch {
            Arch::Llama(m) => {
                let tied = same_weight(m.lm_head.weight(), m.embed_tokens.weight());
                put_w(
                    m.embed_tokens.weight_mut(),
                    "model.embed_tokens.weight",
                    new,
                );
                for (i, b) in m.layers.iter_mut() {
                    let p = format!("model.layers.{i}");
                    put(
                        &mut b.input_layernorm,
                        &format!("{p}.input_layernorm.weight"),
                        new,
                    );
                    put(
                        &mut b.post_attention_layernorm,
                        &format!("{p}.post_attention_layernorm.weight"),
                        new,
                    );
                }
                put(&mut m.norm, "model.norm.weight", new);
                if tied {
                    *m.lm_head.weight_mut() = m.embed_tokens.weight().clone();
                } else {
                    put_lin(&mut m.lm_head, "lm_head", new);
                }
            }
            Arch::Gpt2(m) => {
                let pre = m.prefix.clone();
                put_w(m.wte.weight_mut(), &format!("{pre}wte.weight"), new);
                put(&mut m.wpe, &format!("{pre}wpe.weight"), new);
                for (i, b) in m.layers.iter_mut() {
                    let p = format!("{pre}h.{i}");
                    put(&mut b.ln_1.weight, &format!("{p}.ln_1.weight"), new);
                    put(&mut b.ln_1.bias, &format!("{p}.ln_1.bias"), new);
                    put(&mut b.ln_2.weight, &format!("{p}.ln_2.weight"), new);
                    put(&mut b.ln_2.bias, &format!("{p}.ln_2.bias"), new);
                }
                put(&mut m.ln_f.weight, &format!("{pre}ln_f.weight"), new);
                put(&mut m.ln_f.bias, &format!("{pre}ln_f.bias"), new);
                m.retie();
            }
        }
        for (name, lin) in self.linears_mut() {
            put_lin(lin, &name, new);
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.named_weights()
            .iter()
            .map(|(_, w)| w.shape().iter().product::<usize>())
            .sum()
    }

    /// Bytes the weights occupy in memory as loaded.
    pub fn weight_bytes(&self) -> usize {
        self.named_weights()
            .iter()
            .map(|(_, w)| match w {
                Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
                Weight::Quant(q) | Weight::Packed(q) => q.storage_size_in_bytes(),
            })
            .sum()
    }
}

fn same_weight(a: &Weight, b: &Weight) -> bool {
    match (a, b) {
        (Weight::Dense(x), Weight::Dense(y)) => x.id() == y.id(),
        (Weight::Quant(x), Weight::Quant(y)) | (Weight::Packed(x), Weight::Packed(y)) => {
            std::sync::Arc::ptr_eq(x, y)
        }
        _ => false,
    }
}

/// LLaMA-family runtime config from GGUF metadata (llama.cpp's key names).
fn gguf_config(f: &GgufFile) -> Result<ModelConfig> {
    let arch = f.meta_str("general.architecture").unwrap_or("").to_string();
    if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
        return Err(ModelError::UnknownArchitecture {
            path: f.path.clone(),
            arch,
        });
    }
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = f.require_u64(&k("embedding_length"))? as usize;
    let heads = f.require_u64(&k("attention.head_count"))? as usize;
    if heads == 0 {
        return Err(ModelError::format(
            &f.path,
            format!("metadata `{}` is 0", k("attention.head_count")),
        ));
    }
    let kv = f
        .meta_u64(&k("attention.head_count_kv"))
        .map(|v| v as usize)
        .unwrap_or(heads);
    let vocab = match f.meta_u64(&k("vocab_size")) {
        Some(v) => v as usize,
        None => f
            .info("token_embd.weight")
            .map(|i| i.shape[0])
            .map_err(|_| ModelError::format(&f.path, "missing tensor `token_embd.weight`"))?,
    };
    let rope_scaling = match (
        f.meta_str(&k("rope.scaling.type")),
        f.meta_f64(&k("rope.scaling.factor")),
    ) {
        (Some("linear"), Some(fac)) => RopeScaling::Linear(fac),
        _ => RopeScaling::None,
    };
    let eos = f.meta_u64("tokenizer.ggml.eos_token_id").map(|v| v as u32);
    let c = LlamaConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: f.require_u64(&k("feed_forward_length"))? as usize,
        num_layers: f.require_u64(&k("block_count"))? as usize,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: f
            .meta_u64(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden / heads),
        rms_norm_eps: f
            .meta_f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: f.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: f.meta_u64(&k("context_length")).unwrap_or(4096) as usize,
        tie_word_embeddings: !f.tensors.contains_key("output.weight"),
        qkv_bias: f.tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: f.tensors.contains_key("blk.0.attn_output.bias"),
        mlp_bias: f.tensors.contains_key("blk.0.ffn_up.bias"),
        sliding_window: None,
        bos_token_id: f.meta_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: f
            .meta_u64("tokenizer.ggml.padding_token_id")
            .map(|v| v as u32),
    };
    Ok(ModelConfig::Llama(c))
}

/// llama.cpp's metadata for a LLaMA config (the keys `gguf_config` reads), for exporting a
/// Hugging Face base. Only what llama.cpp's `llama` architecture computes the same way we do:
/// no biases, no sliding window, rope default or linear.
pub fn llama_gguf_metadata(c: &LlamaConfig) -> Result<Vec<(String, Value)>> {
    let plain =
        c.model_type == "llama" || (c.model_type == "mistral" && c.sliding_window.is_none());
    if !plain || c.qkv_bias || c.o_bias || c.mlp_bias {
        return Err(ModelError::Config(format!(
            "GGUF output from a Hugging Face folder is written for LLaMA models without biases or sliding window (this one is `{}`)",
            c.model_type
        )));
    }
    let u = |k: &str, v: usize| (format!("llama.{k}"), Value::U32(v as u32));
    let f = |k: &str, v: f64| (format!("llama.{k}"), Value::F32(v as f32));
    let mut m = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        u("vocab_size", c.vocab_size),
        u("context_length", c.max_position_embeddings),
        u("embedding_length", c.hidden_size),
        u("block_count", c.num_layers),
        u("feed_forward_length", c.intermediate_size),
        u("attention.head_count", c.num_heads),
        u("attention.head_count_kv", c.num_kv_heads),
        u("attention.key_length", c.head_dim),
        u("attention.value_length", c.head_dim),
        u("rope.dimension_count", c.head_dim),
        f("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
        f("rope.freq_base", c.rope_theta),
    ];
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear(factor) => {
            m.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
            m.push(f("rope.scaling.factor", factor));
        }
        RopeScaling::Llama3 { .. } => {
            return Err(ModelError::Config(
                "GGUF output of LLaMA-3 rope scaling is not offered (llama.cpp needs a rope_freqs tensor)".into(),
            ))
        }
    }
    Ok(m)
}

impl ModelConfig {
    pub fn as_llama(&self) -> Option<&LlamaConfig> {
        match self {
            ModelConfig::Llama(c) => Some(c),
            _ => None,
        }
    }
    pub fn as_gpt2(&self) -> Option<&Gpt2Config> {
        match self {
            ModelConfig::Gpt2(c) => Some(c),
            _ => None,
        }
    }
}
