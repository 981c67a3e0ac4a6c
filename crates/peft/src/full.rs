//! Full fine-tuning, of the whole model or of a chosen subset (by name pattern and/or layer
//! indices): offsite tuning trains only the layers around a frozen emulator. The trainable
//! tensors keep their Hugging Face names.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use fedllm_model::{CausalLm, Weight};
use serde::{Deserialize, Serialize};

use crate::error::{cfg, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FullConfig {
    /// Glob patterns (`*` = any run of characters) over HF names; empty = every parameter.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Only parameters of these (original) layer indices; None = no layer restriction.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// With `layers`: also the tensors outside every layer (embeddings, final norm, LM head),
    /// which offsite tuning trains with the edge layers unless told not to.
    #[serde(default)]
    pub non_layer: bool,
}

pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(p) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            match rest.find(p) {
                Some(k) => rest = &rest[k + p.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The layer index in a name like `model.layers.3.mlp...` or `transformer.h.3.attn...`.
pub fn layer_of(name: &str) -> Option<usize> {
    let mut it = name.split('.');
    while let Some(p) = it.next() {
        if p == "layers" || p == "h" {
            return it.next()?.parse().ok();
        }
    }
    None
}

impl FullConfig {
    pub fn selects(&self, name: &str) -> bool {
        let by_pattern = self.patterns.is_empty() || self.patterns.iter().any(|p| glob(p, name));
        let by_layer = match &self.layers {
            None => true,
            Some(ls) => match layer_of(name) {
                Some(l) => ls.contains(&l),
                None => self.non_layer,
            },
        };
        by_pattern && by_layer
    }
}

pub(crate) fn init(model: &CausalLm, c: &FullConfig) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, w) in model.named_weights() {
        if !c.selects(&name) {
            continue;
        }
        match w {
            Weight::Dense(t) => {
                out.insert(name, t.to_dtype(DType::F32)?);
            }
            Weight::Quant(_) | Weight::Packed(_) => {
                return Err(cfg(format!(
                "`{name}` is quantized and cannot be trained in full; load the model dequantized"
            )))
            }
        }
    }
    if out.is_empty() {
        return Err(cfg(
            "full fine-tuning selects no parameter (check patterns and layers)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert!(glob("*.mlp.*", "model.layers.0.mlp.up_proj.weight"));
        assert!(!glob("*.mlp.*", "model.layers.0.self_attn.q_proj.weight"));
        assert!(glob("model.norm.weight", "model.norm.weight"));
        let mut c = FullConfig {
            patterns: vec![],
            layers: Some(vec![0, 29]),
            non_layer: false,
        };
        assert!(c.selects("model.layers.29.mlp.up_proj.weight"));
        assert!(!c.selects("model.layers.2.mlp.up_proj.weight"));
        assert!(!c.selects("model.embed_tokens.weight"));
        c.non_layer = true;
        assert!(c.selects("model.embed_tokens.weight") && c.selects("model.norm.weight"));
        assert!(!c.selects("model.layers.2.mlp.up_proj.weight"));
        assert_eq!(layer_of("transformer.h.11.attn.c_attn.weight"), Some(11));
    }
}
