//! LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; PEFT's `LoraModel`.
//! y = W x + (alpha / r) · B A dropout(x), with A [r, in] and B [out, r] as PEFT stores them.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use fedllm_model::linear::LoraHook;
use fedllm_model::CausalLm;
use fedllm_rng::Rng;
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::error::{cfg, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    /// Module names or name suffixes (`q_proj`, `self_attn.v_proj`, `c_attn`).
    pub target_modules: Vec<String>,
    /// Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    /// "kaiming" (PEFT's default: A uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero).
    #[serde(default = "kaiming")]
    pub init: String,
    /// PEFT's `layers_to_transform`: only modules of these (original) layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
}

fn kaiming() -> String {
    "kaiming".into()
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            init: kaiming(),
            layers_to_transform: None,
        }
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// PEFT's rule for a list of targets: the module name equals a target or ends with ".target".
    pub fn targets(&self, module: &str) -> bool {
        let in_layers = match &self.layers_to_transform {
            None => true,
            Some(ls) => crate::full::layer_of(module).is_some_and(|l| ls.contains(&l)),
        };
        in_layers
            && self
                .target_modules
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")))
    }
}

/// PEFT's default targets per architecture (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_targets(model: &CausalLm) -> Vec<String> {
    match model.config {
        fedllm_model::ModelConfig::Gpt2(_) => vec!["c_attn".into()],
        fedllm_model::ModelConfig::Llama(_) => vec!["q_proj".into(), "v_proj".into()],
    }
}

pub fn key(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

pub(crate) fn init(
    model: &CausalLm,
    c: &LoraConfig,
    rng: &mut Rng,
) -> Result<BTreeMap<String, Tensor>> {
    if c.r == 0 {
        return Err(cfg("lora r must be at least 1"));
    }
    let mut m = model.clone();
    let mut out = BTreeMap::new();
    for (name, lin) in m.linears_mut() {
        if !c.targets(&name) {
            continue;
        }
        let (o, i) = lin.out_in();
        let a: Vec<f32> = match c.init.as_str() {
            // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = 1/sqrt(in)
            "kaiming" => (0..c.r * i)
                .map(|_| rng.uniform(1.0 / (i as f64).sqrt()) as f32)
                .collect(),
            "gaussian" => (0..c.r * i)
                .map(|_| (rng.normal() / c.r as f64) as f32)
                .collect(),
            other => {
                return Err(cfg(format!(
                    "unknown lora init `{other}` (kaiming, gaussian)"
                )))
            }
        };
        out.insert(
            key(&name, "A"),
            Tensor::from_vec(a, (c.r, i), &Device::Cpu)?,
        );
        out.insert(
            key(&name, "B"),
            Tensor::zeros((o, c.r), candle_core::DType::F32, &Device::Cpu)?,
        );
    }
    if out.is_empty() {
        let names: Vec<String> = m
            .linears_mut()
            .into_iter()
            .map(|(n, _)| n)
            .take(8)
            .collect();
        return Err(cfg(format!(
            "lora target_modules {:?} match no linear layer (e.g. {})",
            c.target_modules,
            names.join(", ")
        )));
    }
    Ok(out)
}

pub(crate) fn attach(
    a: &Adapter,
    c: &LoraConfig,
    model: &mut CausalLm,
    training: bool,
) -> Result<()> {
    for (name, lin) in model.linears_mut() {
        lin.lora = None;
        if !c.targets(&name) {
            continue;
        }
        let dropout = (training && c.dropout > 0.0).then(|| (c.dropout, a.dropout_rng.clone()));
        // Inference records no graph: an output that tracks the Vars keeps every input alive,
        // and a KV cache built from such outputs held each decode step's activations (GBs).
        // A detached tensor shares the Var's storage, so `set_tensors` still reaches it.
        let t = |v: &candle_core::Var| {
            if training {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        lin.lora = Some(LoraHook {
            a: t(a.var(&key(&name, "A"))?),
            b: t(a.var(&key(&name, "B"))?),
            scale: c.scale(),
            dropout,
        });
    }
    Ok(())
}
