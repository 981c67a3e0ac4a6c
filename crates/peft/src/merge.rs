//! Folding LoRA into the base (`merge_and_unload`) and writing the result as a Hugging Face
//! folder that transformers loads: `config.json`, `model.safetensors`, tokenizer files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fedllm_model::{CausalLm, ModelConfig, Tokenizer};
use serde_json::json;

use crate::adapter::{Adapter, AdapterConfig};
use crate::error::{cfg, PeftError, Result};
use crate::lora::key;

/// Every base weight (dequantized, f32) under its HF name, with W += scale · B A on LoRA targets.
pub fn merged_weights(model: &CausalLm, a: &Adapter) -> Result<Vec<(String, Tensor)>> {
    let AdapterConfig::Lora(c) = &a.config else {
        return Err(cfg("only LoRA adapters can be merged into the base"));
    };
    let gpt2 = matches!(model.config, ModelConfig::Gpt2(_));
    let mut out = Vec::new();
    for (name, w) in model.named_weights() {
        let mut t = w.dequantize(DType::F32)?.to_device(&Device::Cpu)?;
        if let Some(module) = name.strip_suffix(".weight") {
            if c.targets(module) && a.params.contains_key(&key(module, "A")) {
                let la = a
                    .var(&key(module, "A"))?
                    .as_tensor()
                    .to_device(&Device::Cpu)?;
                let lb = a
                    .var(&key(module, "B"))?
                    .as_tensor()
                    .to_device(&Device::Cpu)?;
                let delta = (lb.matmul(&la)? * c.scale())?;
                // GPT-2's Conv1D stores [in, out].
                let delta = if gpt2 { delta.t()? } else { delta };
                t = (t + delta)?;
            }
        }
        out.push((name, t));
    }
    Ok(out)
}

fn config_json(model: &CausalLm) -> serde_json::Value {
    match &model.config {
        ModelConfig::Llama(c) => json!({
            "architectures": [match c.model_type.as_str() { "qwen2" => "Qwen2ForCausalLM", "mistral" => "MistralForCausalLM", _ => "LlamaForCausalLM" }],
            "model_type": c.model_type, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias,
            "hidden_act": "silu", "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids.first(),
            "pad_token_id": c.pad_token_id, "torch_dtype": "float32",
        }),
        ModelConfig::Gpt2(c) => json!({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size, "n_embd": c.hidden_size,
            "n_layer": c.num_layers, "n_head": c.num_heads, "n_positions": c.max_position_embeddings,
            "n_inner": c.intermediate_size, "layer_norm_epsilon": c.layer_norm_eps, "activation_function": "gelu_new",
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids.first(), "torch_dtype": "float32",
        }),
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> PeftError {
    PeftError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Writes `weights` as a Hugging Face folder at `out`. Config and tokenizer files are copied from
/// a source folder when the model came from one, else written from the loaded config/tokenizer.
/// The files of a Hugging Face model folder beside its weights.
pub const HF_SIDE_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

pub fn write_hf_folder(
    model: &CausalLm,
    weights: &[(String, Tensor)],
    tokenizer: Option<&Tokenizer>,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let src = &model.source;
    if src.is_dir() {
        for f in HF_SIDE_FILES {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), out.join(f)).map_err(|e| io_err(&out.join(f), e))?;
            }
        }
    } else {
        let p = out.join("config.json");
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&config_json(model)).unwrap(),
        )
        .map_err(|e| io_err(&p, e))?;
        if let Some(t) = tokenizer {
            let p = out.join("tokenizer.json");
            t.inner().save(&p, true).map_err(|e| io_err(&p, e))?;
            let tc = json!({"bos_token": t.bos_token, "eos_token": t.eos_token, "chat_template": t.chat_template,
                            "tokenizer_class": "PreTrainedTokenizerFast"});
            let p = out.join("tokenizer_config.json");
            std::fs::write(&p, serde_json::to_string_pretty(&tc).unwrap())
                .map_err(|e| io_err(&p, e))?;
        }
    }
    let map: HashMap<String, Tensor> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let p = out.join("model.safetensors");
    candle_core::safetensors::save(&map, &p).map_err(|e| io_err(&p, e))
}

/// Writes merged weights as a GGUF file the way llama.cpp's converter lays one out (its tensor
/// names, q/k rows permuted for its rotary layout, 2-D weights in `matrices`, vectors F32).
/// Metadata: a GGUF base's is carried over; a Hugging Face base's config and `tokenizer.json`
/// are written as llama.cpp's keys. LLaMA-family models only.
pub fn write_gguf(
    model: &CausalLm,
    tokenizer: Option<&fedllm_model::Tokenizer>,
    weights: &[(String, Tensor)],
    matrices: candle_core::quantized::GgmlDType,
    out: &Path,
) -> Result<()> {
    use fedllm_model::gguf::{self, GgufFile};
    let src = &model.source;
    let Some(c) = model.config.as_llama() else {
        return Err(cfg("GGUF output is written for LLaMA-family models"));
    };
    let mut meta: Vec<(String, gguf::Value)> = if fedllm_model::model::is_gguf(src) {
        GgufFile::open(src)?
            .metadata
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fedllm.") && k.as_str() != "general.file_type")
            .collect()
    } else {
        let tok = tokenizer.ok_or_else(|| {
            cfg(format!(
                "{}: GGUF output needs the base's tokenizer.json (llama.cpp reads the tokenizer from the file)",
                src.display()
            ))
        })?;
        let name = src.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut m = fedllm_model::model::llama_gguf_metadata(c)?;
        m.push((
            "general.name".into(),
            gguf::Value::String(name.unwrap_or_default()),
        ));
        m.extend(tok.gguf_metadata()?);
        m
    };
    let map: std::collections::BTreeMap<String, Tensor> = weights.iter().cloned().collect();
    let tensors =
        fedllm_model::weights::llama_to_gguf(&map, c.num_heads, c.num_kv_heads, matrices)?;
    // llama.cpp's file-type code for what the matrices hold (0 F32, 1 F16, 3 Q4_1, 7 Q8_0).
    let ftype = match matrices {
        candle_core::quantized::GgmlDType::F32 => 0,
        candle_core::quantized::GgmlDType::F16 => 1,
        candle_core::quantized::GgmlDType::Q4_1 => 3,
        candle_core::quantized::GgmlDType::Q8_0 => 7,
        other => return Err(cfg(format!("GGUF output in {other:?} is not offered"))),
    };
    meta.push(("general.file_type".into(), gguf::Value::U32(ftype)));
    let tmp = out.with_extension("gguf.tmp");
    gguf::write(&tmp, &meta, &tensors).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))
}
