//! Linear layers and embeddings over dense or still-quantized weights, with an optional LoRA
//! branch. A frozen weight goes through `FrozenLinear`, whose backward computes only the input
//! gradient and dequantizes a quantized weight again instead of keeping it alive in the graph.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};

use crate::weights::Weight;

/// Up to this many activation rows, candle's quantized vec-dot kernels beat dequantize + GEMM.
const QMATMUL_MAX_ROWS: usize = 2;
/// Up to this many rows (decoding a batch), our Q4_1/Q8_0 kernel reads the blocks directly.
const QMATVEC_MAX_ROWS: usize = 8;

/// LoRA branch: y += dropout(x) Aᵀ Bᵀ · scale (A [r, in], B [out, r], as PEFT stores them).
#[derive(Clone, Debug)]
pub struct LoraHook {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout mask source for training; None = no dropout.
    pub dropout: Option<(f32, Arc<std::sync::Mutex<crate::rng::Rng>>)>,
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// GPT-2's Conv1D stores the weight [in, out].
    in_out: bool,
    pub lora: Option<LoraHook>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            in_out: false,
            lora: None,
        })
    }

    /// GPT-2's Conv1D: the weight is stored [in, out].
    pub fn conv1d(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            in_out: true,
            lora: None,
        })
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn weight_mut(&mut self) -> &mut Weight {
        &mut self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn bias_mut(&mut self) -> Option<&mut Tensor> {
        self.bias.as_mut()
    }

    pub fn is_in_out(&self) -> bool {
        self.in_out
    }

    /// [out, in] sizes.
    pub fn out_in(&self) -> (usize, usize) {
        let s = self.weight.shape();
        if self.in_out {
            (s[1], s[0])
        } else {
            (s[0], s[1])
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let x2 = x.reshape((rows, k))?;
        let y = self.base(&x2, rows)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                let xin = match &l.dropout {
                    Some((p, rng)) if *p > 0.0 => {
                        let mut rng = rng.lock().unwrap();
                        let keep = 1.0 - *p;
                        let mask: Vec<f32> = (0..x2.elem_count())
                            .map(|_| {
                                if rng.next_f64() < keep as f64 {
                                    1.0 / keep
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let mask = Tensor::from_vec(mask, x2.shape(), x2.device())?
                            .to_dtype(x2.dtype())?;
                        (&x2 * mask)?
                    }
                    _ => x2.clone(),
                };
                let a = l.a.to_dtype(x2.dtype())?;
                let b = l.b.to_dtype(x2.dtype())?;
                let delta = (xin.matmul(&a.t()?)?.matmul(&b.t()?)? * l.scale)?;
                (y + delta)?
            }
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }

    fn base(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) if w.is_variable() || !x.device().is_cpu() || !x.track_op() => {
                // Trainable weight (full fine-tuning), non-CPU device, or no gradient needed:
                // plain candle ops (the custom op only pays off when a backward follows).
                let w = w.to_dtype(x.dtype())?;
                x.matmul(&if self.in_out { w } else { w.t()? })
            }
            Weight::Quant(q)
                if !x.device().is_cpu() || (!x.track_op() && rows > QMATVEC_MAX_ROWS) =>
            {
                let w = q.dequantize(&q.device())?.to_dtype(x.dtype())?;
                x.matmul(&if self.in_out { w } else { w.t()? })
            }
            Weight::Quant(q)
                if rows <= QMATVEC_MAX_ROWS
                    && !x.track_op()
                    && !self.in_out
                    && crate::qmatvec::supported(q.dtype()) =>
            {
                // Our block kernel: f32 activations, all cores, AVX-512 where available.
                let (n, k) = q.shape().dims2()?;
                let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let y = crate::qmatvec::matmul(q.dtype(), &q.data()?, n, k, &xv, rows);
                Tensor::from_vec(y, (rows, n), x.device())?.to_dtype(x.dtype())
            }
            Weight::Quant(q) if rows <= QMATMUL_MAX_ROWS && !x.track_op() && !self.in_out => {
                // Quantized vec-dot kernels take f32 activations (inference only: no backward).
                let mm = QMatMul::from_arc(q.clone())?;
                mm.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(x.dtype())
            }
            _ => x.contiguous()?.apply_op1(FrozenLinear {
                weight: self.weight.clone(),
                in_out: self.in_out,
            }),
        }
    }
}

/// y = x·Wᵀ for a frozen W (dense or quantized). The backward returns only dL/dx, so no weight
/// gradient is computed and a quantized W is dequantized transiently in both passes.
struct FrozenLinear {
    weight: Weight,
    in_out: bool,
}

impl FrozenLinear {
    /// W as [in, out] in `dtype` (a fresh tensor outside any graph).
    fn w_in_out(&self, dtype: DType) -> Result<Tensor> {
        let w = match &self.weight {
            Weight::Dense(w) => w.detach().to_dtype(dtype)?,
            Weight::Quant(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        };
        if self.in_out {
            Ok(w)
        } else {
            w.t()
        }
    }
}

fn storage_to_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("frozen linear: input is not contiguous".into()))?;
    let dev = &Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], l.shape(), dev),
        _ => candle_core::bail!("frozen linear: unsupported input dtype"),
    }
}

fn tensor_to_storage(t: &Tensor) -> Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        d => candle_core::bail!("frozen linear: unsupported dtype {d:?}"),
    })
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_to_tensor(s, l)?;
        let y = x.matmul(&self.w_in_out(x.dtype())?)?;
        Ok((tensor_to_storage(&y)?, y.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self.w_in_out(grad.dtype())?;
        Ok(Some(grad.matmul(&w.t()?)?.to_dtype(arg.dtype())?))
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

    pub fn weight_mut(&mut self) -> &mut Weight {
        &mut self.weight
    }

    /// ids: [B, T] (u32) → [B, T, hidden].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.weight {
            Weight::Dense(w) => w.index_select(&flat, 0)?.to_dtype(self.dtype)?,
            Weight::Quant(q) => q.embedding(&flat)?.to_dtype(self.dtype)?,
        };
        let h = rows.dim(1)?;
        rows.reshape((b, t, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// FrozenLinear's backward (input gradient only) against plain candle ops.
    #[test]
    fn frozen_linear_grad_matches_plain_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let coef = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        for in_out in [false, true] {
            let (wt, lin) = if in_out {
                let wio = w.t().unwrap().contiguous().unwrap();
                (
                    wio.clone(),
                    Linear::conv1d(Weight::Dense(wio), None).unwrap(),
                )
            } else {
                (
                    w.t().unwrap(),
                    Linear::new(Weight::Dense(w.clone()), None).unwrap(),
                )
            };
            let y = lin.forward(x.as_tensor()).unwrap();
            let plain = x.as_tensor().matmul(&wt).unwrap();
            assert!(
                (y.clone() - &plain)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    < 1e-5
            );
            let g1 = (y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (plain * &coef)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap()).unwrap();
            assert!(
                d.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    < 1e-5
            );
        }
    }
}
