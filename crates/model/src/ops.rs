//! The op layer every forward goes through. Each op here is a composite of candle primitives
//! that have a backward, because candle's fused `softmax_last_dim`, `rms_norm`, `rope*` and
//! `layer_norm` drop gradients silently. Device-generic: nothing here assumes the CPU.

use candle_core::{DType, Result, Tensor, D};

/// Reductions run in f32 (f64 stays f64, which the gradient tests use).
fn wide(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 | DType::F32 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// Causal self-attention for full sequences (no KV cache) on the projections' own layout:
/// q [B, T, H·D], k/v [B, T, KV·D], cos/sin [B, 1, T, D], bias [B, 1, T, T]; returns
/// [B, T, H·D]. On the CPU in f32 one op (RoPE inside, grouped heads read in place, no
/// transposes); elsewhere the composite: heads split, rotated, repeated, `attention`.
#[allow(clippy::too_many_arguments)]
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    bias: Option<&Tensor>,
    (h, kv, d): (usize, usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    if fused_f32(&[q, k, v, cos, sin]) && h % kv == 0 && d % 2 == 0 {
        let host = |c: &Tensor| -> Result<std::sync::Arc<Vec<f32>>> {
            Ok(std::sync::Arc::new(c.flatten_all()?.to_vec1()?))
        };
        let op = crate::fused::TrainAttention {
            shape: fedllm_kernels::attention::Shape { b, t, h, kv, d },
            cos: host(cos)?,
            sin: host(sin)?,
            bias: host_bias(bias)?,
            scale: scale as f32,
            lse: std::sync::Mutex::new(Vec::new()),
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let heads = |y: &Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
    let qh = rope(&heads(q, h)?, cos, sin)?;
    let kh = rope(&heads(k, kv)?, cos, sin)?;
    let vh = heads(v, kv)?.contiguous()?;
    let y = gqa_attention(&qh, &kh, &vh, h / kv, scale, bias)?;
    y.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Whether the fused CPU kernels take these tensors.
fn fused_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// LLaMA RMSNorm, computed in f32 as transformers does, then cast back before the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_f32(&[x, weight]) {
        let op = crate::fused::RmsNorm { eps: eps as f32 };
        return x.contiguous()?.apply_op2(&weight.contiguous()?, op);
    }
    rms_norm_composite(x, weight, eps)
}

pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = wide(x)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    // Weights may be fp32 master copies under bf16 compute (full fine-tuning).
    normed.broadcast_mul(&weight.to_dtype(dtype)?)
}

/// GPT-2 LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = wide(x)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?;
    normed
        .broadcast_mul(&weight.to_dtype(dtype)?)?
        .broadcast_add(&bias.to_dtype(dtype)?)
}

/// Softmax over the last dimension in f32. The max is detached: softmax is shift-invariant, so
/// its gradient is unchanged and we avoid a backward through `max`.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// log-softmax over the last dimension in f32.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Non-interleaved rotary embedding (transformers' `rotate_half` form).
/// x: [B, H, T, D]; cos, sin: [B, 1, T, D].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_f32(&[x, cos, sin]) {
        let (b, h, t, d) = x.dims4()?;
        if cos.dims4()? == (b, 1, t, d) && sin.dims4()? == (b, 1, t, d) {
            let host = |c: &Tensor| -> Result<std::sync::Arc<Vec<f32>>> {
                Ok(std::sync::Arc::new(c.flatten_all()?.to_vec1()?))
            };
            let op = crate::fused::Rope {
                cos: host(cos)?,
                sin: host(sin)?,
                dims: (b, h, t, d),
            };
            return x.contiguous()?.apply_op1(op);
        }
    }
    rope_composite(x, cos, sin)
}

pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// silu(gate) · up, LLaMA's MLP gate.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused_f32(&[gate, up]) && gate.shape() == up.shape() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, crate::fused::SwiGlu);
    }
    silu(gate)? * up
}

/// GPT-2's `gelu_new` (tanh approximation); candle's `gelu` is exactly that form.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// Repeat K/V heads for grouped-query attention: [B, KV, T, D] → [B, KV*n_rep, T, D].
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, t, d))?
        .reshape((b, kv * n_rep, t, d))
}

