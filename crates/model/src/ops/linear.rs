//! Linear layers and embeddings over dense or still-quantized weights, with an optional LoRA
//! branch. A frozen weight goes through `FrozenLinear`, whose backward computes only the input
//! gradient and dequantizes a quantized weight again instead of keeping it alive in the graph.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Storage, Tensor};
use fedllm_kernels::{ASrc, BSrc, Isa};

use crate::weights::Weight;

/// Up to this many activation rows, candle's quantized vec-dot kernels beat dequantize + GEMM.
const QMATMUL_MAX_ROWS: usize = 2;
/// Up to this many rows (decoding a batch), our Q4_1/Q8_0 kernel reads the blocks directly.
const QMATVEC_MAX_ROWS: usize = 32;

/// Whether products of `rows` activation rows run on the block kernels (decode-sized work,
/// on `kernels::pool`'s spinning workers) rather than a GEMM (rayon's).
pub fn matvec_rows(rows: usize) -> bool {
    rows <= QMATVEC_MAX_ROWS
}

/// The fewest trailing positions of a [b, t] batch whose products take the kernels that all t
/// take, so the same numbers (each kernel computes a row alike at any row count; which kernel
/// runs depends on the count only through `QMATMUL_MAX_ROWS` and `QMATVEC_MAX_ROWS`).
pub fn same_kernel_tail(b: usize, t: usize) -> usize {
    if b * t <= QMATVEC_MAX_ROWS {
        t
    } else {
        (QMATVEC_MAX_ROWS + 1).div_ceil(b.max(1)).min(t)
    }
}

/// LoRA branch: y += dropout(x) Aᵀ Bᵀ · scale (A [r, in], B [out, r], as PEFT stores them).
#[derive(Clone, Debug)]
pub struct LoraHook {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// Dropout mask source for training; None = no dropout.
    pub dropout: Option<(f32, Arc<std::sync::Mutex<fedllm_rng::Rng>>)>,
}

