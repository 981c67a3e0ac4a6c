//! Where named weights come from: a Hugging Face safetensors folder (memory-mapped, sharded or
//! not) or a GGUF file whose names are translated to Hugging Face names, so model code only ever
//! sees HF names.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::gguf::{unpermute_rows, GgufFile};

/// What to do with quantized GGUF weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// Keep matmul weights quantized in memory (small, fast, approximate activations).
    #[default]
    Keep,
    /// Dequantize everything to the compute dtype (what transformers does with a GGUF).
    Dequantize,
    /// Dequantize's numbers, bit for bit, from a sixth of the memory: matmul weights stay in
    /// their blocks ([`Weight::Packed`]) where the CPU kernels can widen them exactly (f32
    /// compute on the CPU, a type `fedllm_kernels` decodes); anything else is dequantized.
    Packed,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of dense weights and activations (F32 or BF16).
    pub dtype: DType,
    pub quant: QuantMode,
    /// Indices of the original layers to build (None = all). Names keep their original index.
    pub layers: Option<Vec<usize>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            quant: QuantMode::Keep,
            layers: None,
        }
    }
}

/// A weight as stored: dense, or quantized blocks that stay quantized.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    /// Blocks the kernels multiply with arithmetic of their own (faster; the last bits, or
    /// on the VNNI path the activations' rounding, differ from the dequantized product's).
    Quant(Arc<QTensor>),
    /// Blocks every product widens to the dequantized f32 values and multiplies exactly as a
    /// dense f32 weight would: the same numbers as `Dense(dequantized)`, bit for bit.
    Packed(Arc<QTensor>),
}

impl Weight {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Quant(q) | Weight::Packed(q) => q.shape().dims().to_vec(),
        }
    }

    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.to_dtype(dtype)?,
            Weight::Quant(q) | Weight::Packed(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        })
    }

    /// The quantized blocks, either way they are multiplied.
    pub fn blocks(&self) -> Option<&Arc<QTensor>> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quant(q) | Weight::Packed(q) => Some(q),
        }
    }
}

enum Source {
    Safetensors {
        st: MmapedSafetensors,
        names: BTreeSet<String>,
    },
    Gguf {
        file: Box<GgufFile>,
        arch: String,
        n_head: usize,
        n_kv_head: usize,
    },
}

pub struct WeightSource {
    src: Source,
    pub opts: LoadOptions,
    pub path: PathBuf,
    /// How many elements were loaded per storage kind, for `info`.
    pub stats: std::sync::Mutex<HashMap<String, usize>>,
}