/// Attention with grouped-query heads: q [B, H, T, D], k/v [B, KV, S, D] with H = KV·n_rep.
/// Inference on the CPU (nothing tracks gradients) reads k and v where they lie — no repeated
/// heads, no copies — which is what makes long-context decoding affordable; otherwise the heads
/// are repeated and `attention` (with its backward) runs.
pub fn gqa_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_rep: usize,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    // Decoding steps (few new tokens); a long prefill is better served by matmuls.
    let few = q.dim(2)? <= 16;
    if few && !tracked && q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::BF16) {
        let (b, h, t, d) = q.dims4()?;
        let s = k.dim(2)?;
        let bias = host_bias(bias)?;
        let op = InferAttention {
            scale: scale as f32,
            bias,
            b,
            h,
            t,
            s,
            d,
            n_rep,
        };
        return q.apply_op3_no_bwd(k, v, &op);
    }
    let k = repeat_kv(k, n_rep)?;
    let v = repeat_kv(v, n_rep)?;
    attention(
        &q.contiguous()?,
        &k.contiguous()?,
        &v.contiguous()?,
        scale,
        bias,
    )
}

/// The additive attention bias as host f32 values, shared by the op and its backward.
fn host_bias(bias: Option<&Tensor>) -> Result<Option<std::sync::Arc<Vec<f32>>>> {
    bias.map(|x| {
        Ok(std::sync::Arc::new(
            x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        ))
    })
    .transpose()
}

struct InferAttention {
    scale: f32,
    bias: Option<std::sync::Arc<Vec<f32>>>,
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    d: usize,
    n_rep: usize,
}

/// Element `i` of a 4-d strided view as f32.
struct View<'a> {
    data: Data<'a>,
    start: usize,
    stride: [usize; 4],
}

enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> View<'a> {
    fn new(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> Result<Self> {
        let st = l.stride();
        if st.len() != 4 || st[3] != 1 {
            candle_core::bail!("attention: expected a 4-d view with contiguous rows");
        }
        let data = match s {
            candle_core::CpuStorage::F32(v) => Data::F32(v),
            candle_core::CpuStorage::BF16(v) => Data::Bf16(v),
            _ => candle_core::bail!("attention: unsupported dtype"),
        };
        Ok(Self {
            data,
            start: l.start_offset(),
            stride: [st[0], st[1], st[2], st[3]],
        })
    }

    /// Row (i0, i1, i2) of length `n`, widened into `out`.
    fn row(&self, i0: usize, i1: usize, i2: usize, out: &mut [f32]) {
        let at = self.start + i0 * self.stride[0] + i1 * self.stride[1] + i2 * self.stride[2];
        let n = out.len();
        match self.data {
            Data::F32(v) => out.copy_from_slice(&v[at..at + n]),
            Data::Bf16(v) => out
                .iter_mut()
                .zip(&v[at..at + n])
                .for_each(|(o, x)| *o = x.to_f32()),
        }
    }
}

/// Dot product in 16 independent lanes (a sequential f32 sum would not vectorize).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl candle_core::CustomOp3 for InferAttention {
    fn name(&self) -> &'static str {
        "infer-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        let (h, t, s, d) = (self.h, self.t, self.s, self.d);
        let mut out = vec![0f32; self.b * h * t * d];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || (vec![0f32; d], vec![0f32; d], vec![0f32; s]),
            |(qr, kr, p), (row, o)| {
                let (bi, hi, ti) = (row / (h * t), (row / t) % h, row % t);
                let kv = hi / self.n_rep;
                q.row(bi, hi, ti, qr);
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| &b[(bi * t + ti) * s..(bi * t + ti + 1) * s]);
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    k.row(bi, kv, j, kr);
                    let dot = dot(qr, kr);
                    *pj = dot * self.scale + bias.map_or(0.0, |b| b[j]);
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let inv = 1.0 / sum;
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj * inv;
                    if w == 0.0 {
                        continue;
                    }
                    v.row(bi, kv, j, kr);
                    o.iter_mut().zip(kr.iter()).for_each(|(x, y)| *x += w * y);
                }
            },
        );
        let shape = candle_core::Shape::from((self.b, h, t, d));
        let storage = match s1 {
            candle_core::CpuStorage::BF16(_) => {
                candle_core::CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
            }
            _ => candle_core::CpuStorage::F32(out),
        };
        Ok((storage, shape))
    }
}