/// Arithmetic of products with frozen weights on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 operands (our AVX-512 kernel where the CPU has it, candle's otherwise).
    #[default]
    F32,
    /// bf16 operands, f32 sums (torch autocast's numerics): AMX where the OS grants it, else the
    /// fastest path `fedllm_kernels::isa::selected` names.
    Bf16,
    /// Exactly this kernel path (or the best below it this CPU runs): tests and benchmarks.
    Kernel(Isa),
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// GPT-2's Conv1D stores the weight [in, out].
    in_out: bool,
    pub lora: Option<LoraHook>,
    pub precision: MatmulPrecision,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            in_out: false,
            lora: None,
            precision: MatmulPrecision::F32,
        })
    }

    /// GPT-2's Conv1D: the weight is stored [in, out].
    pub fn conv1d(weight: Weight, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight,
            bias,
            in_out: true,
            lora: None,
            precision: MatmulPrecision::F32,
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
        if let Some(y) = self.fused_lora(&x2)? {
            let mut out = dims;
            *out.last_mut().unwrap() = y.dim(1)?;
            return y.reshape(out);
        }
        let y = crate::profile::span(crate::profile::Phase::Matvec, || self.base(&x2, rows))?;
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

    /// `forward` of layers that read the same input (q, k and v; gate and up): where each
    /// takes the same integer prompt GEMM and has no adapter, x is rounded once for all of them
    /// (the same numbers as separate forwards: the rounding depends on x alone).
    pub fn forward_shared<const N: usize>(lins: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let Some(g) = Self::round_once(&lins, &x2)? else {
            let ys: Vec<Tensor> = lins.iter().map(|l| l.forward(x)).collect::<Result<_>>()?;
            return Ok(ys.try_into().expect("one output per layer"));
        };
        let ys = crate::profile::span(crate::profile::Phase::Matvec, || -> Result<Vec<Tensor>> {
            let rounded = IntRows::of_tensor(g, &x2)?;
            let mut ys = Vec::with_capacity(N);
            for lin in lins {
                let Weight::Quant(q) = &lin.weight else {
                    candle_core::bail!("integer prompt product: weight is not kept blocks");
                };
                let n = q.shape().dims2()?.0;
                let y = rounded.product(q, rows)?;
                ys.push(Tensor::from_vec(y, (rows, n), x.device())?);
            }
            Ok(ys)
        })?;
        let mut out = Vec::with_capacity(N);
        for (lin, y) in lins.iter().zip(ys) {
            let y = match &lin.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            };
            let mut shape = dims.clone();
            *shape.last_mut().unwrap() = y.dim(1)?;
            out.push(y.reshape(shape)?);
        }
        Ok(out.try_into().expect("one output per layer"))
    }

    /// silu(gate(x)) · up(x) (LLaMA's SwiGLU) as one product where both layers take the
    /// Int8 prompt GEMM (`round_once`), without bias, on whole 32-column tasks: the bits of
    /// the separate products combined by `fused::swiglu_fwd`. None where any of that fails
    /// (the caller then runs them apart).
    pub fn swiglu_shared(gate: &Linear, up: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let (Weight::Quant(qg), Weight::Quant(qu)) = (&gate.weight, &up.weight) else {
            return Ok(None);
        };
        let n = qg.shape().dims2()?.0;
        let fits = gate.bias.is_none()
            && up.bias.is_none()
            && qg.dtype() == qu.dtype()
            && qg.shape() == qu.shape()
            && n % 32 == 0;
        if !fits || Self::round_once(&[gate, up], &x2)? != Some(IntGemm::I8) {
            return Ok(None);
        }
        let y = crate::profile::span(crate::profile::Phase::Matvec, || -> Result<Vec<f32>> {
            let IntRows::I8(rounded) = IntRows::of_tensor(IntGemm::I8, &x2)? else {
                unreachable!("int8 rounding gives int8 rows");
            };
            // SAFETY: the product writes every element.
            let mut y = unsafe { fedllm_kernels::uninit(rows * n) };
            let (dg, du) = (qg.data()?, qu.data()?);
            fedllm_kernels::gemm_i8::swiglu_rounded(qg.dtype(), (&dg, &du), n, &rounded, &mut y)
                .map_err(|e| candle_core::Error::Msg(format!("SwiGLU product: {e}")))?;
            Ok(y)
        })?;
        let mut shape = dims;
        *shape.last_mut().unwrap() = n;
        Ok(Some(Tensor::from_vec(y, shape, x.device())?))
    }

    /// The integer GEMM for which `forward_shared` rounds x [rows, k] once for `lins`, if
    /// each would take it in `base` (the route to `FrozenLinear` with `prompt_int`) and has
    /// no adapter.
    fn round_once(lins: &[&Linear], x: &Tensor) -> Result<Option<IntGemm>> {
        let rows = x.dim(0)?;
        let mut gemm = None;
        for l in lins {
            let g = l.prompt_int(x).filter(|_| rows > QMATMUL_MAX_ROWS);
            let ok = g.is_some()
                && !l.decodes_blockwise(x)?
                && l.kernel_isa(x).is_some()
                && l.lora.is_none()
                && gemm.is_none_or(|s| Some(s) == g);
            if !ok {
                return Ok(None);
            }
            gemm = g;
        }
        Ok(gemm)
    }

    /// Per-row cross-entropy of `x·Wᵀ` [N, vocab] against `targets`, never holding the logits:
    /// rows go through in chunks, and when `x` tracks gradients the forward also computes each
    /// row's dLoss/dx (softmax − onehot, times W), so the backward only scales it. None when
    /// this layer has no kernel path (bias, LoRA, another device or dtype).
    pub fn fused_cross_entropy(&self, x: &Tensor, targets: &[u32]) -> Option<Result<Tensor>> {
        if self.bias.is_some() || self.lora.is_some() || x.rank() != 2 || x.dtype() != DType::F32 {
            return None;
        }
        let isa = self.kernel_isa(x)?;
        let (n, _) = x.dims2().ok()?;
        let vocab = self.out_in().0;
        if targets.len() != n || targets.iter().any(|&t| t as usize >= vocab) {
            return None;
        }
        let op = HeadCrossEntropy {
            weight: self.weight.clone(),
            in_out: self.in_out,
            isa,
            targets: targets.to_vec(),
            want_grad: x.track_op(),
            dx: std::sync::Mutex::new(None),
        };
        Some(x.contiguous().and_then(|x| x.apply_op1(op)))
    }

    /// `res + self(h)` as one op when this layer has no adapter and a kernel path: the graph
    /// keeps h and res only, not the product before the add.
    pub fn forward_residual(&self, h: &Tensor, res: &Tensor) -> Result<Tensor> {
        match self.residual_op(h)? {
            Some((op, shape)) => {
                let k = h.dim(candle_core::D::Minus1)?;
                let h2 = h.reshape((h.elem_count() / k, k))?.contiguous()?;
                let r2 = res
                    .reshape((h2.dim(0)?, res.elem_count() / h2.dim(0)?))?
                    .contiguous()?;
                crate::profile::span(crate::profile::Phase::Matvec, || h2.apply_op2(&r2, op))?
                    .reshape(shape)
            }
            None => res + self.forward(h)?,
        }
    }

    /// `res + self(silu(gate) · up)` as one op (LLaMA's MLP down projection with its residual):
    /// the graph keeps gate, up and res; the SwiGLU product is recomputed in the backward.
    pub fn forward_swiglu_residual(
        &self,
        gate: &Tensor,
        up: &Tensor,
        res: &Tensor,
    ) -> Result<Tensor> {
        match self.residual_op(gate)? {
            Some((op, shape)) if gate.shape() == up.shape() && up.dtype() == DType::F32 => {
                let k = gate.dim(candle_core::D::Minus1)?;
                let rows = gate.elem_count() / k;
                let g2 = gate.reshape((rows, k))?.contiguous()?;
                let u2 = up.reshape((rows, k))?.contiguous()?;
                let r2 = res.reshape((rows, res.elem_count() / rows))?.contiguous()?;
                crate::profile::span(crate::profile::Phase::Matvec, || g2.apply_op3(&u2, &r2, op))?
                    .reshape(shape)
            }
            _ => res + self.forward(&crate::ops::swiglu(gate, up)?)?,
        }
    }

    fn residual_op(&self, h: &Tensor) -> Result<Option<(ResidualProduct, Vec<usize>)>> {
        if self.lora.is_some()
            || h.dtype() != DType::F32
            || self.bias.as_ref().is_some_and(|b| b.track_op())
            || self.decodes_blockwise(h)?
        {
            return Ok(None);
        }
        let Some(isa) = self.kernel_isa(h) else {
            return Ok(None);
        };
        let bias = match &self.bias {
            Some(b) => Some(std::sync::Arc::new(
                b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            )),
            None => None,
        };
        let mut shape = h.dims().to_vec();
        *shape.last_mut().unwrap() = self.out_in().0;
        let op = ResidualProduct {
            weight: self.weight.clone(),
            in_out: self.in_out,
            isa,
            bias,
            int: self.prompt_int(h),
        };
        Ok(Some((op, shape)))
    }

    /// Base product, bias and LoRA branch as one op (no dropout, f32, kernel path): the graph
    /// keeps x only, instead of four [rows, out] intermediates per adapted layer.
    fn fused_lora(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else { return Ok(None) };
        let no_dropout = l.dropout.as_ref().is_none_or(|(p, _)| *p <= 0.0);
        let f32s = [x, &l.a, &l.b].iter().all(|t| t.dtype() == DType::F32);
        let Some(isa) = self.kernel_isa(x) else {
            return Ok(None);
        };
        if !no_dropout || !f32s || self.bias.as_ref().is_some_and(|b| b.track_op()) {
            return Ok(None);
        }
        let bias = match &self.bias {
            Some(b) => Some(std::sync::Arc::new(
                b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            )),
            None => None,
        };
        let op = LoraLinear {
            weight: self.weight.clone(),
            in_out: self.in_out,
            isa,
            scale: l.scale as f32,
            bias,
        };
        let (a, b) = (l.a.contiguous()?, l.b.contiguous()?);
        Ok(Some(x.contiguous()?.apply_op3(&a, &b, op)?))
    }

    /// The kernel path for this layer, if its product goes through `fedllm_kernels`.
    pub(crate) fn kernel_isa(&self, x: &Tensor) -> Option<Isa> {
        if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return None;
        }
        match &self.weight {
            Weight::Dense(w) if w.track_op() => return None,
            Weight::Dense(w) if !matches!(w.dtype(), DType::F32 | DType::BF16) => return None,
            Weight::Quant(q) | Weight::Packed(q)
                if !fedllm_kernels::gemm::quant_supported(q.dtype()) =>
            {
                return None
            }
            _ => {}
        }
        kernel_isa(self.precision)
    }

    /// The integer GEMM inference prompt rows (more than decoding takes) of kept Q4_1/Q8_0
    /// blocks take on the Int16 and Int8 decode paths: the forward rounds them as decoding
    /// does (16 or 8 bits per block) and multiplies blocks with exact integer dots, at up to
    /// twice (int16) or four times (int8) the f32 FMA rate. Never with gradients: training
    /// keeps the dequantized weights' f32 numbers.
    fn prompt_int(&self, x: &Tensor) -> Option<IntGemm> {
        let g = IntGemm::of(crate::ops::qmatvec::selected())?;
        let ok = matches!(&self.weight, Weight::Quant(q) if g.supported(q.dtype()))
            && !self.in_out
            && !x.track_op()
            && x.dtype() == DType::F32
            && x.device().is_cpu();
        ok.then_some(g)
    }

    /// A few inference rows (decoding): `base` streams the weight once — reading quantized
    /// blocks directly, or dense f32 rows — where the fused residual ops would dequantize or
    /// repack the whole matrix for them.
    fn decodes_blockwise(&self, x: &Tensor) -> Result<bool> {
        use crate::ops::qmatvec::{self, Path};
        // On the VNNI path block products serve every row count (a row's numbers then never
        // depend on how many rows share the call).
        let (kind_ok, any_rows) = match &self.weight {
            Weight::Quant(q) => (
                qmatvec::supported(q.dtype()),
                qmatvec::selected() == Path::Vnni,
            ),
            Weight::Dense(w) => (
                w.dtype() == DType::F32 && !w.track_op() && x.dtype() == DType::F32,
                false,
            ),
            Weight::Packed(_) => (x.dtype() == DType::F32, false),
        };
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        Ok(kind_ok
            && x.device().is_cpu()
            && !x.track_op()
            && !self.in_out
            && (rows <= QMATVEC_MAX_ROWS || any_rows))
    }

    fn base(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        if self.decodes_blockwise(x)? {
            let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let (y, n) = match &self.weight {
                Weight::Dense(w) => {
                    let (n, k) = w.dims2()?;
                    let wv = w.contiguous()?;
                    let (st, l) = wv.storage_and_layout();
                    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*st else {
                        candle_core::bail!("dense decode weight is not f32 on the CPU");
                    };
                    let wd = &data[l.start_offset()..l.start_offset() + n * k];
                    (crate::ops::qmatvec::dense_matmul(wd, n, k, &xv, rows), n)
                }
                // Our block kernels on all cores: their own arithmetic on kept blocks, the
                // dense kernel's on packed ones.
                Weight::Quant(q) | Weight::Packed(q) => {
                    let (n, k) = q.shape().dims2()?;
                    let product = match &self.weight {
                        Weight::Packed(_) => crate::ops::qmatvec::packed_matmul,
                        _ => crate::ops::qmatvec::matmul,
                    };
                    (product(q.dtype(), &q.data()?, n, k, &xv, rows), n)
                }
            };
            return Tensor::from_vec(y, (rows, n), x.device())?.to_dtype(x.dtype());
        }
        if let Weight::Quant(q) = &self.weight {
            if x.device().is_cpu() && !x.track_op() && !self.in_out && rows <= QMATMUL_MAX_ROWS {
                // Quantized vec-dot kernels take f32 activations (inference only: no backward).
                let mm = QMatMul::from_arc(q.clone())?;
                return mm
                    .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(x.dtype());
            }
        }
        if let Some(isa) = self.kernel_isa(x) {
            let op = FrozenLinear {
                weight: self.weight.clone(),
                in_out: self.in_out,
                isa,
                int: self.prompt_int(x),
            };
            return x.contiguous()?.apply_op1(op);
        }
        // Trainable weight (full fine-tuning), another device, or no kernel for this CPU or
        // dtype: plain candle ops, a quantized weight dequantized for the product.
        let w = match &self.weight {
            Weight::Dense(w) => w.to_dtype(x.dtype())?,
            Weight::Quant(q) | Weight::Packed(q) => {
                q.dequantize(&q.device())?.to_dtype(x.dtype())?
            }
        };
        x.matmul(&if self.in_out { w } else { w.t()? })
    }
}