impl WeightSource {
    /// A Hugging Face folder: `model.safetensors` or the shards listed by `model.safetensors.index.json`.
    pub fn safetensors_dir(dir: &Path, opts: LoadOptions) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index, "missing `weight_map` object"))?;
            let shards: BTreeSet<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(ModelError::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model folder",
            ));
        };
        for f in &files {
            if !f.exists() {
                return Err(ModelError::io(
                    f,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ));
            }
        }
        // SAFETY: read-only mapping of files we do not modify.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            let f = if files.len() == 1 {
                files[0].clone()
            } else {
                dir.to_path_buf()
            };
            ModelError::format(
                f,
                format!("corrupt or truncated safetensors: {}", strip_path(&e)),
            )
        })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            src: Source::Safetensors { st, names },
            opts,
            path: dir.to_path_buf(),
            stats: Default::default(),
        })
    }

    pub fn gguf(file: GgufFile, opts: LoadOptions) -> Result<Self> {
        let arch = file
            .meta_str("general.architecture")
            .unwrap_or("llama")
            .to_string();
        let n_head = file.require_u64(&format!("{arch}.attention.head_count"))? as usize;
        let n_kv_head = file
            .meta_u64(&format!("{arch}.attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let path = file.path.clone();
        Ok(Self {
            src: Source::Gguf {
                file: Box::new(file),
                arch,
                n_head,
                n_kv_head,
            },
            opts,
            path,
            stats: Default::default(),
        })
    }

    pub fn gguf_file(&self) -> Option<&GgufFile> {
        match &self.src {
            Source::Gguf { file, .. } => Some(file),
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.src {
            Source::Safetensors { names, .. } => names.contains(name),
            Source::Gguf { file, .. } => {
                hf_to_gguf(name).is_some_and(|(g, _)| file.tensors.contains_key(&g))
            }
        }
    }

    fn count(&self, kind: String, n: usize) {
        *self.stats.lock().unwrap().entry(kind).or_default() += n;
    }

    /// A weight by HF name, dense in the compute dtype unless `allow_quant` and the file stores
    /// it quantized (and the options keep quantization).
    pub fn get(&self, name: &str, shape: &[usize], allow_quant: bool) -> Result<Weight> {
        let w = match &self.src {
            Source::Safetensors { st, names } => {
                if !names.contains(name) {
                    return Err(ModelError::MissingWeight(name.to_string()));
                }
                let t = st.load(name, &self.opts.device).map_err(|e| {
                    ModelError::format(&self.path, format!("tensor `{name}`: {}", strip_path(&e)))
                })?;
                self.count(format!("{:?}", t.dtype()), t.elem_count());
                Weight::Dense(t.to_dtype(self.opts.dtype)?)
            }
            Source::Gguf {
                file,
                arch,
                n_head,
                n_kv_head,
            } => {
                let (gname, perm_heads) =
                    hf_to_gguf(name).ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
                let info = file
                    .info(&gname)
                    .map_err(|_| ModelError::MissingWeight(name.into()))?;
                // llama.cpp permutes q/k rows only for the `llama` architecture.
                let perm = match perm_heads {
                    Some(PermHeads::Q) if arch == "llama" => {
                        Some(unpermute_rows(info.shape[0], *n_head))
                    }
                    Some(PermHeads::K) if arch == "llama" => {
                        Some(unpermute_rows(info.shape[0], *n_kv_head))
                    }
                    _ => None,
                };
                let q = file.qtensor(&gname, perm.as_deref(), &self.opts.device)?;
                self.count(file.type_name(info.ggml_type), q.shape().elem_count());
                let dense_type =
                    matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                let packable = self.opts.device.is_cpu()
                    && self.opts.dtype == DType::F32
                    && fedllm_kernels::gemm::quant_supported(q.dtype());
                match self.opts.quant {
                    QuantMode::Keep if allow_quant && !dense_type => Weight::Quant(Arc::new(q)),
                    QuantMode::Packed if allow_quant && packable => Weight::Packed(Arc::new(q)),
                    _ => Weight::Dense(q.dequantize(&self.opts.device)?.to_dtype(self.opts.dtype)?),
                }
            }
        };
        if w.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: w.shape(),
            });
        }
        Ok(w)
    }

    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.get(name, shape, false)? {
            Weight::Dense(t) => Ok(t),
            Weight::Quant(_) | Weight::Packed(_) => unreachable!("quantization not allowed"),
        }
    }

    pub fn optional_dense(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.dense(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

fn strip_path(e: &candle_core::Error) -> String {
    // candle appends the path itself in some variants; we name the file once, up front.
    match e {
        candle_core::Error::WithPath { inner, .. } => inner.to_string(),
        e => e.to_string(),
    }
}

enum PermHeads {
    Q,
    K,
}

/// HF name → GGUF name (llama.cpp's tensor naming), and whether rows must be un-permuted.
fn hf_to_gguf(name: &str) -> Option<(String, Option<PermHeads>)> {
    let simple = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some((s.to_string(), None));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let _: usize = idx.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let (g, perm) = match module {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(PermHeads::Q)),
        "self_attn.k_proj" => ("attn_k", Some(PermHeads::K)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{idx}.{g}.{suffix}"), perm))
}

/// GGML type id of a candle quantization type (the GGUF on-disk code).
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// LLaMA weights under HF names → GGUF tensors the way llama.cpp's converter writes them
/// (llama.cpp names, q/k rows permuted for its rotary layout), matrices quantized to `matrices`,
/// vectors kept F32. The inverse of what `WeightSource::gguf` reads.
pub fn llama_to_gguf(
    weights: &std::collections::BTreeMap<String, Tensor>,
    n_head: usize,
    n_kv_head: usize,
    matrices: GgmlDType,
) -> Result<Vec<crate::gguf::GgufTensor>> {
    let mut out = Vec::with_capacity(weights.len());
    for (name, t) in weights {
        let (gname, perm) = hf_to_gguf(name)
            .ok_or_else(|| ModelError::MissingWeight(format!("no GGUF name for `{name}`")))?;
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let t = match perm {
            Some(p) => {
                let heads = if matches!(p, PermHeads::Q) {
                    n_head
                } else {
                    n_kv_head
                };
                // The reader builds HF row i from GGUF row perm[i]; so GGUF row perm[i] = HF row i.
                let perm = unpermute_rows(t.dim(0)?, heads);
                let mut src = vec![0u32; perm.len()];
                for (hf_row, &gguf_row) in perm.iter().enumerate() {
                    src[gguf_row] = hf_row as u32;
                }
                let inv = Tensor::from_vec(src, perm.len(), &Device::Cpu)?;
                t.index_select(&inv, 0)?
            }
            None => t,
        };
        let ty = if t.rank() == 2 {
            matrices
        } else {
            GgmlDType::F32
        };
        let bytes = QTensor::quantize(&t, ty)?.data()?.to_vec();
        out.push((gname, ggml_type_id(ty), t.dims().to_vec(), bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names() {
        let (g, p) = hf_to_gguf("model.layers.12.self_attn.k_proj.weight").unwrap();
        assert_eq!(g, "blk.12.attn_k.weight");
        assert!(matches!(p, Some(PermHeads::K)));
        assert_eq!(
            hf_to_gguf("model.layers.0.mlp.down_proj.weight").unwrap().0,
            "blk.0.ffn_down.weight"
        );
        assert!(hf_to_gguf("model.layers.x.mlp.down_proj.weight").is_none());
    }
}