/// Scaled dot-product attention. q: [B, H, T, D], k/v: [B, H, S, D], bias: [B, 1, T, S] additive.
/// On the CPU in f32/bf16 this is one op whose backward recomputes the probabilities, so no
/// [B, H, T, S] intermediate is kept between forward and backward (and the softmax runs on all
/// cores); elsewhere (and in f64, for gradient checks) it is the composite below.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::BF16) {
        let (b, h, t, _) = q.dims4()?;
        let s = k.dim(2)?;
        let bias = host_bias(bias)?;
        let op = FusedAttention {
            scale: scale as f32,
            bias,
            b,
            h,
            t,
            s,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    attention_composite(q, k, v, scale, bias)
}

pub fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(b) => scores.broadcast_add(&b.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    softmax_last(&scores)?.matmul(v)
}

/// Mean cross-entropy of next-token prediction: logits [B, T, V] against labels [B, T]
/// (i64, -100 = ignored), labels shifted left by one as transformers does.
/// Returns the loss and the number of counted tokens.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        candle_core::bail!("causal_lm_loss needs at least 2 positions");
    }
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let labels = labels
        .narrow(1, 1, t - 1)?
        .flatten_all()?
        .to_dtype(DType::I64)?;
    let host: Vec<i64> = labels.to_vec1()?;
    let count = host.iter().filter(|&&l| l != -100).count();
    let valid: Vec<f32> = host
        .iter()
        .map(|&l| if l == -100 { 0.0 } else { 1.0 })
        .collect();
    let idx: Vec<u32> = host
        .iter()
        .map(|&l| if l == -100 { 0 } else { l as u32 })
        .collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (b * (t - 1), 1), dev)?;
    let valid = Tensor::from_vec(valid, b * (t - 1), dev)?;
    let logp = log_softmax_last(&logits)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let total = (picked.clone() * valid.to_dtype(picked.dtype())?)?.sum_all()?;
    let loss = (total.neg()? / count.max(1) as f64)?;
    Ok((loss, count))
}

/// Mean cross-entropy of `logits` [N, V] against `targets` (one class per row), as one op whose
/// backward writes softmax − onehot directly: no full-size log-softmax intermediates are kept
/// (the 49k-vocabulary logits of a batch are hundreds of MB). CPU only; other devices use the
/// composite `log_softmax_last` + gather.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {n} rows, {} targets", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} outside the vocabulary ({v})");
    }
    if n == 0 {
        candle_core::bail!("cross_entropy: no rows");
    }
    if !logits.device().is_cpu() {
        let idx = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
        let picked = log_softmax_last(logits)?.gather(&idx, 1)?;
        return picked.sum_all()?.neg()? / n as f64;
    }
    let per_row = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(CrossEntropy {
            targets: targets.to_vec(),
        })?;
    per_row.sum_all()? / n as f64
}

struct CrossEntropy {
    targets: Vec<u32>,
}

fn ce_rows(l: &[f32], v: usize, targets: &[u32], mut f: impl FnMut(usize, &[f32], f32, f32)) {
    for (i, row) in l.chunks_exact(v).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        f(i, row, max, sum);
        let _ = targets;
    }
}

impl candle_core::CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cross_entropy: not contiguous".into()))?;
        let candle_core::CpuStorage::F32(data) = s else {
            candle_core::bail!("cross_entropy: expects f32")
        };
        let data = &data[start..end];
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(64).enumerate().for_each(|(c, o)| {
            let r0 = c * 64;
            let rows = &data[r0 * v..(r0 + o.len()) * v];
            ce_rows(rows, v, &self.targets, |i, row, max, sum| {
                o[i] = max + sum.ln() - row[self.targets[r0 + i] as usize];
            });
        });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(n),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, v) = arg.dims2()?;
        let x: Vec<f32> = arg
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v * 64).enumerate().for_each(|(c, o)| {
            let r0 = c * 64;
            let rows = o.len() / v;
            ce_rows(
                &x[r0 * v..(r0 + rows) * v],
                v,
                &self.targets,
                |i, row, max, sum| {
                    let gi = g[r0 + i];
                    let dst = &mut o[i * v..(i + 1) * v];
                    let scale = gi / sum;
                    for (d, &xv) in dst.iter_mut().zip(row) {
                        *d = (xv - max).exp() * scale;
                    }
                    dst[self.targets[r0 + i] as usize] -= gi;
                },
            );
        });
        Ok(Some(
            Tensor::from_vec(out, (n, v), arg.device())?.to_dtype(arg.dtype())?,
        ))
    }
}