/// The kernel path frozen products take on this machine at `p` (None = candle's matmul).
fn kernel_isa(p: MatmulPrecision) -> Option<Isa> {
    let sel = fedllm_kernels::isa::selected();
    match p {
        MatmulPrecision::Bf16 => Some(sel),
        MatmulPrecision::Kernel(isa) => Some(fedllm_kernels::isa::usable(isa)),
        // Exact f32 products only on an f32 FMA path (never rounding through bf16).
        MatmulPrecision::F32 => [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|&i| i <= sel && fedllm_kernels::isa::supports(i)),
    }
}

/// The f32 FMA kernel path a prompt of an f32 model takes on this machine (None: candle's).
#[cfg(feature = "bench")]
pub(crate) fn f32_kernel_isa() -> Option<Isa> {
    kernel_isa(MatmulPrecision::F32)
}

/// Name of the kernel path at `p`, for reports.
pub fn kernel_path(p: MatmulPrecision) -> Option<&'static str> {
    kernel_isa(p).map(Isa::name)
}

/// y = x·Wᵀ for a frozen W (dense or quantized) through `fedllm_kernels`: a quantized W is
/// dequantized panel by panel inside the GEMM, never as a whole. The backward returns only
/// dL/dx (dX = dY·W, the same kernel with B transposed): no weight gradient.
struct FrozenLinear {
    weight: Weight,
    in_out: bool,
    isa: Isa,
    /// The forward's integer GEMM ([`Linear::prompt_int`]).
    int: Option<IntGemm>,
}

/// Runs `f` on the weight as a `BSrc` (B = Wᵀ when `fwd`, B = W for the input gradient).
fn with_weight<R>(w: &Weight, in_out: bool, fwd: bool, f: impl FnOnce(BSrc) -> R) -> Result<R> {
    let t = fwd != in_out;
    match w {
        Weight::Dense(w) => {
            let (rows, cols) = w.dims2()?;
            let (st, l) = w.storage_and_layout();
            let (a, z) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("frozen linear: weight not contiguous".into())
            })?;
            match &*st {
                Storage::Cpu(CpuStorage::F32(v)) => Ok(f(BSrc::F32 {
                    data: &v[a..z],
                    rows,
                    cols,
                    t,
                })),
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    // SAFETY: half::bf16 is a transparent u16.
                    let d = unsafe {
                        std::slice::from_raw_parts(v[a..z].as_ptr() as *const u16, z - a)
                    };
                    Ok(f(BSrc::Bf16 {
                        data: d,
                        rows,
                        cols,
                        t,
                    }))
                }
                _ => candle_core::bail!("frozen linear: weight must be f32 or bf16 on the CPU"),
            }
        }
        // Packed blocks widen in the panels to the values a dense weight holds.
        Weight::Quant(q) | Weight::Packed(q) => {
            let (rows, cols) = q.shape().dims2()?;
            let data = q.data()?;
            Ok(f(BSrc::Quant {
                dtype: q.dtype(),
                data: &data,
                rows,
                cols,
                t,
            }))
        }
    }
}

/// C [m, ·] (+)= A [m, ·] · op(W) on host f32 rows, W [out, in] frozen: the forward product
/// A·Wᵀ when `fwd`, the input gradient A·W otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn frozen_product(
    w: &Weight,
    in_out: bool,
    fwd: bool,
    a: &[f32],
    m: usize,
    c: &mut [f32],
    accumulate: bool,
    isa: Isa,
) -> Result<()> {
    // Dense f32 on the f32 path: candle's gemm is the faster f32 GEMM here (bench gemm:
    // 246–297 against our 231–278 GFLOP/s), and numerics are the same. Packed blocks are
    // widened whole into a buffer the thread keeps and take the same product: their numbers
    // must be the dense weight's.
    let mut sgemm = |v: &[f32], (rows, cols): (usize, usize)| {
        // B = Mᵀ when t (M the stored matrix [rows, cols]).
        let t = fwd != in_out;
        let (k, n) = if t { (cols, rows) } else { (rows, cols) };
        let c = &mut c[..m * n];
        fedllm_kernels::strided::sgemm((m, n, k), &a[..m * k], false, v, t, c, accumulate, 1.0);
    };
    match (w, isa.f32_fma()) {
        (Weight::Dense(wt), true) if wt.dtype() == DType::F32 => {
            let dims = wt.dims2()?;
            let (st, l) = wt.storage_and_layout();
            if let (Storage::Cpu(CpuStorage::F32(v)), Some((s, e))) = (&*st, l.contiguous_offsets())
            {
                sgemm(&v[s..e], dims);
                return Ok(());
            }
        }
        (Weight::Packed(q), true) => {
            let (rows, cols) = q.shape().dims2()?;
            let data = q.data()?;
            fedllm_kernels::gemm::with_wide(rows * cols, |wide| {
                fedllm_kernels::gemm::dequant_rows(q.dtype(), &data, rows, cols, wide);
                sgemm(wide, (rows, cols))
            });
            return Ok(());
        }
        _ => {}
    }
    with_weight(w, in_out, fwd, |b| {
        fedllm_kernels::matmul_into(ASrc::F32(a), m, b, c, isa, accumulate)
    })?
    .map_err(|e| candle_core::Error::Msg(format!("frozen product: {e}")))
}

/// The integer GEMM prompt rows of kept Q4_1/Q8_0 blocks take: the decode path's activation
/// width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntGemm {
    /// `fedllm_kernels::gemm_i16` (the Int16 path).
    I16,
    /// `fedllm_kernels::gemm_i8` (the Int8 path).
    I8,
}

impl IntGemm {
    fn of(path: crate::ops::qmatvec::Path) -> Option<IntGemm> {
        use crate::ops::qmatvec::Path;
        match path {
            Path::Int16 => Some(IntGemm::I16),
            Path::Int8 => Some(IntGemm::I8),
            _ => None,
        }
    }

    fn supported(self, t: candle_core::quantized::GgmlDType) -> bool {
        match self {
            IntGemm::I16 => fedllm_kernels::gemm_i16::supported(t),
            IntGemm::I8 => fedllm_kernels::gemm_i8::supported(t),
        }
    }
}

