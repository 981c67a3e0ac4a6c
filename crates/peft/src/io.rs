//! PEFT files: `adapter_config.json` + `adapter_model.safetensors` exactly as PEFT's
//! `save_pretrained` writes them, plus fedllm's own lossless state (`fedllm_adapter.json` +
//! `fedllm_adapter.safetensors`: every trainable tensor, e.g. P-tuning's MLP, for resuming).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use fedllm_model::CausalLm;
use serde_json::{json, Value};

use crate::adapter::{Adapter, AdapterConfig};
use crate::error::{PeftError, Result};
use crate::lora::LoraConfig;
use crate::prefix::{geometry, PrefixConfig};
use crate::prompt::{PromptConfig, EMBEDDING};

fn file_err(path: &Path, msg: impl std::fmt::Display) -> PeftError {
    PeftError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("json");
    std::fs::write(path, text).map_err(|e| file_err(path, e))
}

fn write_tensors(path: &Path, t: &BTreeMap<String, Tensor>) -> Result<()> {
    let map: HashMap<String, Tensor> = t
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, path).map_err(|e| file_err(path, e))
}

fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(file_err(path, "no such file"));
    }
    let m = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| file_err(path, format!("corrupt safetensors: {e}")))?;
    Ok(m.into_iter().collect())
}

fn model_dims(model: &CausalLm) -> (usize, usize, usize) {
    match &model.config {
        fedllm_model::ModelConfig::Llama(c) => {
            (c.hidden_size, c.num_heads, model.layer_ids().len())
        }
        fedllm_model::ModelConfig::Gpt2(c) => (c.hidden_size, c.num_heads, model.layer_ids().len()),
    }
}

/// `adapter_config.json` as PEFT 0.21 writes it.
pub fn peft_config(a: &Adapter, model: &CausalLm, base: &str) -> Value {
    let (hidden, heads, layers) = model_dims(model);
    match &a.config {
        AdapterConfig::Lora(c) => {
            let fan_in_fan_out = matches!(model.config, fedllm_model::ModelConfig::Gpt2(_));
            json!({
                "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
                "base_model_name_or_path": base, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
                "eva_config": null, "exclude_modules": null, "fan_in_fan_out": fan_in_fan_out, "inference_mode": true,
                "init_lora_weights": if c.init == "gaussian" { json!("gaussian") } else { json!(true) },
                "kasa_config": null, "layer_replication": null, "layers_pattern": null, "layers_to_transform": c.layers_to_transform,
                "loftq_config": {}, "lora_alpha": if c.alpha.fract() == 0.0 { json!(c.alpha as i64) } else { json!(c.alpha) }, "lora_bias": false, "lora_dropout": c.dropout,
                "lora_ga_config": null, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
                "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16,
                "r": c.r, "rank_pattern": {}, "revision": null, "target_modules": c.target_modules,
                "target_parameters": null, "task_type": "CAUSAL_LM", "trainable_token_indices": null,
                "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": c.use_rslora,
                "velora_config": null
            })
        }
        AdapterConfig::Prefix(c) => {
            let (_, kv, hd) = geometry(model);
            json!({
                "auto_mapping": null, "base_model_name_or_path": base, "encoder_hidden_size": c.hidden(model),
                "inference_mode": true, "init_weights": null, "modules_to_save": null, "num_attention_heads": kv,
                "num_layers": layers, "num_transformer_submodules": 1, "num_virtual_tokens": c.num_virtual_tokens,
                "peft_type": "PREFIX_TUNING", "peft_version": "0.21.2", "prefix_projection": c.prefix_projection,
                "revision": null, "task_type": "CAUSAL_LM", "token_dim": kv * hd
            })
        }
        AdapterConfig::Prompt(c) => json!({
            "auto_mapping": null, "base_model_name_or_path": base, "inference_mode": true, "modules_to_save": null,
            "num_attention_heads": heads, "num_layers": layers, "num_transformer_submodules": 1,
            "num_virtual_tokens": c.num_virtual_tokens, "peft_type": "PROMPT_TUNING", "peft_version": "0.21.2",
            "prompt_tuning_init": if c.init_text.is_some() { "TEXT" } else { "RANDOM" },
            "prompt_tuning_init_text": c.init_text, "revision": null, "task_type": "CAUSAL_LM", "token_dim": hidden,
            "tokenizer_kwargs": null, "tokenizer_name_or_path": if c.init_text.is_some() { json!(base) } else { json!(null) }
        }),
        AdapterConfig::Ptuning(c) => json!({
            "auto_mapping": null, "base_model_name_or_path": base, "encoder_dropout": 0.0,
            "encoder_hidden_size": c.encoder_hidden_size, "encoder_num_layers": 2,
            "encoder_reparameterization_type": "MLP", "inference_mode": true, "modules_to_save": null,
            "num_attention_heads": heads, "num_layers": layers, "num_transformer_submodules": 1,
            "num_virtual_tokens": c.num_virtual_tokens, "peft_type": "P_TUNING", "peft_version": "0.21.2",
            "revision": null, "task_type": "CAUSAL_LM", "token_dim": hidden
        }),
        AdapterConfig::Full(c) => json!({
            "base_model_name_or_path": base, "peft_type": "FEDLLM_FULL", "patterns": c.patterns, "layers": c.layers,
            "task_type": "CAUSAL_LM"
        }),
    }
}