struct FusedAttention {
    scale: f32,
    /// [B, T, S] additive bias (heads share it), None = nothing masked.
    bias: Option<std::sync::Arc<Vec<f32>>>,
    b: usize,
    h: usize,
    t: usize,
    s: usize,
}

fn to_f32_tensor(s: &candle_core::CpuStorage, l: &candle_core::Layout) -> Result<Tensor> {
    let (a, z) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("attention: not contiguous".into()))?;
    let dev = &candle_core::Device::Cpu;
    match s {
        candle_core::CpuStorage::F32(v) => Tensor::from_slice(&v[a..z], l.shape(), dev),
        candle_core::CpuStorage::BF16(v) => {
            Tensor::from_slice(&v[a..z], l.shape(), dev)?.to_dtype(DType::F32)
        }
        _ => candle_core::bail!("attention: unsupported dtype"),
    }
}

impl FusedAttention {
    /// Softmax(scale · S + bias) in place over rows of [B·H·T, S].
    fn softmax_rows(&self, scores: &mut [f32]) {
        use rayon::prelude::*;
        let (h, t, s) = (self.h, self.t, self.s);
        scores.par_chunks_mut(s).enumerate().for_each(|(row, r)| {
            let (bi, ti) = (row / (h * t), row % t);
            match &self.bias {
                Some(bias) => {
                    let br = &bias[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                    for (x, &bb) in r.iter_mut().zip(br) {
                        *x = *x * self.scale + bb;
                    }
                }
                None => r.iter_mut().for_each(|x| *x *= self.scale),
            }
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in r.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            r.iter_mut().for_each(|x| *x *= inv);
        });
    }

    /// Probabilities [B·H, T, S] from q [B·H, T, D] and k [B·H, S, D] (f32).
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = q.matmul(&k.t()?)?;
        let mut v: Vec<f32> = scores.flatten_all()?.to_vec1()?;
        self.softmax_rows(&mut v);
        Tensor::from_vec(v, (self.b * self.h, self.t, self.s), q.device())
    }

    fn flat(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        let d = x.dim(3)?;
        x.to_dtype(DType::F32)?.reshape((self.b * self.h, rows, d))
    }
}