/// Prompt rows rounded once for an [`IntGemm`].
enum IntRows {
    I16(fedllm_kernels::gemm_i16::Rounded),
    I8(fedllm_kernels::gemm_i8::Rounded),
}

impl IntRows {
    /// x [m, k] rounded for `g`.
    fn new(g: IntGemm, x: &[f32], k: usize) -> Result<IntRows> {
        let r = match g {
            IntGemm::I16 => fedllm_kernels::gemm_i16::Rounded::new(x, k).map(IntRows::I16),
            IntGemm::I8 => fedllm_kernels::gemm_i8::Rounded::new(x, k).map(IntRows::I8),
        };
        r.map_err(candle_core::Error::Msg)
    }

    /// x2 [rows, k] (contiguous f32 on the CPU) rounded for `g`.
    fn of_tensor(g: IntGemm, x2: &Tensor) -> Result<IntRows> {
        let k = x2.dim(1)?;
        let (st, l) = x2.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(v)), Some((a, z))) = (&*st, l.contiguous_offsets())
        else {
            candle_core::bail!("integer prompt product: input is not contiguous f32");
        };
        IntRows::new(g, &v[a..z], k)
    }

    /// These m rows · Wᵀ for kept Q4_1/Q8_0 blocks.
    fn product(&self, q: &QTensor, m: usize) -> Result<Vec<f32>> {
        use fedllm_kernels::{gemm_i16, gemm_i8};
        let n = q.shape().dims2()?.0;
        let (t, data) = (q.dtype(), q.data()?);
        // SAFETY: the product (not accumulating) writes every element.
        let mut y = unsafe { fedllm_kernels::uninit(m * n) };
        match self {
            IntRows::I16(a) => {
                gemm_i16::matmul_rounded(gemm_i16::Kernel::best(), t, &data, n, a, &mut y, false)
            }
            IntRows::I8(a) => gemm_i8::matmul_rounded(t, &data, n, a, &mut y, false),
        }
        .map_err(|e| candle_core::Error::Msg(format!("frozen product: {e}")))?;
        Ok(y)
    }
}

/// x [m, k] · Wᵀ for kept Q4_1/Q8_0 blocks on the integer GEMM `g`.
fn int_product(g: IntGemm, q: &QTensor, x: &[f32], m: usize, k: usize) -> Result<Vec<f32>> {
    if x.len() != m * k {
        candle_core::bail!(
            "integer prompt product: x has {} values for [{m}, {k}]",
            x.len()
        );
    }
    IntRows::new(g, x, k)?.product(q, m)
}

/// C = A · B for A in CPU storage (f32 or bf16, contiguous), result in A's dtype.
fn kernel_matmul(
    a: &CpuStorage,
    (start, m, k): (usize, usize, usize),
    w: &Weight,
    in_out: bool,
    fwd: bool,
    isa: Isa,
) -> Result<CpuStorage> {
    let n = {
        let s = w.shape();
        let (r, c) = (s[0], s[1]);
        if fwd != in_out {
            r
        } else {
            c
        }
    };
    // SAFETY: the GEMM below writes every element (it does not accumulate).
    let mut out = unsafe { fedllm_kernels::uninit(m * n) };
    let res = match a {
        CpuStorage::F32(v) => {
            let a = &v[start..start + m * k];
            frozen_product(w, in_out, fwd, a, m, &mut out, false, isa)?;
            return Ok(CpuStorage::F32(out));
        }
        CpuStorage::BF16(v) => {
            let v = &v[start..start + m * k];
            // SAFETY: half::bf16 is a transparent u16.
            let a = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) };
            with_weight(w, in_out, fwd, |b| {
                fedllm_kernels::matmul_bf16(ASrc::Bf16(a), m, b, &mut out, isa)
            })?
        }
        _ => candle_core::bail!("frozen linear: input must be f32 or bf16"),
    };
    res.map_err(|e| candle_core::Error::Msg(format!("frozen linear: {e}")))?;
    Ok(match a {
        CpuStorage::BF16(_) => {
            CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
        }
        _ => CpuStorage::F32(out),
    })
}

/// y = res + x·Wᵀ (+ bias) for a frozen W (two inputs), or res + swiglu(gate, up)·Wᵀ (three).
struct ResidualProduct {
    weight: Weight,
    in_out: bool,
    isa: Isa,
    bias: Option<std::sync::Arc<Vec<f32>>>,
    /// The forward's integer GEMM ([`Linear::prompt_int`]).
    int: Option<IntGemm>,
}

impl ResidualProduct {
    /// res + x·Wᵀ + bias, x [m, k] f32.
    /// x borrowed where the integer GEMM reads it in place, owned where the kernel product
    /// needs storage of its own (copied only then).
    fn fwd(
        &self,
        x: std::borrow::Cow<[f32]>,
        m: usize,
        k: usize,
        res: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let mut y = match (&self.weight, self.int) {
            (Weight::Quant(q), Some(g)) => int_product(g, q, &x, m, k)?,
            _ => into_vec(kernel_matmul(
                &CpuStorage::F32(x.into_owned()),
                (0, m, k),
                &self.weight,
                self.in_out,
                true,
                self.isa,
            )?)?,
        };
        let n = y.len() / m.max(1);
        if res.len() != y.len() {
            candle_core::bail!(
                "residual product: residual has {} values, product {}",
                res.len(),
                y.len()
            );
        }
        // By the rows' halves (`kernels::halves`): each core adds the rows its product wrote.
        fedllm_kernels::halves::rows_mut(&mut y, n, |rows, y| {
            let res = &res[rows.start * n..rows.end * n];
            y.iter_mut().zip(res).for_each(|(y, r)| *y += r);
            if let Some(bias) = &self.bias {
                for row in y.chunks_exact_mut(n) {
                    row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b);
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    /// dL/dx = g·W for the product's input x [m, k].
    fn dx(&self, g: &Tensor, m: usize) -> Result<Vec<f32>> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let n = g.dim(1)?;
        let (gs, gl) = g.storage_and_layout();
        let candle_core::Storage::Cpu(gc) = &*gs else {
            candle_core::bail!("residual product: gradient not on the CPU")
        };
        into_vec(kernel_matmul(
            gc,
            (gl.start_offset(), m, n),
            &self.weight,
            self.in_out,
            false,
            self.isa,
        )?)
    }
}

impl candle_core::CustomOp2 for ResidualProduct {
    fn name(&self) -> &'static str {
        "residual-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let x = std::borrow::Cow::Borrowed(f32_slice(s1, l1)?);
        self.fwd(x, m, k, f32_slice(s2, l2)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _res: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let dx = Tensor::from_vec(self.dx(g, m)?, (m, k), x.device())?;
        Ok((Some(dx), Some(g.clone())))
    }
}

impl candle_core::CustomOp3 for ResidualProduct {
    fn name(&self) -> &'static str {
        "swiglu-residual-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (g, u) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        // SAFETY: `swiglu_fwd` writes every value.
        let mut s = unsafe { fedllm_kernels::uninit(g.len()) };
        fedllm_kernels::fused::swiglu_fwd(g, u, &mut s);
        self.fwd(std::borrow::Cow::Owned(s), m, k, f32_slice(s3, l3)?)
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = gate.dims2()?;
        let ds = self.dx(g, m)?;
        let (mut dg, mut du) = (vec![0f32; m * k], vec![0f32; m * k]);
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (candle_core::Storage::Cpu(gc), candle_core::Storage::Cpu(uc)) = (&*gs, &*us) else {
            candle_core::bail!("swiglu product: inputs not on the CPU")
        };
        fedllm_kernels::fused::swiglu_bwd(
            f32_slice(gc, gl)?,
            f32_slice(uc, ul)?,
            &ds,
            &mut dg,
            &mut du,
        );
        let dev = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, (m, k), dev)?),
            Some(Tensor::from_vec(du, (m, k), dev)?),
            Some(g.clone()),
        ))
    }
}

