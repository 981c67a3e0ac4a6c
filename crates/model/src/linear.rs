//! Linear layers and embeddings over dense or still-quantized weights.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

use crate::weights::Weight;

/// Up to this many activation rows, the quantized vec-dot kernels beat dequantize + GEMM.
const QMATMUL_MAX_ROWS: usize = 2;

#[derive(Clone, Debug)]
enum Kernel {
    /// Weight [out, in] (nn.Linear) or [in, out] when `in_out` (GPT-2 Conv1D).
    Dense {
        w: Tensor,
        in_out: bool,
    },
    Quant(QMatMul),
}

#[derive(Clone, Debug)]
pub struct Linear {
    kernel: Kernel,
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Self::build(weight, bias, false)
    }

    /// GPT-2's Conv1D: the weight is stored [in, out].
    pub fn conv1d(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Self::build(weight, bias, true)
    }

    fn build(weight: Weight, bias: Option<Tensor>, in_out: bool) -> Result<Self> {
        let kernel = match &weight {
            Weight::Dense(w) => Kernel::Dense {
                w: w.clone(),
                in_out,
            },
            Weight::Quant(q) if !in_out => Kernel::Quant(QMatMul::from_arc(q.clone())?),
            Weight::Quant(q) => Kernel::Dense {
                w: q.dequantize(&q.device())?,
                in_out,
            },
        };
        Ok(Self {
            kernel,
            weight,
            bias,
        })
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.kernel {
            Kernel::Dense { w, in_out } => {
                let dims = x.dims().to_vec();
                let k = dims[dims.len() - 1];
                let rows = x.elem_count() / k;
                let x2 = x.reshape((rows, k))?;
                let wt = if *in_out { w.clone() } else { w.t()? };
                let y = x2.matmul(&wt)?;
                let mut out = dims;
                *out.last_mut().unwrap() = y.dim(1)?;
                y.reshape(out)?
            }
            Kernel::Quant(q) => {
                let dtype = x.dtype();
                let rows = x.elem_count() / x.dim(x.rank() - 1)?;
                if rows <= QMATMUL_MAX_ROWS {
                    // Quantized kernels take f32 activations.
                    q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                        .to_dtype(dtype)?
                } else {
                    // candle's quantized matmul costs the same per row at any batch size, so
                    // larger inputs dequantize the weight transiently and use the dense GEMM.
                    let w = match &self.weight {
                        Weight::Quant(t) => t.dequantize(&t.device())?.to_dtype(dtype)?,
                        Weight::Dense(t) => t.clone(),
                    };
                    let k = x.dim(x.rank() - 1)?;
                    let mut out = x.dims().to_vec();
                    *out.last_mut().unwrap() = w.dim(0)?;
                    x.reshape((rows, k))?.matmul(&w.t()?)?.reshape(out)?
                }
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Weight,
    dtype: DType,
}

impl Embedding {
    pub fn new(weight: Weight, dtype: DType) -> Self {
        Self { weight, dtype }
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// ids: [B, T] (u32) → [B, T, hidden].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.weight {
            Weight::Dense(w) => w.index_select(&flat, 0)?,
            Weight::Quant(q) => q.embedding(&flat)?.to_dtype(self.dtype)?,
        };
        let h = rows.dim(1)?;
        rows.reshape((b, t, h))
    }
}
