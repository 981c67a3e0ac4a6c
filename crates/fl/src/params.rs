//! Named flat parameter sets: what travels between server and clients. FL code never sees a
//! model, only these.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Tensors by name, fp32 on the CPU.
pub type ParamSet = BTreeMap<String, Tensor>;

/// Shapes by name, in the set's (sorted) order.
pub fn layout(p: &ParamSet) -> Vec<(String, Vec<usize>)> {
    p.iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

pub fn flatten(p: &ParamSet) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(p.values().map(|t| t.elem_count()).sum());
    for t in p.values() {
        out.extend(
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

pub fn unflatten(flat: &[f32], layout: &[(String, Vec<usize>)]) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    let mut at = 0;
    for (name, shape) in layout {
        let n: usize = shape.iter().product();
        out.insert(
            name.clone(),
            Tensor::from_slice(&flat[at..at + n], shape.as_slice(), &Device::Cpu)?,
        );
        at += n;
    }
    Ok(out)
}

/// Bytes of the raw fp32 payload.
pub fn bytes(p: &ParamSet) -> usize {
    p.values().map(|t| t.elem_count() * 4).sum()
}

/// Whether tensor `name` stays on the clients under the `federate.local_tensors` patterns.
pub fn kept_local(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| fedllm_peft::full::glob(p, name))
}