/// y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ for a frozen W and trainable A [r, in], B [out, r].
/// The backward recomputes x·Aᵀ (r columns: cheap) and returns dx, dA, dB.
struct LoraLinear {
    weight: Weight,
    in_out: bool,
    isa: Isa,
    scale: f32,
    bias: Option<std::sync::Arc<Vec<f32>>>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    crate::ops::fused::slice(s, l, "frozen product")
}

fn into_vec(s: CpuStorage) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("lora linear: expects f32"),
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use fedllm_kernels::strided::sgemm;
        let (m, k) = l1.shape().dims2()?;
        let (r, n) = (l2.shape().dims2()?.0, l3.shape().dims2()?.0);
        let (a, b) = (f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let start = l1.start_offset();
        let mut y = into_vec(kernel_matmul(
            s1,
            (start, m, k),
            &self.weight,
            self.in_out,
            true,
            self.isa,
        )?)?;
        if let Some(bias) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b);
            }
        }
        let x = f32_slice(s1, l1)?;
        let mut xa = vec![0f32; m * r];
        sgemm((m, r, k), x, false, a, true, &mut xa, false, 1.0);
        sgemm((m, n, r), &xa, false, b, true, &mut y, true, self.scale);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use fedllm_kernels::strided::sgemm;
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let candle_core::Storage::Cpu(gc) = &*gs else {
            candle_core::bail!("lora linear: gradient not on the CPU")
        };
        let gv = f32_slice(gc, gl)?;
        let (xs, xl) = x.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (
            candle_core::Storage::Cpu(xc),
            candle_core::Storage::Cpu(ac),
            candle_core::Storage::Cpu(bc),
        ) = (&*xs, &*as_, &*bs)
        else {
            candle_core::bail!("lora linear: inputs not on the CPU")
        };
        let (xv, av, bv) = (f32_slice(xc, xl)?, f32_slice(ac, al)?, f32_slice(bc, bl)?);
        let mut xa = vec![0f32; m * r];
        sgemm((m, r, k), xv, false, av, true, &mut xa, false, 1.0);
        let mut gb = vec![0f32; m * r];
        sgemm((m, r, n), gv, false, bv, false, &mut gb, false, 1.0);
        let mut dx = into_vec(kernel_matmul(
            gc,
            (gl.start_offset(), m, n),
            &self.weight,
            self.in_out,
            false,
            self.isa,
        )?)?;
        sgemm((m, k, r), &gb, false, av, false, &mut dx, true, self.scale);
        let mut da = vec![0f32; r * k];
        sgemm((r, k, m), &gb, true, xv, false, &mut da, false, self.scale);
        let mut db = vec![0f32; n * r];
        sgemm((n, r, m), gv, true, &xa, false, &mut db, false, self.scale);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

/// Rows per chunk of the fused head: 128 × 49k-vocabulary logits = 25 MB at a time.
const HEAD_CHUNK: usize = 512;

