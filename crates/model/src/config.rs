//! Two-layer configuration (as candle-transformers does): serde structs mirroring Hugging Face's
//! `config.json`, converted once into plain runtime structs without `Option`s.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParams {
    pub rope_theta: Option<f64>,
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

fn first_id(t: &Option<TokenIds>) -> Option<u32> {
    t.as_ref().and_then(|t| t.to_vec().first().copied())
}

fn all_ids(t: &Option<TokenIds>) -> Vec<u32> {
    t.as_ref().map(TokenIds::to_vec).unwrap_or_default()
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `config.json` of LLaMA, Mistral, Qwen2 and SmolLM2 checkpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeParams>,
    /// transformers 5 writes theta and scaling here instead of the top level.
    pub rope_parameters: Option<RopeParams>,
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear(f64),
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

fn rope_scaling(p: &RopeParams) -> Result<RopeScaling> {
    let ty = p.rope_type.as_deref().unwrap_or("default");
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear(
            p.factor
                .ok_or_else(|| ModelError::Config("rope_scaling `linear` needs `factor`".into()))?,
        ),
        "llama3" => {
            let need = |v: Option<f64>, k: &str| {
                v.ok_or_else(|| ModelError::Config(format!("rope_scaling `llama3` needs `{k}`")))
            };
            RopeScaling::Llama3 {
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_max: p.original_max_position_embeddings.ok_or_else(|| {
                    ModelError::Config(
                        "rope_scaling `llama3` needs `original_max_position_embeddings`".into(),
                    )
                })?,
            }
        }
        other => {
            return Err(ModelError::Config(format!(
                "unsupported rope_type `{other}`"
            )))
        }
    })
}

impl HfLlamaConfig {
    pub fn into_runtime(self) -> Result<LlamaConfig> {
        let model_type = self.model_type.clone().unwrap_or_else(|| "llama".into());
        let act = self.hidden_act.as_deref().unwrap_or("silu");
        if act != "silu" {
            return Err(ModelError::Config(format!(
                "unsupported hidden_act `{act}` (only silu)"
            )));
        }
        if self.num_attention_heads == 0
            || (!self.hidden_size.is_multiple_of(self.num_attention_heads)
                && self.head_dim.is_none())
        {
            return Err(ModelError::Config(
                "hidden_size is not divisible by num_attention_heads".into(),
            ));
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::Config(
                "num_attention_heads must be a multiple of num_key_value_heads".into(),
            ));
        }
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = match params {
            Some(p) => rope_scaling(p)?,
            None => RopeScaling::None,
        };
        // Qwen2 always has q/k/v biases and no o_proj bias; LLaMA's `attention_bias` covers all four.
        let (qkv_bias, o_bias) = if model_type == "qwen2" {
            (true, false)
        } else {
            let b = self.attention_bias.unwrap_or(false);
            (b, b)
        };
        let sliding_window = match model_type.as_str() {
            "qwen2" if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        };
        Ok(LlamaConfig {
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            model_type,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias,
            sliding_window,
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_ids: all_ids(&self.eos_token_id),
            pad_token_id: first_id(&self.pad_token_id),
        })
    }
}

/// `config.json` of GPT-2 checkpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct HfGpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub n_inner: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
    pub activation_function: Option<String>,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub max_position_embeddings: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl HfGpt2Config {
    pub fn into_runtime(self) -> Result<Gpt2Config> {
        let act = self.activation_function.as_deref().unwrap_or("gelu_new");
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(ModelError::Config(format!(
                "unsupported activation_function `{act}` (only gelu_new)"
            )));
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::Config(
                "n_embd is not divisible by n_head".into(),
            ));
        }
        Ok(Gpt2Config {
            vocab_size: self.vocab_size,
            hidden_size: self.n_embd,
            num_layers: self.n_layer,
            num_heads: self.n_head,
            max_position_embeddings: self.n_positions,
            intermediate_size: self.n_inner.unwrap_or(4 * self.n_embd),
            layer_norm_eps: self.layer_norm_epsilon.unwrap_or(1e-5),
            scale_attn_weights: self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx: self.scale_attn_by_inverse_layer_idx,
            bos_token_id: first_id(&self.bos_token_id),
            eos_token_ids: all_ids(&self.eos_token_id),
            pad_token_id: first_id(&self.pad_token_id),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

impl ModelConfig {
    /// Reads `config.json`, choosing the architecture from `model_type`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::format(path, msg),
            ModelError::UnknownArchitecture { arch, .. } => ModelError::UnknownArchitecture {
                path: path.to_path_buf(),
                arch,
            },
            e => e,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("invalid JSON: {e}")))?;
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let bad = |e: serde_json::Error| ModelError::Config(e.to_string());
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => Ok(ModelConfig::Llama(
                serde_json::from_value::<HfLlamaConfig>(v)
                    .map_err(bad)?
                    .into_runtime()?,
            )),
            "gpt2" => Ok(ModelConfig::Gpt2(
                serde_json::from_value::<HfGpt2Config>(v)
                    .map_err(bad)?
                    .into_runtime()?,
            )),
            "" => Err(ModelError::Config("`model_type` is missing".into())),
            other => Err(ModelError::UnknownArchitecture {
                path: Default::default(),
                arch: other.into(),
            }),
        }
    }

    pub fn arch_name(&self) -> &str {
        match self {
            ModelConfig::Llama(c) => &c.model_type,
            ModelConfig::Gpt2(_) => "gpt2",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_layers,
            ModelConfig::Gpt2(c) => c.num_layers,
        }
    }

    pub fn context_length(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.max_position_embeddings,
        }
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            ModelConfig::Llama(c) => &c.eos_token_ids,
            ModelConfig::Gpt2(c) => &c.eos_token_ids,
        }
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Llama(c) => c.pad_token_id,
            ModelConfig::Gpt2(c) => c.pad_token_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_theta_top_level_or_rope_parameters() {
        let base = r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2"#;
        let a = ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"llama",{base},"rope_theta":5e5}}"#
        ))
        .unwrap();
        let b = ModelConfig::from_json_str(&format!(
            r#"{{"model_type":"llama",{base},"rope_parameters":{{"rope_theta":5e5,"rope_type":"default"}}}}"#
        ))
        .unwrap();
        assert_eq!(a, b);
        let ModelConfig::Llama(c) = a else { panic!() };
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn llama3_scaling_and_qwen2_bias() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        let ModelConfig::Llama(c) = c else { panic!() };
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                original_max: 8192,
                ..
            }
        ));
        let q = ModelConfig::from_json_str(
            r#"{"model_type":"qwen2","vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap();
        let ModelConfig::Llama(q) = q else { panic!() };
        assert!(q.qkv_bias && !q.o_bias);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = ModelConfig::from_json_str(r#"{"model_type":"mamba"}"#).unwrap_err();
        assert!(e.to_string().contains("mamba"), "{e}");
    }
}
