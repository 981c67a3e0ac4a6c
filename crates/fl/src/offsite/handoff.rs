//! The emulator as a model file: the server exports it once, a client loads it like any model
//! (`model.path`), and only the edge layers travel in the rounds. The frozen middle may travel
//! compressed (`offsite.emulator_quant`); the file lists its layers (GGUF key
//! `fedllm.emulator.layers`, or `fedllm_emulator.json` in a Hugging Face folder), so the
//! loader builds exactly those and names keep their original indices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use fedllm_model::gguf::{self, GgufFile, Value};
use fedllm_model::CausalLm;

use super::Layout;
use crate::config::EmulatorQuant;
use crate::error::{FlError, Result};

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

/// Where `export` writes for a base at `source`: `emulator.gguf` for a GGUF base, else the
/// folder `emulator/`.
pub fn path_for(outdir: &Path, source: &Path) -> PathBuf {
    if fedllm_model::model::is_gguf(source) {
        outdir.join("emulator.gguf")
    } else {
        outdir.join("emulator")
    }
}

/// Writes `emulator` (built from the model at `source`) under `outdir`; returns the path and
/// its size in bytes (what each client downloads once).
pub fn export(
    emulator: &CausalLm,
    source: &Path,
    layout: &Layout,
    quant: EmulatorQuant,
    outdir: &Path,
) -> Result<(PathBuf, u64)> {
    let mut middle = BTreeMap::new();
    let mut rest = BTreeMap::new();
    for (name, w) in emulator.named_weights() {
        let t = w.dequantize(DType::F32)?;
        match fedllm_peft::full::layer_of(&name) {
            Some(l) if layout.kept.contains(&l) => middle.insert(name, t),
            _ => rest.insert(name, t),
        };
    }
    let path = path_for(outdir, source);
    std::fs::create_dir_all(outdir).map_err(|e| io(outdir, e))?;
    let layers: Vec<usize> = layout.emulator_layers();
    if fedllm_model::model::is_gguf(source) {
        let Some(c) = emulator.config.as_llama() else {
            return Err(FlError::Config(
                "offsite: a GGUF emulator is written for LLaMA-family bases; use a Hugging Face folder for GPT-2".into(),
            ));
        };
        let ty = match quant {
            EmulatorQuant::None => GgmlDType::F32,
            EmulatorQuant::F16 => GgmlDType::F16,
            EmulatorQuant::Q8_0 => GgmlDType::Q8_0,
            EmulatorQuant::Q4_1 => GgmlDType::Q4_1,
            EmulatorQuant::Bf16 => {
                return Err(FlError::Config(
                    "offsite.emulator_quant bf16 is for Hugging Face folders; a GGUF emulator takes none, f16, q8_0 or q4_1".into(),
                ))
            }
        };
        let (h, kv) = (c.num_heads, c.num_kv_heads);
        let mut tensors = fedllm_model::weights::llama_to_gguf(&rest, h, kv, GgmlDType::F32)?;
        tensors.extend(fedllm_model::weights::llama_to_gguf(&middle, h, kv, ty)?);
        let src = GgufFile::open(source)?;
        let mut meta: Vec<(String, Value)> = src
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != "fedllm.emulator.layers")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.push((
            "fedllm.emulator.layers".into(),
            Value::Array(layers.iter().map(|&i| Value::U32(i as u32)).collect()),
        ));
        gguf::write(&path, &meta, &tensors).map_err(|e| io(&path, e))?;
    } else {
        let dt = match quant {
            EmulatorQuant::None => DType::F32,
            EmulatorQuant::F16 => DType::F16,
            EmulatorQuant::Bf16 => DType::BF16,
            q => {
                return Err(FlError::Config(format!(
                    "offsite.emulator_quant {q} needs a GGUF base (block formats live in GGUF); a Hugging Face folder takes none, f16 or bf16"
                )))
            }
        };
        std::fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
        for f in fedllm_peft::merge::HF_SIDE_FILES {
            if source.join(f).exists() {
                std::fs::copy(source.join(f), path.join(f)).map_err(|e| io(&path.join(f), e))?;
            }
        }
        let mut all: std::collections::HashMap<String, Tensor> = rest.into_iter().collect();
        for (n, t) in middle {
            all.insert(n, t.to_dtype(dt)?);
        }
        let st = path.join("model.safetensors");
        candle_core::safetensors::save(&all, &st).map_err(|e| io(&st, e))?;
        let j = path.join("fedllm_emulator.json");
        std::fs::write(&j, serde_json::json!({ "layers": layers }).to_string())
            .map_err(|e| io(&j, e))?;
    }
    Ok((path.clone(), size(&path)?))
}

fn size(p: &Path) -> Result<u64> {
    if p.is_dir() {
        let mut n = 0;
        for e in std::fs::read_dir(p).map_err(|e| io(p, e))? {
            let e = e.map_err(|e| io(p, e))?;
            n += e.metadata().map_err(|e| io(p, e))?.len();
        }
        Ok(n)
    } else {
        Ok(std::fs::metadata(p).map_err(|e| io(p, e))?.len())
    }
}