struct HeadCrossEntropy {
    weight: Weight,
    in_out: bool,
    isa: Isa,
    targets: Vec<u32>,
    want_grad: bool,
    /// dLoss_i/dx_i per row [N, H], filled by the forward for the backward.
    dx: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("head cross-entropy: expects f32")
        };
        let (a, z) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("head cross-entropy: not contiguous".into()))?;
        let x = &v[a..z];
        let (n, h) = l.shape().dims2()?;
        let vocab = {
            let s = self.weight.shape();
            if self.in_out {
                s[1]
            } else {
                s[0]
            }
        };
        let mut loss = vec![0f32; n];
        let mut dx = if self.want_grad {
            // SAFETY: each chunk's input-gradient GEMM writes its rows whole.
            unsafe { fedllm_kernels::uninit(n * h) }
        } else {
            Vec::new()
        };
        // SAFETY: each chunk's GEMM writes the rows it uses before the softmax reads them.
        let mut logits = unsafe { fedllm_kernels::uninit(HEAD_CHUNK.min(n) * vocab) };
        let kerr = |e: String| candle_core::Error::Msg(format!("head cross-entropy: {e}"));
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let m = HEAD_CHUNK.min(n - r0);
            let lg = &mut logits[..m * vocab];
            let xa = ASrc::F32(&x[r0 * h..(r0 + m) * h]);
            with_weight(&self.weight, self.in_out, true, |b| {
                fedllm_kernels::matmul_bf16(xa, m, b, lg, self.isa)
            })?
            .map_err(kerr)?;
            let tg = &self.targets[r0..r0 + m];
            let want = self.want_grad;
            loss[r0..r0 + m]
                .par_iter_mut()
                .zip(lg.par_chunks_mut(vocab))
                .zip(tg.par_iter())
                .for_each(|((li, row), &t)| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let target = row[t as usize];
                    let sum = if want {
                        // One exp pass: store exp(x − max), then scale to the softmax.
                        let sum = fedllm_kernels::vexp::exp_sub(row, max, 1.0);
                        let inv = 1.0 / sum;
                        row.iter_mut().for_each(|x| *x *= inv);
                        row[t as usize] -= 1.0;
                        sum
                    } else {
                        fedllm_kernels::vexp::sum_exp(row, max)
                    };
                    *li = max + sum.ln() - target;
                });
            if want {
                let d = &mut dx[r0 * h..(r0 + m) * h];
                with_weight(&self.weight, self.in_out, false, |b| {
                    fedllm_kernels::matmul_bf16(ASrc::F32(lg), m, b, d, self.isa)
                })?
                .map_err(kerr)?;
            }
        }
        if self.want_grad {
            *self.dx.lock().unwrap_or_else(|e| e.into_inner()) = Some(dx);
        }
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, h) = arg.dims2()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let mut dx = self
            .dx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "head cross-entropy: backward ran twice or without a tracked forward".into(),
                )
            })?;
        for (row, &gi) in dx.chunks_exact_mut(h).zip(&g) {
            row.iter_mut().for_each(|x| *x *= gi);
        }
        Ok(Some(Tensor::from_vec(dx, (n, h), arg.device())?))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, _) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen linear: input is not contiguous".into())
        })?;
        let (m, k) = l.shape().dims2()?;
        let out = match (&self.weight, s, self.int) {
            (Weight::Quant(q), CpuStorage::F32(v), Some(g)) => {
                CpuStorage::F32(int_product(g, q, &v[start..start + m * k], m, k)?)
            }
            _ => kernel_matmul(s, (start, m, k), &self.weight, self.in_out, true, self.isa)?,
        };
        let n = match &out {
            CpuStorage::F32(v) => v.len() / m.max(1),
            CpuStorage::BF16(v) => v.len() / m.max(1),
            _ => 0,
        };
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(arg.dtype())?.contiguous()?;
        let (m, n) = g.dims2()?;
        let k = arg.dim(1)?;
        let (st, l) = g.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            candle_core::bail!("frozen linear: gradient not on the CPU")
        };
        let at = (l.start_offset(), m, n);
        let dx = kernel_matmul(cs, at, &self.weight, self.in_out, false, self.isa)?;
        drop(st);
        let t = match dx {
            CpuStorage::F32(v) => Tensor::from_vec(v, (m, k), arg.device())?,
            CpuStorage::BF16(v) => Tensor::from_vec(v, (m, k), arg.device())?,
            _ => candle_core::bail!("frozen linear: unexpected gradient dtype"),
        };
        Ok(Some(t))
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
            Weight::Quant(q) | Weight::Packed(q) => q.embedding(&flat)?.to_dtype(self.dtype)?,
        };
        let h = rows.dim(1)?;
        rows.reshape((b, t, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::Var;

    /// Decode rows against block-quantized (and dense f32) weights take the streaming kernels
    /// in the fused residual products too: res + x·Wᵀ and res + silu(g)·u·Wᵀ for 1 and 8 rows,
    /// on every block-product path. The f32 paths give the dequantized matrix's values (f32
    /// sums of the same products in another order: 1e-4 relative covers k = 256 terms); the
    /// VNNI and Int8 paths, whose 8-bit activations are checked in `qmatvec`, give exactly res
    /// plus their own product (the same kernel: nothing but the residual add differs).
    #[test]
    fn decode_rows_through_quantized_residual_products() {
        use crate::ops::qmatvec;
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let w = fedllm_testing::randn(201, 0f32, 1.0, (96, 256), &dev).unwrap();
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
            let q = QTensor::quantize(&w, t).unwrap();
            let wd = q.dequantize(&dev).unwrap();
            let raw = q.data().unwrap().to_vec();
            let weight = match t {
                GgmlDType::F32 => Weight::Dense(wd.clone()),
                _ => Weight::Quant(std::sync::Arc::new(q)),
            };
            let lin = Linear::new(weight, None).unwrap();
            for (path, rows) in qmatvec::available()
                .into_iter()
                .flat_map(|p| [(p, 1), (p, 8)])
            {
                let x = fedllm_testing::randn(202, 0f32, 1.0, (rows, 256), &dev).unwrap();
                let u = fedllm_testing::randn(203, 0f32, 1.0, (rows, 256), &dev).unwrap();
                let res = fedllm_testing::randn(204, 0f32, 1.0, (rows, 96), &dev).unwrap();
                let own = path.activation_bits() == Some(8) && t != GgmlDType::F32;
                let product = |x: &Tensor| -> Tensor {
                    if own {
                        let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                        let y = qmatvec::with_path(path, || {
                            qmatvec::matmul(t, &raw, 96, 256, &xv, rows)
                        });
                        Tensor::from_vec(y, (rows, 96), &dev).unwrap()
                    } else {
                        x.matmul(&wd.t().unwrap()).unwrap()
                    }
                };
                let sw = crate::ops::swiglu(&x, &u).unwrap();
                let (got, got_sw) = qmatvec::with_path(path, || {
                    (
                        lin.forward_residual(&x, &res).unwrap(),
                        lin.forward_swiglu_residual(&x, &u, &res).unwrap(),
                    )
                });
                for (got, input, what) in [(got, &x, "x"), (got_sw, &sw, "swiglu")] {
                    let want = (&res + product(input)).unwrap();
                    let scale = 1.0
                        + fedllm_testing::max_abs_diff(&want, &want.zeros_like().unwrap()).unwrap();
                    let d = fedllm_testing::max_abs_diff(&got, &want).unwrap();
                    let tol = if own { 0.0 } else { 1e-4 * scale };
                    assert!(d <= tol, "{path:?} {t:?} {what} rows {rows}: {d}");
                }
            }
        }
    }

    /// Prompt rows (40: more than decoding takes) of kept Q4_1/Q8_0 blocks on the Int16 (Int8)
    /// path take the int16 (int8) GEMM in every way a Linear multiplies at inference (plain,
    /// fused residual, fused SwiGLU residual): exactly `prompt_matmul`'s numbers (plus the
    /// residual), which stay within the rounding of the dequantized product: each activation
    /// moves by at most half its block's step d = max|x|/L (L = 32767 or 127), so output j
    /// moves by at most Σ_b d_b/2 · Σ_{t∈b} |w_jt|, plus f32 summation (1e-4 relative, as
    /// above). With gradients tracked the prompt keeps the dequantized f32 numbers of the other
    /// paths.
    #[test]
    fn prompt_rows_on_integer_paths_take_their_integer_product() {
        use crate::ops::qmatvec::Path;
        let mut ran = false;
        for (path, levels) in [(Path::Int16, 32767.0), (Path::Int8, 127.0)] {
            if path.supported() {
                prompt_rows_take_the_integer_product(path, levels);
                ran = true;
            } else {
                eprintln!("note: this CPU cannot run {path:?}; its prompt GEMM is not exercised");
            }
        }
        assert!(ran || !cfg!(target_arch = "x86_64") || !fedllm_kernels::avx2::available());
    }

    fn prompt_rows_take_the_integer_product(path: crate::ops::qmatvec::Path, levels: f32) {
        use crate::ops::qmatvec::{self, Path};
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (rows, n, k) = (40, 96, 576);
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = fedllm_testing::randn(221, 0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, t).unwrap();
            let wd = q.dequantize(&dev).unwrap();
            let raw = q.data().unwrap().to_vec();
            let lin = Linear::new(Weight::Quant(std::sync::Arc::new(q)), None).unwrap();
            let x = fedllm_testing::randn(222, 0f32, 1.0, (rows, k), &dev).unwrap();
            let u = fedllm_testing::randn(223, 0f32, 1.0, (rows, k), &dev).unwrap();
            let res = fedllm_testing::randn(224, 0f32, 1.0, (rows, n), &dev).unwrap();
            let sw = crate::ops::swiglu(&x, &u).unwrap();
            let (plain, resid, swr) = qmatvec::with_path(path, || {
                (
                    lin.forward(&x).unwrap(),
                    lin.forward_residual(&x, &res).unwrap(),
                    lin.forward_swiglu_residual(&x, &u, &res).unwrap(),
                )
            });
            let absw: Vec<f32> = wd.abs().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (got, input, r, what) in [
                (plain, &x, None, "plain"),
                (resid, &x, Some(&res), "residual"),
                (swr, &sw, Some(&res), "swiglu"),
            ] {
                let xv: Vec<f32> = input.flatten_all().unwrap().to_vec1().unwrap();
                let own = qmatvec::prompt_matmul(path, t, &raw, n, k, &xv, rows).unwrap();
                let own = Tensor::from_vec(own, (rows, n), &dev).unwrap();
                let (own, exact) = match r {
                    Some(r) => (
                        (r + &own).unwrap(),
                        (r + input.matmul(&wd.t().unwrap())).unwrap(),
                    ),
                    None => (own, input.matmul(&wd.t().unwrap()).unwrap()),
                };
                assert_eq!(
                    fedllm_testing::max_abs_diff(&got, &own).unwrap(),
                    0.0,
                    "{path:?} {t:?} {what}"
                );
                let (g, e): (Vec<f32>, Vec<f32>) = (
                    got.flatten_all().unwrap().to_vec1().unwrap(),
                    exact.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let scale = 1.0 + e.iter().fold(0f32, |a, v| a.max(v.abs()));
                for i in 0..rows {
                    for j in 0..n {
                        let bound: f32 = (0..k / 32)
                            .map(|b| {
                                let xs = &xv[i * k + b * 32..i * k + b * 32 + 32];
                                let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / levels;
                                d / 2.0
                                    * absw[j * k + b * 32..j * k + b * 32 + 32]
                                        .iter()
                                        .sum::<f32>()
                            })
                            .sum();
                        let diff = (g[i * n + j] - e[i * n + j]).abs();
                        assert!(
                            diff <= bound + 1e-4 * scale,
                            "{path:?} {t:?} {what} [{i}, {j}]: {diff} > {bound}"
                        );
                    }
                }
            }
            // Tracked (training) rows keep the f32 numbers every other path gives.
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let tracked = qmatvec::with_path(path, || lin.forward(xv.as_tensor()).unwrap());
            let f32s = qmatvec::with_path(Path::Portable, || lin.forward(&x).unwrap());
            assert_eq!(
                fedllm_testing::max_abs_diff(&tracked, &f32s).unwrap(),
                0.0,
                "{t:?}"
            );
            let int = qmatvec::with_path(path, || lin.forward(&x).unwrap());
            assert!(
                fedllm_testing::max_abs_diff(&int, &f32s).unwrap() > 0.0,
                "{path:?} {t:?}"
            );
        }
    }

    /// `forward_shared` (q/k/v, gate/up reading one input) gives each layer its own
    /// `forward`'s output bit for bit: on Int16 and Int8 with 40 prompt rows (one rounding serves a Q4_1
    /// layer, a Q8_0 layer and a Q4_1 layer with a bias), with 3 decode rows (each layer's
    /// decode kernel), and with an adapter on one layer (separate forwards).
    #[test]
    fn shared_input_products_equal_separate_forwards() {
        use crate::ops::qmatvec::Path;
        for path in [Path::Int16, Path::Int8] {
            if path.supported() {
                shared_input_products_on(path);
            } else {
                eprintln!(
                    "note: this CPU cannot run {path:?}; its shared rounding is not exercised"
                );
            }
        }
    }

    /// A layer of kept `t` blocks quantized from seeded normal weights [n, k], with a seeded
    /// bias if asked.
    fn quant_layer(
        seed: u64,
        (n, k): (usize, usize),
        t: candle_core::quantized::GgmlDType,
        bias: bool,
    ) -> Linear {
        let dev = Device::Cpu;
        let w = fedllm_testing::randn(seed, 0f32, 1.0, (n, k), &dev).unwrap();
        let q = candle_core::quantized::QTensor::quantize(&w, t).unwrap();
        let b = bias.then(|| fedllm_testing::randn(seed + 1, 0f32, 1.0, n, &dev).unwrap());
        Linear::new(Weight::Quant(std::sync::Arc::new(q)), b).unwrap()
    }

    fn shared_input_products_on(path: crate::ops::qmatvec::Path) {
        use crate::ops::qmatvec;
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let k = 576;
        let layer =
            |seed: u64, n: usize, t: GgmlDType, bias: bool| quant_layer(seed, (n, k), t, bias);
        let mut lins = [
            layer(231, 96, GgmlDType::Q4_1, false),
            layer(233, 48, GgmlDType::Q8_0, false),
            layer(235, 40, GgmlDType::Q4_1, true),
        ];
        for rows in [40, 3] {
            let x = fedllm_testing::randn(237, 0f32, 1.0, (1, rows, k), &dev).unwrap();
            let [a, b, c] = &lins;
            let (once, shared, alone) = qmatvec::with_path(path, || {
                let alone: Vec<Tensor> = [a, b, c].iter().map(|l| l.forward(&x).unwrap()).collect();
                let x2 = x.reshape((rows, k)).unwrap();
                let once = Linear::round_once(&[a, b, c], &x2).unwrap();
                (once, Linear::forward_shared([a, b, c], &x).unwrap(), alone)
            });
            assert_eq!(once.is_some(), rows > QMATVEC_MAX_ROWS, "{rows} rows");
            for (i, (s, w)) in shared.iter().zip(&alone).enumerate() {
                assert_eq!(s.dims(), w.dims(), "{path:?} {rows} rows, layer {i}");
                assert_eq!(
                    fedllm_testing::max_abs_diff(s, w).unwrap(),
                    0.0,
                    "{path:?} {rows} rows, layer {i}"
                );
            }
        }
        lins[1].lora = Some(LoraHook {
            a: fedllm_testing::randn(239, 0f32, 0.1, (4, k), &dev).unwrap(),
            b: fedllm_testing::randn(240, 0f32, 0.1, (48, 4), &dev).unwrap(),
            scale: 2.0,
            dropout: None,
        });
        let x = fedllm_testing::randn(241, 0f32, 1.0, (40, k), &dev).unwrap();
        let [a, b, c] = &lins;
        let (once, shared, alone) = qmatvec::with_path(path, || {
            let alone: Vec<Tensor> = [a, b, c].iter().map(|l| l.forward(&x).unwrap()).collect();
            let once = Linear::round_once(&[a, b, c], &x).unwrap();
            (once, Linear::forward_shared([a, b, c], &x).unwrap(), alone)
        });
        assert!(once.is_none(), "an adapter's layer has its own forward");
        for (i, (s, w)) in shared.iter().zip(&alone).enumerate() {
            assert_eq!(
                fedllm_testing::max_abs_diff(s, w).unwrap(),
                0.0,
                "adapter, layer {i}"
            );
        }
    }

    /// `swiglu_shared` (gate and up as one Int8 product) equals swiglu of the two layers' own
    /// forwards bit for bit at 40 prompt rows, Q4_1 and Q8_0 (96 columns: three tasks); it
    /// declines (None) on Int16, at 3 decode rows, with a bias, with columns that are not
    /// whole 32-column tasks, and with an adapter, where the layers run apart.
    #[test]
    fn swiglu_shared_equals_the_separate_forwards_combined() {
        use crate::ops::qmatvec::{self, Path};
        use candle_core::quantized::GgmlDType;
        if !Path::Int8.supported() {
            eprintln!("note: this CPU cannot run Int8; the fused SwiGLU product does not run");
            return;
        }
        let dev = Device::Cpu;
        let k = 576;
        let layer =
            |seed: u64, n: usize, t: GgmlDType, bias: bool| quant_layer(seed, (n, k), t, bias);
        let fused = |g: &Linear, u: &Linear, rows: usize, path: Path| {
            let x = fedllm_testing::randn(251, 0f32, 1.0, (1, rows, k), &dev).unwrap();
            qmatvec::with_path(path, || {
                let h = Linear::swiglu_shared(g, u, &x).unwrap();
                let apart = crate::ops::swiglu(&g.forward(&x).unwrap(), &u.forward(&x).unwrap());
                (h, apart.unwrap())
            })
        };
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (g, u) = (layer(243, 96, t, false), layer(245, 96, t, false));
            let (h, apart) = fused(&g, &u, 40, Path::Int8);
            let h = h.expect("gate and up take the fused product");
            assert_eq!(h.dims(), apart.dims());
            assert_eq!(
                fedllm_testing::max_abs_diff(&h, &apart).unwrap(),
                0.0,
                "{t:?}"
            );
            assert!(fused(&g, &u, 3, Path::Int8).0.is_none(), "decode rows");
            if Path::Int16.supported() {
                assert!(fused(&g, &u, 40, Path::Int16).0.is_none(), "Int16");
            }
        }
        let t = GgmlDType::Q4_1;
        let (g, u) = (layer(247, 96, t, true), layer(249, 96, t, false));
        assert!(fused(&g, &u, 40, Path::Int8).0.is_none(), "bias");
        let (g, u) = (layer(247, 48, t, false), layer(249, 48, t, false));
        assert!(fused(&g, &u, 40, Path::Int8).0.is_none(), "48 columns");
        let (g, mut u) = (layer(247, 96, t, false), layer(249, 96, t, false));
        u.lora = Some(LoraHook {
            a: fedllm_testing::randn(253, 0f32, 0.1, (4, k), &dev).unwrap(),
            b: fedllm_testing::randn(254, 0f32, 0.1, (96, 4), &dev).unwrap(),
            scale: 2.0,
            dropout: None,
        });
        assert!(fused(&g, &u, 40, Path::Int8).0.is_none(), "adapter");
    }

    /// A packed weight's products are the dequantized dense weight's bit for bit through
    /// every way a Linear multiplies on the CPU (plain, fused residual, fused SwiGLU
    /// residual), for prompt rows (40: the GEMM) and decode rows (1, 3: the streaming
    /// kernel) on every decode path, at SmolLM2's reductions (576, 1536: long enough that two
    /// GEMMs blocking k differently round differently).
    #[test]
    fn packed_products_equal_the_dequantized_weights() {
        use crate::ops::qmatvec;
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        for (t, (n, k)) in [(GgmlDType::Q4_1, (96, 576)), (GgmlDType::Q8_0, (40, 1536))] {
            let w = fedllm_testing::randn(211, 0f32, 1.0, (n, k), &dev).unwrap();
            let q = std::sync::Arc::new(QTensor::quantize(&w, t).unwrap());
            let dense = Linear::new(Weight::Dense(q.dequantize(&dev).unwrap()), None).unwrap();
            let packed = Linear::new(Weight::Packed(q), None).unwrap();
            for (path, rows) in qmatvec::available()
                .into_iter()
                .flat_map(|p| [(p, 1), (p, 3), (p, 40)])
            {
                let x = fedllm_testing::randn(212, 0f32, 1.0, (rows, k), &dev).unwrap();
                let u = fedllm_testing::randn(213, 0f32, 1.0, (rows, k), &dev).unwrap();
                let res = fedllm_testing::randn(214, 0f32, 1.0, (rows, n), &dev).unwrap();
                let all = |l: &Linear| -> Vec<Vec<f32>> {
                    qmatvec::with_path(path, || {
                        [
                            l.forward(&x).unwrap(),
                            l.forward_residual(&x, &res).unwrap(),
                            l.forward_swiglu_residual(&x, &u, &res).unwrap(),
                        ]
                        .iter()
                        .map(|y| y.flatten_all().unwrap().to_vec1().unwrap())
                        .collect()
                    })
                };
                assert_eq!(all(&packed), all(&dense), "{path:?} {t:?} rows {rows}");
            }
        }
    }

    /// FrozenLinear's backward (input gradient only) against plain candle ops.
    #[test]
    fn frozen_linear_grad_matches_plain_matmul() {
        let dev = Device::Cpu;
        let w = fedllm_testing::randn(101, 0f32, 1.0, (5, 3), &dev).unwrap();
        let x = Var::from_tensor(&fedllm_testing::randn(102, 0f32, 1.0, (4, 3), &dev).unwrap())
            .unwrap();
        let coef = fedllm_testing::randn(103, 0f32, 1.0, (4, 5), &dev).unwrap();
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

    /// The one-op LoRA linear (base, bias, scaled B·A branch) equals the composite, value and
    /// gradients of x, A and B, for both weight layouts.
    #[test]
    fn fused_lora_matches_composite() {
        let dev = Device::Cpu;
        let (m, k, n, r) = (7, 13, 9, 3);
        let w = fedllm_testing::randn(104, 0f32, 1.0, (n, k), &dev).unwrap();
        let bias = fedllm_testing::randn(105, 0f32, 1.0, n, &dev).unwrap();
        let x = Var::from_tensor(&fedllm_testing::randn(106, 0f32, 1.0, (m, k), &dev).unwrap())
            .unwrap();
        let a = Var::from_tensor(&fedllm_testing::randn(107, 0f32, 1.0, (r, k), &dev).unwrap())
            .unwrap();
        let b = Var::from_tensor(&fedllm_testing::randn(108, 0f32, 1.0, (n, r), &dev).unwrap())
            .unwrap();
        for in_out in [false, true] {
            let mut lin = if in_out {
                let wio = w.t().unwrap().contiguous().unwrap();
                Linear::conv1d(Weight::Dense(wio), Some(bias.clone())).unwrap()
            } else {
                Linear::new(Weight::Dense(w.clone()), Some(bias.clone())).unwrap()
            };
            lin.precision = MatmulPrecision::Kernel(Isa::Avx512);
            lin.lora = Some(LoraHook {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 0.7,
                dropout: None,
            });
            let fused = lin.forward(x.as_tensor()).unwrap();
            assert!(
                lin.fused_lora(x.as_tensor()).unwrap().is_some()
                    || lin.kernel_isa(x.as_tensor()).is_none()
            );
            let xt = x.as_tensor();
            let comp = (xt
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                + (xt
                    .matmul(&a.as_tensor().t().unwrap())
                    .unwrap()
                    .matmul(&b.as_tensor().t().unwrap())
                    .unwrap()
                    * 0.7)
                    .unwrap())
            .unwrap();
            fedllm_testing::assert_same_op(
                &fused,
                &comp,
                &[&x, &a, &b],
                (1e-4, 1e-4),
                &format!("lora in_out {in_out}"),
            );
        }
    }

    /// The residual products (plain and SwiGLU) equal their composites, values and gradients.
    #[test]
    fn residual_products_match_composites() {
        let dev = Device::Cpu;
        // 80 rows: past `kernels::halves`' 72, so the residual is added by halves.
        let (b, t, k, n) = (2, 40, 11, 6);
        let w = fedllm_testing::randn(109, 0f32, 1.0, (n, k), &dev).unwrap();
        let bias = fedllm_testing::randn(110, 0f32, 1.0, n, &dev).unwrap();
        let mut lin = Linear::new(Weight::Dense(w.clone()), Some(bias.clone())).unwrap();
        lin.precision = MatmulPrecision::Kernel(Isa::Avx512);
        let var = |d: usize| {
            Var::from_tensor(&fedllm_testing::randn(111, 0f32, 1.0, (b, t, d), &dev).unwrap())
                .unwrap()
        };
        let (h, g, u, r) = (var(k), var(k), var(k), var(n));
        let plain = |x: &Tensor| {
            x.broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
        };
        let cases: [(&str, Tensor, Tensor, Vec<&Var>); 2] = [
            (
                "plain",
                lin.forward_residual(h.as_tensor(), r.as_tensor()).unwrap(),
                (r.as_tensor() + plain(h.as_tensor())).unwrap(),
                vec![&h, &r],
            ),
            (
                "swiglu",
                lin.forward_swiglu_residual(g.as_tensor(), u.as_tensor(), r.as_tensor())
                    .unwrap(),
                (r.as_tensor()
                    + plain(&(crate::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap()))
                .unwrap(),
                vec![&g, &u, &r],
            ),
        ];
        for (what, fused, comp, vars) in cases {
            fedllm_testing::assert_same_op(&fused, &comp, &vars, (1e-4, 1e-4), what);
        }
    }

    /// The LM-head cross-entropy (rows in chunks, dLoss/dx made in the forward) equals
    /// log-softmax of the full logits, per-row loss and input gradient, across two row chunks.
    #[test]
    fn head_cross_entropy_matches_composite() {
        let dev = Device::Cpu;
        let (n, h, vocab) = (HEAD_CHUNK + 19, 8, 50);
        let w = fedllm_testing::randn(112, 0f32, 1.0, (vocab, h), &dev).unwrap();
        let mut lin = Linear::new(Weight::Dense(w.clone()), None).unwrap();
        lin.precision = MatmulPrecision::Kernel(Isa::Avx512);
        let x = Var::from_tensor(&fedllm_testing::randn(113, 0f32, 1.0, (n, h), &dev).unwrap())
            .unwrap();
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % vocab) as u32).collect();
        let Some(fused) = lin.fused_cross_entropy(x.as_tensor(), &targets) else {
            return; // no kernel path on this CPU: the composite is what runs
        };
        let fused = fused.unwrap();
        let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let idx = Tensor::from_vec(targets, (n, 1), &dev).unwrap();
        let comp = crate::ops::log_softmax_last(&logits)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        fedllm_testing::assert_same_op(&fused, &comp, &[&x], (1e-4, 1e-4), "head cross-entropy");
    }
}