/// The tensors PEFT's `save_pretrained` writes.
pub fn peft_tensors(a: &Adapter) -> Result<BTreeMap<String, Tensor>> {
    Ok(match &a.config {
        AdapterConfig::Lora(_) | AdapterConfig::Full(_) => a.tensors(),
        _ => BTreeMap::from([(
            "prompt_embeddings".to_string(),
            a.prompt_embeddings()?.detach(),
        )]),
    })
}

/// Writes the PEFT folder (and fedllm's lossless state beside it).
pub fn save(a: &Adapter, model: &CausalLm, dir: &Path, base: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    write_json(
        &dir.join("adapter_config.json"),
        &peft_config(a, model, base),
    )?;
    write_tensors(&dir.join("adapter_model.safetensors"), &peft_tensors(a)?)?;
    let cfg = serde_json::to_value(&a.config).expect("json");
    write_json(&dir.join("fedllm_adapter.json"), &cfg)?;
    write_tensors(&dir.join("fedllm_adapter.safetensors"), &a.tensors())
}

/// Reads an adapter folder: fedllm's own state when present, else PEFT's files (prompt-type
/// adapters then come back as their saved embeddings, as PEFT uses them for inference).
pub fn load(dir: &Path, model: &CausalLm) -> Result<Adapter> {
    let own = dir.join("fedllm_adapter.json");
    if own.exists() {
        let text = std::fs::read_to_string(&own).map_err(|e| file_err(&own, e))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| file_err(&own, e))?;
        let tensors = read_tensors(&dir.join("fedllm_adapter.safetensors"))?;
        return Adapter::from_tensors(model, config, tensors, 0);
    }
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| file_err(&cfg_path, format!("invalid JSON: {e}")))?;
    let need_u = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| file_err(&cfg_path, format!("missing integer `{k}`")))
    };
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    let tensors_path = dir.join("adapter_model.safetensors");
    let mut tensors = read_tensors(&tensors_path)?;
    let config = match peft_type {
        "LORA" => {
            let targets = match v.get("target_modules") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => return Err(file_err(&cfg_path, "missing `target_modules`")),
            };
            if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
                return Err(file_err(&cfg_path, "DoRA adapters are not supported"));
            }
            // Older PEFT versions wrote keys without the adapter name; ours match the golden layout.
            AdapterConfig::Lora(LoraConfig {
                r: need_u("r")?,
                alpha: v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0),
                dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32,
                target_modules: targets,
                use_rslora: v
                    .get("use_rslora")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                init: "kaiming".into(),
                layers_to_transform: match v.get("layers_to_transform") {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(a)) => Some(
                        a.iter()
                            .map(|x| x.as_u64().map(|x| x as usize))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                file_err(&cfg_path, "`layers_to_transform` must list layer indices")
                            })?,
                    ),
                    Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| {
                        file_err(&cfg_path, "`layers_to_transform` must be a layer index")
                    })? as usize]),
                    Some(_) => {
                        return Err(file_err(
                            &cfg_path,
                            "`layers_to_transform` must be a layer index or a list of them",
                        ))
                    }
                },
            })
        }
        "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING" => {
            let emb = tensors
                .remove("prompt_embeddings")
                .ok_or_else(|| file_err(&tensors_path, "missing tensor `prompt_embeddings`"))?;
            tensors = BTreeMap::from([(EMBEDDING.to_string(), emb)]);
            let n = need_u("num_virtual_tokens")?;
            if peft_type == "PREFIX_TUNING" {
                let layers = need_u("num_layers")?;
                if layers != model.layer_ids().len() {
                    return Err(file_err(
                        &cfg_path,
                        format!(
                            "prefix adapter has {layers} layers, the model {}",
                            model.layer_ids().len()
                        ),
                    ));
                }
                AdapterConfig::Prefix(PrefixConfig {
                    num_virtual_tokens: n,
                    prefix_projection: false,
                    encoder_hidden_size: v
                        .get("encoder_hidden_size")
                        .and_then(Value::as_u64)
                        .map(|x| x as usize),
                })
            } else {
                AdapterConfig::Prompt(PromptConfig {
                    num_virtual_tokens: n,
                    init_text: None,
                })
            }
        }
        other => {
            return Err(file_err(
                &cfg_path,
                format!("unsupported peft_type `{other}`"),
            ))
        }
    };
    Adapter::from_tensors(model, config, tensors, 0).map_err(|e| file_err(dir, e))
}