fn to_storage(t: &Tensor, dtype: DType) -> Result<candle_core::CpuStorage> {
    let t = t.flatten_all()?.to_dtype(dtype)?;
    Ok(match dtype {
        DType::BF16 => candle_core::CpuStorage::BF16(t.to_vec1()?),
        _ => candle_core::CpuStorage::F32(t.to_vec1()?),
    })
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let dtype = match s1 {
            candle_core::CpuStorage::BF16(_) => DType::BF16,
            _ => DType::F32,
        };
        let (q, k, v) = (
            to_f32_tensor(s1, l1)?,
            to_f32_tensor(s2, l2)?,
            to_f32_tensor(s3, l3)?,
        );
        let p = self.probs(&self.flat(&q, self.t)?, &self.flat(&k, self.s)?)?;
        let o = p.matmul(&self.flat(&v, self.s)?)?;
        Ok((to_storage(&o, dtype)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let (qf, kf, vf) = (
            self.flat(&q.detach(), self.t)?,
            self.flat(&k.detach(), self.s)?,
            self.flat(&v.detach(), self.s)?,
        );
        let (of, gf) = (self.flat(&o.detach(), self.t)?, self.flat(g, self.t)?);
        let p = self.probs(&qf, &kf)?;
        let dv = p.t()?.matmul(&gf)?;
        let dp: Vec<f32> = gf.matmul(&vf.t()?)?.flatten_all()?.to_vec1()?;
        // D_i = Σ_d dO_id O_id: the softmax backward's row term.
        let dd: Vec<f32> = (&gf * &of)?.sum(2)?.flatten_all()?.to_vec1()?;
        let pv: Vec<f32> = p.flatten_all()?.to_vec1()?;
        let mut ds = vec![0f32; pv.len()];
        let (sc, s) = (self.scale, self.s);
        ds.par_chunks_mut(s).enumerate().for_each(|(row, out)| {
            let at = row * s;
            for j in 0..s {
                out[j] = pv[at + j] * (dp[at + j] - dd[row]) * sc;
            }
        });
        let ds = Tensor::from_vec(ds, (self.b * self.h, self.t, self.s), q.device())?;
        let dq = ds.matmul(&kf)?;
        let dk = ds.t()?.matmul(&qf)?;
        let back = |x: Tensor, like: &Tensor| -> Result<Tensor> {
            x.reshape(like.shape())?.to_dtype(like.dtype())
        };
        Ok((Some(back(dq, q)?), Some(back(dk, k)?), Some(back(dv, v)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use fedllm_testing::max_abs_diff;

    /// Central finite differences of `f` (a scalar) at `x`, against candle's backward.
    fn check_grad(x: &[f32], shape: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let var = Var::from_tensor(&Tensor::from_vec(xd.clone(), shape, &dev).unwrap()).unwrap();
        let y = f(var.as_tensor()).unwrap();
        let grads = y.backward().unwrap();
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-6;
        for i in 0..xd.len() {
            let mut p = xd.clone();
            p[i] += h;
            let mut m = xd.clone();
            m[i] -= h;
            let fp: f64 = f(&Tensor::from_vec(p, shape, &dev).unwrap())
                .unwrap()
                .to_scalar()
                .unwrap();
            let fm: f64 = f(&Tensor::from_vec(m, shape, &dev).unwrap())
                .unwrap()
                .to_scalar()
                .unwrap();
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                "grad[{i}]: fd {fd} vs backward {}",
                g[i]
            );
        }
    }

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 2.0)
            .collect()
    }

    /// A weighted sum makes every output element matter to the scalar being differentiated.
    fn weighted(y: &Tensor) -> Result<Tensor> {
        let n = y.elem_count();
        let w: Vec<f64> = (0..n).map(|i| 0.3 + (i % 5) as f64 * 0.17).collect();
        (y.flatten_all()? * Tensor::from_vec(w, n, y.device())?)?.sum_all()
    }

    #[test]
    fn grad_norms() {
        let w = Tensor::new(&[1.1f64, 0.9, 1.3, 0.7], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0], &Device::Cpu).unwrap();
        check_grad(&data(8), &[2, 4], |x| weighted(&rms_norm(x, &w, 1e-5)?));
        check_grad(&data(8), &[2, 4], |x| {
            weighted(&layer_norm(x, &w, &b, 1e-5)?)
        });
    }

    #[test]
    fn grad_softmax_rope_activations_loss() {
        check_grad(&data(10), &[2, 5], |x| weighted(&softmax_last(x)?));
        check_grad(&data(10), &[2, 5], |x| weighted(&log_softmax_last(x)?));
        check_grad(&data(10), &[2, 5], |x| weighted(&silu(x)?));
        check_grad(&data(10), &[2, 5], |x| weighted(&gelu_new(x)?));
        let labels = Tensor::new(&[[-100i64, 2, 4], [1, -100, 0]], &Device::Cpu).unwrap();
        check_grad(&data(30), &[2, 3, 5], |x| Ok(causal_lm_loss(x, &labels)?.0));
        let cos = Tensor::from_vec(
            data(8).iter().map(|&v| v as f64).collect::<Vec<_>>(),
            (1, 1, 2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let sin = cos.affine(0.5, 0.1).unwrap();
        check_grad(&data(16), &[1, 2, 2, 4], |x| {
            weighted(&rope(x, &cos, &sin)?)
        });
    }

    /// The fused RMSNorm, SwiGLU and RoPE ops equal their composites, values and gradients.
    #[test]
    fn fused_row_ops_match_composites() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], s: f64| {
            Var::from_tensor(
                &(fedllm_testing::randn(201, 0f32, 1.0, shape, &dev).unwrap() * s).unwrap(),
            )
            .unwrap()
        };
        let check = |what: &str, vars: &[&Var], f: &dyn Fn() -> Tensor, c: &dyn Fn() -> Tensor| {
            fedllm_testing::assert_same_op(&f(), &c(), vars, (1e-5, 1e-4), what)
        };
        // 37 rows of 50: not a multiple of the kernels' row blocks.
        let (x, w) = (var(&[37, 50], 2.0), var(&[50], 1.0));
        check(
            "rms_norm",
            &[&x, &w],
            &|| rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            &|| rms_norm_composite(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
        );
        let (g, u) = (var(&[3, 5001], 3.0), var(&[3, 5001], 1.0));
        check(
            "swiglu",
            &[&g, &u],
            &|| swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            &|| (silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap(),
        );
        let x = var(&[2, 3, 5, 8], 1.0);
        let cos = fedllm_testing::randn(202, 0f32, 1.0, (2, 1, 5, 8), &dev).unwrap();
        let sin = fedllm_testing::randn(203, 0f32, 1.0, (2, 1, 5, 8), &dev).unwrap();
        check(
            "rope",
            &[&x],
            &|| rope(x.as_tensor(), &cos, &sin).unwrap(),
            &|| rope_composite(x.as_tensor(), &cos, &sin).unwrap(),
        );
    }

    /// The one-op self-attention equals split heads + RoPE + repeated K/V + the composite,
    /// value and all three gradients, with causal and padding masks and grouped heads.
    #[test]
    fn self_attention_matches_composite() {
        let dev = Device::Cpu;
        for t in [7, 150] {
            // 150 rows: three 64-row blocks, the causal ones reading fewer key columns.
            let (b, h, kv, d) = (2, 6, 2, 8);
            let var = |n: usize| {
                Var::from_tensor(
                    &fedllm_testing::randn(204, 0f32, 1.0, (b, t, n * d), &dev).unwrap(),
                )
                .unwrap()
            };
            let (q, k, v) = (var(h), var(kv), var(kv));
            let cos = fedllm_testing::randn(205, 0f32, 1.0, (b, 1, t, d), &dev).unwrap();
            let sin = fedllm_testing::randn(206, 0f32, 1.0, (b, 1, t, d), &dev).unwrap();
            // Causal, and batch 1 left-padded by 2.
            let mut bias = vec![0f32; b * t * t];
            for bi in 0..b {
                for i in 0..t {
                    for j in 0..t {
                        if j > i || (bi == 1 && j < 2) {
                            bias[(bi * t + i) * t + j] = -1e30;
                        }
                    }
                }
            }
            let bias = Tensor::from_vec(bias, (b, 1, t, t), &dev).unwrap();
            let fused = self_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                (&cos, &sin),
                Some(&bias),
                (h, kv, d),
                0.35,
            )
            .unwrap();
            let heads =
                |y: &Tensor, n: usize| y.reshape((b, t, n, d)).unwrap().transpose(1, 2).unwrap();
            let qh = rope_composite(&heads(q.as_tensor(), h), &cos, &sin).unwrap();
            let kh = rope_composite(&heads(k.as_tensor(), kv), &cos, &sin).unwrap();
            let kh = repeat_kv(&kh, h / kv).unwrap().contiguous().unwrap();
            let vh = repeat_kv(&heads(v.as_tensor(), kv), h / kv)
                .unwrap()
                .contiguous()
                .unwrap();
            let comp = attention_composite(&qh, &kh, &vh, 0.35, Some(&bias))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            fedllm_testing::assert_same_op(
                &fused,
                &comp,
                &[&q, &k, &v],
                (1e-5, 1e-4),
                "self_attention",
            );
        }
    }

    /// The fused cross-entropy op equals the composite loss, value and gradient.
    #[test]
    fn fused_cross_entropy_matches_composite() {
        let dev = Device::Cpu;
        let (n, v) = (70, 33);
        let x = Var::from_tensor(&fedllm_testing::randn(207, 0f32, 3.0, (n, v), &dev).unwrap())
            .unwrap();
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        let fused = cross_entropy(x.as_tensor(), &targets).unwrap();
        let idx = Tensor::from_vec(targets.clone(), (n, 1), &dev).unwrap();
        let comp = (log_softmax_last(x.as_tensor())
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / n as f64)
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            comp.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let g1 = fused
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let g2 = comp.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = max_abs_diff(&g1, &g2).unwrap();
        assert!(d < 1e-6, "{d}");
    }

    /// The fused attention equals the composite, value and all three gradients, with a mask.
    #[test]
    fn fused_attention_matches_composite() {
        let dev = Device::Cpu;
        let (b, h, t, s, d) = (2, 3, 5, 7, 4);
        let q =
            Var::from_tensor(&fedllm_testing::randn(208, 0f32, 1.0, (b, h, t, d), &dev).unwrap())
                .unwrap();
        let k =
            Var::from_tensor(&fedllm_testing::randn(209, 0f32, 1.0, (b, h, s, d), &dev).unwrap())
                .unwrap();
        let v =
            Var::from_tensor(&fedllm_testing::randn(210, 0f32, 1.0, (b, h, s, d), &dev).unwrap())
                .unwrap();
        let bias: Vec<f32> = (0..b * t * s)
            .map(|i| if (i * 7) % 5 == 0 { -1e30 } else { 0.0 })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, s), &dev).unwrap();
        let coef = fedllm_testing::randn(211, 0f32, 1.0, (b, h, t, d), &dev).unwrap();
        for bias in [None, Some(&bias)] {
            let f = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5, bias).unwrap();
            let c = attention_composite(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.5, bias)
                .unwrap();
            let e = max_abs_diff(&f, &c).unwrap();
            assert!(e < 1e-5, "forward {e}");
            let gf = (f * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (c * &coef).unwrap().sum_all().unwrap().backward().unwrap();
            for x in [&q, &k, &v] {
                let e = max_abs_diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gc.get(x.as_tensor()).unwrap(),
                )
                .unwrap();
                assert!(e < 1e-5, "gradient {e}");
            }
        }
    }

    /// The inference kernel reads grouped K/V heads in place (strided views included) and
    /// equals repeating the heads and running the composite; with gradients it falls back.
    #[test]
    fn gqa_inference_attention_matches_composite() {
        let dev = Device::Cpu;
        let (b, kv, n_rep, t, s, d) = (2, 2, 3, 3, 9, 8);
        let q = fedllm_testing::randn(212, 0f32, 1.0, (b, kv * n_rep, t, d), &dev).unwrap();
        // k/v as narrow views of a longer buffer, as a KV cache with spare room would hand out.
        let kb = fedllm_testing::randn(213, 0f32, 1.0, (b, kv, s + 4, d), &dev).unwrap();
        let vb = fedllm_testing::randn(214, 0f32, 1.0, (b, kv, s + 4, d), &dev).unwrap();
        let (k, v) = (kb.narrow(2, 1, s).unwrap(), vb.narrow(2, 1, s).unwrap());
        let bias: Vec<f32> = (0..b * t * s)
            .map(|i| if (i * 7) % 5 == 0 { -1e30 } else { 0.1 })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, s), &dev).unwrap();
        for bias in [None, Some(&bias)] {
            let want = attention_composite(
                &q,
                &repeat_kv(&k, n_rep).unwrap().contiguous().unwrap(),
                &repeat_kv(&v, n_rep).unwrap().contiguous().unwrap(),
                0.3,
                bias,
            )
            .unwrap();
            let got = gqa_attention(&q, &k, &v, n_rep, 0.3, bias).unwrap();
            assert!(max_abs_diff(&got, &want).unwrap() < 1e-5);
            let (qb, kb, vb) = (
                q.to_dtype(DType::BF16).unwrap(),
                k.to_dtype(DType::BF16).unwrap(),
                v.to_dtype(DType::BF16).unwrap(),
            );
            let got = gqa_attention(&qb, &kb, &vb, n_rep, 0.3, bias).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let e = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want).unwrap();
            assert!(e < 5e-2, "bf16 {e}");
        }
        // Tracked inputs take the differentiable path.
        let qv = Var::from_tensor(&q).unwrap();
        let y = gqa_attention(qv.as_tensor(), &k, &v, n_rep, 0.3, None).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(qv.as_tensor()).is_some());
    }

    #[test]
    fn loss_matches_hand_computation() {
        let dev = Device::Cpu;
        let logits =
            Tensor::from_vec(vec![0f32, 1., 2., 3., 1., 0., 0., 0., 5.], (1, 3, 3), &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, 2, -100]], &dev).unwrap();
        let (loss, n) = causal_lm_loss(&logits, &labels).unwrap();
        assert_eq!(n, 1);
        let lse = (0f64.exp() + 1f64.exp() + 2f64.exp()).ln();
        let want = lse - 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }
}
