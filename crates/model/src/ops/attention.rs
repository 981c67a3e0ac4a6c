//! Attention: the one-op causal self-attention for training, grouped-query attention for
//! inference (K/V heads read in place), and scaled dot-product attention with its composite.

use candle_core::{DType, Result, Tensor};

use super::{fused_f32, rope, softmax_last};

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
        let op = crate::ops::fused::TrainAttention {
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
    gqa_attention_after(q, None, k, v, n_rep, scale, bias)
}

/// [`gqa_attention`] where every row first attends to `shared` keys/values [1, KV, P, D] (a
/// prefix all rows continue, stored once) and then to its own k/v [B, KV, S − P, D]; the
/// bias covers all S keys. The CPU inference kernel reads the shared rows in place; other
/// paths attend to the prefix copied per row, with the same numbers.
pub fn gqa_attention_after(
    q: &Tensor,
    shared: Option<&(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    n_rep: usize,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    crate::profile::span(crate::profile::Phase::Attention, || {
        let tracked = q.track_op() || k.track_op() || v.track_op();
        // Decoding steps (few new tokens), and prompts of a batch (after a shared prefix:
        // repeating K/V per query head and batched matmuls would copy all of it per row for
        // every chunk; measured 2x slower for 8 prompts after a 750-token prefix). One long
        // prompt is better served by GEMMs over causal blocks (`PromptAttention`) — except on
        // the VNNI decode path, which promises a row the same numbers alone and in any batch:
        // there every prompt takes this kernel, whose softmax then ignores where padding sits.
        // The Int8 path's softmax ignores padding too (8-bit rounding turns a last-bit
        // difference into a whole step now and then, enough to flip a greedy token), while one
        // long prompt still takes the causal GEMMs.
        use crate::ops::qmatvec::{selected, Path};
        let path = selected();
        let batch_exact = path.activation_bits() == Some(8);
        let few = path == Path::Vnni || q.dim(2)? <= 16 || q.dim(0)? > 1;
        if !tracked && q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::BF16) {
            let (b, h, t, d) = q.dims4()?;
            let shared_len = shared.map_or(Ok(0), |(sk, _)| sk.dim(2))?;
            let s = shared_len + k.dim(2)?;
            let (bias, scale, shared) = (host_bias(bias)?, scale as f32, shared.cloned());
            if few {
                let op = InferAttention {
                    shared,
                    shared_len,
                    batch_exact,
                    scale,
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
            // Measured on a 256-token prompt (2 AVX2 cores): 92 → 43 ms of attention against
            // the repeated-K/V matmuls below, which compute the masked half as well.
            let kv = k.dim(1)?;
            let shape = fedllm_kernels::attention::PromptShape { b, h, kv, t, s, d };
            let op = PromptAttention {
                scale,
                bias,
                shape,
                shared,
                shared_len,
            };
            // Computed as [B, T, H, D] (what the output projection reads): the [B, H, T, D]
            // view of it, which the caller's transpose back makes contiguous for free.
            return q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2);
        }
        // A cache may store keys/values narrower than the queries (f16 beside quantized
        // weights): widened for the matmul path.
        let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
        let (k, v) = match shared {
            None => (k.clone(), v.clone()),
            Some((sk, sv)) => {
                let rows = |x: &Tensor| -> Result<Tensor> {
                    let (_, h, p, d) = x.dims4()?;
                    x.to_dtype(q.dtype())?
                        .broadcast_as((k.dim(0)?, h, p, d))?
                        .contiguous()
                };
                (
                    Tensor::cat(&[&rows(sk)?, k], 2)?,
                    Tensor::cat(&[&rows(sv)?, v], 2)?,
                )
            }
        };
        let (k, v) = (&k, &v);
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        attention(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            scale,
            bias,
        )
    })
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
    /// Softmax sums that ignore where masked entries sit (`vexp::softmax_masked`); otherwise
    /// the plain vector sum (`vexp::exp_sub`), whose lanes follow positions.
    batch_exact: bool,
    scale: f32,
    bias: Option<std::sync::Arc<Vec<f32>>>,
    b: usize,
    h: usize,
    t: usize,
    s: usize,
    d: usize,
    n_rep: usize,
    /// Keys/values [1, KV, P, D] every row attends before its own (`KvCache::sharing`).
    shared: Option<(Tensor, Tensor)>,
    /// P (0 without `shared`); `s` counts them.
    shared_len: usize,
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
    F16(&'a [half::f16]),
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
            candle_core::CpuStorage::F16(v) => Data::F16(v),
            _ => candle_core::bail!("attention: unsupported dtype"),
        };
        Ok(Self {
            data,
            start: l.start_offset(),
            stride: [st[0], st[1], st[2], st[3]],
        })
    }

    /// Row (i0, i1, i2) of length `out.len()`: borrowed when stored as f32, else widened into
    /// `out`.
    fn row_ref<'b>(&'b self, i0: usize, i1: usize, i2: usize, out: &'b mut [f32]) -> &'b [f32] {
        let at = self.start + i0 * self.stride[0] + i1 * self.stride[1] + i2 * self.stride[2];
        match self.data {
            Data::F32(v) => &v[at..at + out.len()],
            Data::Bf16(_) | Data::F16(_) => {
                self.row(i0, i1, i2, out);
                out
            }
        }
    }

    /// `p[i·s + j] = (q_i · k_j)·scale + bias_j` for the queries `qs` against rows j < s of
    /// (i0, i1), on AVX-512 for f32 or f16 rows of whole 16-lane vectors: the same sums as
    /// `dot` (one accumulator, 16 lanes, then reduced), without a call per row. False when
    /// this path does not apply (the caller loops over `dot`).
    #[allow(unused_variables)]
    fn scores(
        &self,
        (i0, i1): (usize, usize),
        qs: &[Vec<f32>],
        scale: f32,
        bias: Option<&[f32]>,
        p: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if f16c() && qs[0].len().is_multiple_of(16) {
            let at = self.start + i0 * self.stride[0] + i1 * self.stride[1];
            let st = self.stride[2];
            // SAFETY: AVX-512F and F16C were detected; rows j < s of d values lie at
            // at + j·st inside the storage (the layout the op was given).
            match self.data {
                Data::F32(v) => unsafe {
                    scores_avx512::<false>(v[at..].as_ptr().cast(), st, qs, scale, bias, p)
                },
                Data::F16(v) => unsafe {
                    scores_avx512::<true>(v[at..].as_ptr().cast(), st, qs, scale, bias, p)
                },
                Data::Bf16(_) => return false,
            }
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2() && qs[0].len().is_multiple_of(16) {
            let at = self.start + i0 * self.stride[0] + i1 * self.stride[1];
            let st = self.stride[2];
            // SAFETY: AVX2, FMA and F16C were detected; rows as above.
            match self.data {
                Data::F32(v) => unsafe {
                    scores_avx2::<false>(v[at..].as_ptr().cast(), st, qs, scale, bias, p)
                },
                Data::F16(v) => unsafe {
                    scores_avx2::<true>(v[at..].as_ptr().cast(), st, qs, scale, bias, p)
                },
                Data::Bf16(_) => return false,
            }
            return true;
        }
        false
    }

    /// `o_i += p[i·s + j] · v_j` for the r = `o.len() / d` outputs over rows j < s of (i0, i1)
    /// in order, skipping zero weights, with the fused multiply-adds of the `axpy` loop, on
    /// AVX-512; false as `scores`.
    #[allow(unused_variables)]
    fn mix(&self, (i0, i1): (usize, usize), d: usize, p: &[f32], o: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if f16c() && d.is_multiple_of(16) {
            let at = self.start + i0 * self.stride[0] + i1 * self.stride[1];
            let st = self.stride[2];
            // SAFETY: as in `scores`.
            match self.data {
                Data::F32(v) => unsafe {
                    mix_avx512::<false>(v[at..].as_ptr().cast(), st, d, p, o)
                },
                Data::F16(v) => unsafe { mix_avx512::<true>(v[at..].as_ptr().cast(), st, d, p, o) },
                Data::Bf16(_) => return false,
            }
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2() && d.is_multiple_of(16) {
            let at = self.start + i0 * self.stride[0] + i1 * self.stride[1];
            let st = self.stride[2];
            // SAFETY: as in `scores`.
            match self.data {
                Data::F32(v) => unsafe { mix_avx2::<false>(v[at..].as_ptr().cast(), st, d, p, o) },
                Data::F16(v) => unsafe { mix_avx2::<true>(v[at..].as_ptr().cast(), st, d, p, o) },
                Data::Bf16(_) => return false,
            }
            return true;
        }
        false
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
            Data::F16(v) => widen_f16(&v[at..at + n], out),
        }
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *A.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *A.get_or_init(|| avx512() && is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Without AVX-512: the AVX2 twins (AVX2, FMA, F16C), which compute the AVX-512 kernels' bits.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !avx512() && fedllm_kernels::avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f16 → f32 (one instruction per 16 values where the CPU has AVX-512 and F16C).
fn widen_f16(src: &[half::f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if f16c() {
        // SAFETY: AVX-512F and F16C were detected; both slices have out.len() elements.
        return unsafe { widen_f16_avx512(src, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: F16C was detected; both slices have out.len() elements.
        return unsafe { widen_f16_avx2(src, out) };
    }
    out.iter_mut().zip(src).for_each(|(o, x)| *o = x.to_f32());
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn widen_f16_avx512(src: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_cvtph_ps(_mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
        i += 16;
    }
    while i < n {
        out[i] = src[i].to_f32();
        i += 1;
    }
}

/// a · b (equal lengths). The build targets baseline x86-64, so the plain loop would run in
/// 4-wide SSE: decode attention spends its time here and in `axpy`.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected; both slices have a.len() elements.
        return unsafe { dot_avx512(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected; both slices have a.len() elements.
        return unsafe { dot_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y += w · x.
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected; both slices have y.len() elements.
        return unsafe { axpy_avx512(w, x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA were detected; both slices have y.len() elements.
        return unsafe { axpy_avx2(w, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(o, v)| *o += w * v);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(acc);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512(w: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let wv = _mm512_set1_ps(w);
    let mut i = 0;
    while i + 16 <= n {
        let p = y.as_mut_ptr().add(i);
        _mm512_storeu_ps(
            p,
            _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(p)),
        );
        i += 16;
    }
    while i < n {
        y[i] += w * x[i];
        i += 1;
    }
}

/// 16 values of a cache row at `row + c·16`, f16 (`H`) or f32, as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn load16<const H: bool>(row: *const u8, c: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if H {
        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c * 32) as *const __m256i))
    } else {
        _mm512_loadu_ps((row as *const f32).add(c * 16))
    }
}

/// See `View::scores`: rows start at `base` and are `stride` elements apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn scores_avx512<const H: bool>(
    base: *const u8,
    stride: usize,
    qs: &[Vec<f32>],
    scale: f32,
    bias: Option<&[f32]>,
    p: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, s) = (qs[0].len(), p.len() / qs.len());
    let bytes = if H { 2 } else { 4 };
    for j in 0..s {
        let row = base.add(j * stride * bytes);
        let bj = bias.map_or(0.0, |b| b[j]);
        for (i, q) in qs.iter().enumerate() {
            let mut acc = _mm512_setzero_ps();
            for c in 0..d / 16 {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.as_ptr().add(c * 16)),
                    load16::<H>(row, c),
                    acc,
                );
            }
            p[i * s + j] = _mm512_reduce_add_ps(acc) * scale + bj;
        }
    }
}

/// See `View::mix`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn mix_avx512<const H: bool>(
    base: *const u8,
    stride: usize,
    d: usize,
    p: &[f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let r = o.len() / d;
    let s = p.len() / r;
    let bytes = if H { 2 } else { 4 };
    for j in 0..s {
        let row = base.add(j * stride * bytes);
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            let w = p[i * s + j];
            if w == 0.0 {
                continue;
            }
            let wv = _mm512_set1_ps(w);
            for c in 0..d / 16 {
                let y = oi.as_mut_ptr().add(c * 16);
                _mm512_storeu_ps(
                    y,
                    _mm512_fmadd_ps(wv, load16::<H>(row, c), _mm512_loadu_ps(y)),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16_avx2(src: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().add(i) as *const __m128i));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        i += 8;
    }
    while i < n {
        out[i] = src[i].to_f32();
        i += 1;
    }
}

/// [`dot_avx512`] on 8-lane halves (the same 16-value steps, reduction and scalar tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (h, c) in acc.iter_mut().enumerate() {
            let (x, y) = (a.as_ptr().add(i + 8 * h), b.as_ptr().add(i + 8 * h));
            *c = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y), *c);
        }
        i += 16;
    }
    let mut s = fedllm_kernels::avx2::reduce16(acc[0], acc[1]);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// [`axpy_avx512`] on 8-lane halves (fused over whole 16-value steps, the tail unfused).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(w: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let whole = n / 16 * 16;
    let wv = _mm256_set1_ps(w);
    for i in (0..whole).step_by(8) {
        let p = y.as_mut_ptr().add(i);
        _mm256_storeu_ps(
            p,
            _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
        );
    }
    for i in whole..n {
        y[i] += w * x[i];
    }
}

/// Values 8h..8h+8 of 16-value chunk `c` of a cache row, f16 (`H`) or f32, as f32.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8<const H: bool>(row: *const u8, c: usize, h: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    if H {
        _mm256_cvtph_ps(_mm_loadu_si128(row.add(c * 32 + h * 16) as *const __m128i))
    } else {
        _mm256_loadu_ps((row as *const f32).add(c * 16 + h * 8))
    }
}

/// [`scores_avx512`] on 8-lane halves. Each score keeps its own chain in the original's
/// order; tiles of two keys by up to three queries keep a dozen chains in flight and read
/// each key half once per tile rather than once per query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2<const H: bool>(
    base: *const u8,
    stride: usize,
    qs: &[Vec<f32>],
    scale: f32,
    bias: Option<&[f32]>,
    p: &mut [f32],
) {
    let s = p.len() / qs.len();
    let bytes = if H { 2 } else { 4 };
    let mut j = 0;
    while j < s {
        let keys = (s - j).min(2);
        let row = base.add(j * stride * bytes);
        let mut i = 0;
        while i < qs.len() {
            let q = &qs[i..(i + 3).min(qs.len())];
            let at = p.as_mut_ptr().add(i * s + j);
            let st = stride * bytes;
            match (q.len(), keys) {
                (3, 2) => score_tile::<H, 3, 2>(row, st, q, at, s),
                (2, 2) => score_tile::<H, 2, 2>(row, st, q, at, s),
                (1, 2) => score_tile::<H, 1, 2>(row, st, q, at, s),
                (3, _) => score_tile::<H, 3, 1>(row, st, q, at, s),
                (2, _) => score_tile::<H, 2, 1>(row, st, q, at, s),
                _ => score_tile::<H, 1, 1>(row, st, q, at, s),
            }
            i += q.len();
        }
        for jj in j..j + keys {
            let bj = bias.map_or(0.0, |b| b[jj]);
            for i in 0..qs.len() {
                p[i * s + jj] = p[i * s + jj] * scale + bj;
            }
        }
        j += keys;
    }
}

/// Raw dot products of Q queries with K key rows (`row`, `st` bytes apart) into
/// `at[i·s + j]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // indices name a register tile's cells
unsafe fn score_tile<const H: bool, const Q: usize, const K: usize>(
    row: *const u8,
    st: usize,
    qs: &[Vec<f32>],
    at: *mut f32,
    s: usize,
) {
    use std::arch::x86_64::*;
    let d = qs[0].len();
    let mut acc = [[[_mm256_setzero_ps(); 2]; K]; Q];
    for c in 0..d / 16 {
        for h in 0..2 {
            let kv: [__m256; K] = std::array::from_fn(|j| load8::<H>(row.add(j * st), c, h));
            for (i, q) in qs.iter().enumerate().take(Q) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c * 16 + h * 8));
                for j in 0..K {
                    acc[i][j][h] = _mm256_fmadd_ps(qv, kv[j], acc[i][j][h]);
                }
            }
        }
    }
    for (i, ai) in acc.iter().enumerate() {
        for (j, a) in ai.iter().enumerate() {
            *at.add(i * s + j) = fedllm_kernels::avx2::reduce16(a[0], a[1]);
        }
    }
}

/// [`mix_avx512`] on 8-lane halves. Each output lane takes its weighted rows in the
/// original's order; the outputs stay in registers, up to three queries by 32 lanes at a
/// time (twelve chains in flight: with 16 lanes, six chains waited out the FMA latency each
/// key), instead of a load and a store per row and query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mix_avx2<const H: bool>(
    base: *const u8,
    stride: usize,
    d: usize,
    p: &[f32],
    o: &mut [f32],
) {
    let r = o.len() / d;
    let s = p.len() / r;
    let st = stride * if H { 2 } else { 4 };
    let mut i = 0;
    while i < r {
        let q = (r - i).min(3);
        let mut c = 0;
        while c < d / 16 {
            let (pi, oi) = (p.as_ptr().add(i * s), o.as_mut_ptr().add(i * d + c * 16));
            let wide = c + 2 <= d / 16;
            match (q, wide) {
                (3, true) => mix_tile::<H, 3, 4>(base, st, c, s, pi, oi, d),
                (2, true) => mix_tile::<H, 2, 4>(base, st, c, s, pi, oi, d),
                (_, true) => mix_tile::<H, 1, 4>(base, st, c, s, pi, oi, d),
                (3, _) => mix_tile::<H, 3, 2>(base, st, c, s, pi, oi, d),
                (2, _) => mix_tile::<H, 2, 2>(base, st, c, s, pi, oi, d),
                _ => mix_tile::<H, 1, 2>(base, st, c, s, pi, oi, d),
            }
            c += if wide { 2 } else { 1 };
        }
        i += q;
    }
}

/// Lanes 16c..16c+8L of Q outputs (`o`, d apart) += Σ_j p[i·s + j] · v_j over the s rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mix_tile<const H: bool, const Q: usize, const L: usize>(
    base: *const u8,
    st: usize,
    c: usize,
    s: usize,
    p: *const f32,
    o: *mut f32,
    d: usize,
) {
    use std::arch::x86_64::*;
    let mut acc: [[__m256; L]; Q] =
        std::array::from_fn(|i| std::array::from_fn(|h| _mm256_loadu_ps(o.add(i * d + 8 * h))));
    for j in 0..s {
        let row = base.add(j * st);
        let w: [f32; Q] = std::array::from_fn(|i| *p.add(i * s + j));
        for h in 0..L {
            let v = load8::<H>(row, c + h / 2, h % 2);
            for (i, a) in acc.iter_mut().enumerate() {
                if w[i] != 0.0 {
                    a[h] = _mm256_fmadd_ps(_mm256_set1_ps(w[i]), v, a[h]);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for (h, ah) in a.iter().enumerate() {
            _mm256_storeu_ps(o.add(i * d + 8 * h), *ah);
        }
    }
}

impl InferAttention {
    /// `p[i·n + j] = (q_i · k_j)·scale + bias_j` over the n = `p.len() / qs.len()` keys of
    /// `k`'s (batch, kv head) rows.
    fn scores(
        &self,
        k: &View,
        at: (usize, usize),
        qs: &[Vec<f32>],
        bias: Option<&[f32]>,
        p: &mut [f32],
    ) {
        let n = p.len() / qs.len();
        if n == 0 || k.scores(at, qs, self.scale, bias, p) {
            return;
        }
        let mut kr = vec![0f32; qs[0].len()];
        for j in 0..n {
            let bj = bias.map_or(0.0, |b| b[j]);
            let krow = k.row_ref(at.0, at.1, j, &mut kr);
            for (i, qr) in qs.iter().enumerate() {
                p[i * n + j] = dot(qr, krow) * self.scale + bj;
            }
        }
    }
}

/// `o_i += Σ_j p[i·n + j] · v_j` over the n keys of `v`'s (batch, kv head) rows, in order,
/// zero weights skipped.
fn mix_rows(v: &View, at: (usize, usize), d: usize, p: &[f32], o: &mut [f32]) {
    let r = o.len() / d;
    let n = p.len() / r;
    if n == 0 || v.mix(at, d, p, o) {
        return;
    }
    let mut vr = vec![0f32; d];
    for j in 0..n {
        let vrow = v.row_ref(at.0, at.1, j, &mut vr);
        for (i, oi) in o.chunks_mut(d).enumerate() {
            let w = p[i * n + j];
            if w != 0.0 {
                axpy(w, vrow, oi);
            }
        }
    }
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
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        let (h, t, s, d) = (self.h, self.t, self.s, self.d);
        let mut out = vec![0f32; self.b * h * t * d];
        let r = self.n_rep;
        // One task per (batch, kv head, query position): its n_rep query heads share every K
        // and V row, which is then read once for all of them. Tasks go to the decode pool:
        // this runs once per layer per decoded token, too short for rayon's wake-ups.
        // A shared prefix's keys/values come first (one row for all), then the row's own.
        let guards = shared_guards(&self.shared);
        let shared = shared_views(&guards)?;
        let sp = self.shared_len;
        let group = |g: usize| -> Vec<f32> {
            let mut p = vec![0f32; r * s];
            let (bi, kv, ti) = (g / ((h / r) * t), (g / t) % (h / r), g % t);
            let qs: Vec<Vec<f32>> = (0..r)
                .map(|i| {
                    let mut qr = vec![0f32; d];
                    q.row(bi, kv * r + i, ti, &mut qr);
                    qr
                })
                .collect();
            let bias = self
                .bias
                .as_ref()
                .map(|b| &b[(bi * t + ti) * s..(bi * t + ti + 1) * s]);
            // (view, its batch row, first key, keys)
            let segs: Vec<(&View, usize, usize, usize)> = match &shared {
                Some((sk, _)) => vec![(sk, 0, 0, sp), (&k, bi, sp, s - sp)],
                None => vec![(&k, bi, 0, s)],
            };
            if let [(view, vb, _, _)] = segs[..] {
                self.scores(view, (vb, kv), &qs, bias, &mut p);
            } else {
                for &(view, vb, j0, n) in &segs {
                    let mut part = vec![0f32; r * n];
                    let b = bias.map(|b| &b[j0..j0 + n]);
                    self.scores(view, (vb, kv), &qs, b, &mut part);
                    for (pi, qi) in p.chunks_mut(s).zip(part.chunks(n.max(1))) {
                        pi[j0..j0 + n].copy_from_slice(qi);
                    }
                }
            }
            // With `batch_exact`, a row's probabilities do not depend on where its padding sits
            // (left of a short prompt in a batch, between a shared prefix and the prompt).
            for pi in p.chunks_mut(s) {
                let max = pi.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                if self.batch_exact {
                    fedllm_kernels::vexp::softmax_masked(pi, max);
                } else {
                    let inv = 1.0 / fedllm_kernels::vexp::exp_sub(pi, max, 1.0);
                    pi.iter_mut().for_each(|x| *x *= inv);
                }
            }
            let mut o = vec![0f32; r * d];
            let vs: Vec<(&View, usize, usize, usize)> = match &shared {
                Some((_, sv)) => vec![(sv, 0, 0, sp), (&v, bi, sp, s - sp)],
                None => vec![(&v, bi, 0, s)],
            };
            if let [(view, vb, _, _)] = vs[..] {
                mix_rows(view, (vb, kv), d, &p, &mut o);
            } else {
                // Each output continues its sums over the row's own values in key order.
                for &(view, vb, j0, n) in &vs {
                    let part: Vec<f32> = p
                        .chunks(s)
                        .flat_map(|pi| &pi[j0..j0 + n])
                        .copied()
                        .collect();
                    mix_rows(view, (vb, kv), d, &part, &mut o);
                }
            }
            o
        };
        let n = self.b * (h / r) * t;
        let slots: Vec<std::sync::OnceLock<Vec<f32>>> =
            (0..n).map(|_| std::sync::OnceLock::new()).collect();
        fedllm_kernels::pool::global().for_chunks(n, 1, &|gs| {
            for g in gs {
                let _ = slots[g].set(group(g));
            }
        });
        let groups: Vec<Vec<f32>> = slots
            .into_iter()
            .map(|o| o.into_inner().expect("every group ran"))
            .collect();
        for (g, o) in groups.iter().enumerate() {
            let (bi, kv, ti) = (g / ((h / r) * t), (g / t) % (h / r), g % t);
            for (i, oi) in o.chunks(d).enumerate() {
                let row = (bi * h + kv * r + i) * t + ti;
                out[row * d..(row + 1) * d].copy_from_slice(oi);
            }
        }
        Ok((like(s1, out), candle_core::Shape::from((self.b, h, t, d))))
    }
}

/// f32 results in the queries' storage type (bf16 or f32).
fn like(q: &candle_core::CpuStorage, out: Vec<f32>) -> candle_core::CpuStorage {
    match q {
        candle_core::CpuStorage::BF16(_) => {
            candle_core::CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect())
        }
        _ => candle_core::CpuStorage::F32(out),
    }
}

type Guards<'a> = (
    (candle_core::StorageRef<'a>, &'a candle_core::Layout),
    (candle_core::StorageRef<'a>, &'a candle_core::Layout),
);

/// Read access to a shared prefix's keys and values.
fn shared_guards(shared: &Option<(Tensor, Tensor)>) -> Option<Guards<'_>> {
    shared
        .as_ref()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
}

fn shared_views<'a>(guards: &'a Option<Guards<'_>>) -> Result<Option<(View<'a>, View<'a>)>> {
    Ok(match guards {
        Some(((ks, kl), (vs, vl))) => match (&**ks, &**vs) {
            (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) => {
                Some((View::new(kc, kl)?, View::new(vc, vl)?))
            }
            _ => candle_core::bail!("attention: a shared prefix off the CPU"),
        },
        None => None,
    })
}

/// One prompt's attention after its cache (inference, the CPU, a prompt too long for
/// `InferAttention`'s per-position tasks): queries, keys and values are gathered once per layer
/// into contiguous f32 (a shared prefix's keys first), then `fedllm_kernels::attention::prompt`
/// runs causal blocks of rows as GEMMs, reading grouped K/V heads in place.
struct PromptAttention {
    scale: f32,
    bias: Option<std::sync::Arc<Vec<f32>>>,
    shape: fedllm_kernels::attention::PromptShape,
    shared: Option<(Tensor, Tensor)>,
    shared_len: usize,
}

impl candle_core::CustomOp3 for PromptAttention {
    fn name(&self) -> &'static str {
        "prompt-attention"
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
        let sh = self.shape;
        let (b, h, kv, t, s, d) = (sh.b, sh.h, sh.kv, sh.t, sh.s, sh.d);
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        let guards = shared_guards(&self.shared);
        let shared = shared_views(&guards)?;
        let sp = self.shared_len;
        // Queries [B, H, T, D]: borrowed when stored so (RoPE's output), else gathered.
        let n = b * h * t * d;
        let qc;
        let qs = match (s1, l1.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(x), Some((a, z))) if z - a == n => &x[a..z],
            _ => {
                let mut g = vec![0f32; n];
                for (r, row) in g.chunks_exact_mut(d).enumerate() {
                    q.row(r / (h * t), r / t % h, r % t, row);
                }
                qc = g;
                &qc
            }
        };
        // Keys and values [B, KV, S, D]: the shared prefix's rows, then the row's own.
        let gather = |own: &View, pre: Option<&View>| {
            // SAFETY: every row is gathered into below.
            let mut x = unsafe { fedllm_kernels::uninit(b * kv * s * d) };
            for (r, row) in x.chunks_exact_mut(d).enumerate() {
                let (bi, g, j) = (r / (kv * s), r / s % kv, r % s);
                match pre {
                    Some(p) if j < sp => p.row(0, g, j, row),
                    _ => own.row(bi, g, j - sp, row),
                }
            }
            x
        };
        let kc = gather(&k, shared.as_ref().map(|x| &x.0));
        let vc = gather(&v, shared.as_ref().map(|x| &x.1));
        // SAFETY: `prompt` writes every output row (each block's product overwrites it).
        let mut out = unsafe { fedllm_kernels::uninit(n) };
        fedllm_kernels::attention::prompt(
            sh,
            (qs, &kc, &vc),
            self.bias.as_ref().map(|x| x.as_slice()),
            self.scale,
            &mut out,
        );
        Ok((like(s1, out), candle_core::Shape::from((b, t, h, d))))
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
            // The vector exp (1e-6 relative, as decoding's softmax): libm's scalar exp was half
            // of a 256-token prompt's attention time.
            let inv = 1.0 / fedllm_kernels::vexp::exp_sub(r, max, 1.0);
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
    use super::super::rope_composite;
    use super::*;
    use candle_core::{Device, Var};
    use fedllm_testing::max_abs_diff;

    /// Decode attention's AVX2 twins give the AVX-512 kernels' bits: dot and axpy on lengths
    /// off the 16-lane grid, scores and mix over f32 and f16 cache rows (zero weights too).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_twins_give_the_avx512_bits() {
        if !fedllm_kernels::avx2::twins_comparable("decode attention") || !f16c() {
            return;
        }
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104729) % 1999) as f32 / 999.0 - 1.0)
                .collect()
        };
        // SAFETY: AVX-512F, AVX2, FMA and F16C were detected; every row read lies in `rows`.
        unsafe {
            for n in [5, 16, 37, 64, 100] {
                let (a, b) = (vals(n, 1), vals(n, 2));
                assert_eq!(dot_avx512(&a, &b).to_bits(), dot_avx2(&a, &b).to_bits());
                let (mut y1, mut y2) = (b.clone(), b.clone());
                axpy_avx512(0.37, &a, &mut y1);
                axpy_avx2(0.37, &a, &mut y2);
                assert_eq!(y1, y2, "axpy n={n}");
            }
            let (d, s, stride) = (64, 9, 80);
            let rows = vals(s * stride, 3);
            let half: Vec<half::f16> = rows.iter().map(|&v| half::f16::from_f32(v)).collect();
            let qs: Vec<Vec<f32>> = (0..3).map(|i| vals(d, 4 + i)).collect();
            let bias = vals(s, 7);
            let mut p = vals(3 * s, 8);
            p[4] = 0.0;
            for h in [false, true] {
                let base: *const u8 = if h {
                    half.as_ptr().cast()
                } else {
                    rows.as_ptr().cast()
                };
                let (mut s1, mut s2) = (vec![0f32; 3 * s], vec![0f32; 3 * s]);
                let (mut o1, mut o2) = (vals(3 * d, 9), vals(3 * d, 9));
                if h {
                    scores_avx512::<true>(base, stride, &qs, 0.125, Some(&bias), &mut s1);
                    scores_avx2::<true>(base, stride, &qs, 0.125, Some(&bias), &mut s2);
                    mix_avx512::<true>(base, stride, d, &p, &mut o1);
                    mix_avx2::<true>(base, stride, d, &p, &mut o2);
                } else {
                    scores_avx512::<false>(base, stride, &qs, 0.125, Some(&bias), &mut s1);
                    scores_avx2::<false>(base, stride, &qs, 0.125, Some(&bias), &mut s2);
                    mix_avx512::<false>(base, stride, d, &p, &mut o1);
                    mix_avx2::<false>(base, stride, d, &p, &mut o2);
                }
                assert_eq!(s1, s2, "scores f16={h}");
                assert_eq!(o1, o2, "mix f16={h}");
            }
        }
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

    /// The row loops over a whole cache block (`View::scores`, `View::mix`) give the bits of
    /// the per-row `dot` and `axpy` calls they replace, from f32 and from f16 storage, with
    /// zero weights skipped (evaluation's scores rest on decoding exactly as before).
    #[test]
    fn cache_block_loops_equal_the_row_calls() {
        // Odd key counts, 1–5 query heads per K/V head, head sizes of 4 and 5 16-lane chunks:
        // every tile shape of the AVX2 kernels and their remainders.
        for (s, d, r) in [(37, 64, 3), (8, 80, 4), (5, 64, 1), (9, 16, 5), (2, 64, 2)] {
            block_loops_equal_row_calls(s, d, r);
        }
    }

    fn block_loops_equal_row_calls(s: usize, d: usize, r: usize) {
        let vals: Vec<f32> = (0..s * d)
            .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
            .collect();
        let halves: Vec<half::f16> = vals.iter().map(|&v| half::f16::from_f32(v)).collect();
        let qs: Vec<Vec<f32>> = (0..r)
            .map(|i| {
                (0..d)
                    .map(|c| ((i * 31 + c * 17) % 29) as f32 / 14.0 - 1.0)
                    .collect()
            })
            .collect();
        let bias: Vec<f32> = (0..s)
            .map(|j| if j % 5 == 0 { -1e30 } else { 0.1 * j as f32 })
            .collect();
        let layout = candle_core::Layout::contiguous((1, 1, s, d));
        for st in [
            candle_core::CpuStorage::F32(vals.clone()),
            candle_core::CpuStorage::F16(halves),
        ] {
            let view = View::new(&st, &layout).unwrap();
            let mut fast = vec![0f32; r * s];
            if !view.scores((0, 0), &qs, 0.125, Some(&bias), &mut fast) {
                eprintln!("note: no AVX-512 here, the block loops are not exercised");
                return;
            }
            let mut row = vec![0f32; d];
            let mut slow = vec![0f32; r * s];
            for j in 0..s {
                let k = view.row_ref(0, 0, j, &mut row).to_vec();
                for (i, q) in qs.iter().enumerate() {
                    slow[i * s + j] = dot(q, &k) * 0.125 + bias[j];
                }
            }
            assert_eq!(fast, slow);
            let p: Vec<f32> = (0..r * s)
                .map(|i| if i % 4 == 0 { 0.0 } else { i as f32 / 97.0 })
                .collect();
            let (mut fo, mut so) = (vec![0f32; r * d], vec![0f32; r * d]);
            assert!(view.mix((0, 0), d, &p, &mut fo));
            for j in 0..s {
                let v = view.row_ref(0, 0, j, &mut row).to_vec();
                for (i, oi) in so.chunks_mut(d).enumerate() {
                    if p[i * s + j] != 0.0 {
                        axpy(p[i * s + j], &v, oi);
                    }
                }
            }
            assert_eq!(fo, so);
        }
    }

    /// An f16 cache (quantized models) is read as the f32 values its entries round to: the
    /// result equals the composite on those widened values up to summation order (f32, a few
    /// dozen terms: 1e-5 as for the f32 kernel above). Head sizes past one 16-lane vector, and
    /// shared (n_rep 3) and single (n_rep 1) query heads per K/V head.
    #[test]
    fn inference_attention_reads_an_f16_cache() {
        let dev = Device::Cpu;
        for (n_rep, seed) in [(3, 220), (1, 230)] {
            let (b, kv, t, s, d) = (2, 2, 2, 11, 40);
            let q = fedllm_testing::randn(seed, 0f32, 1.0, (b, kv * n_rep, t, d), &dev).unwrap();
            let half = |seed| {
                fedllm_testing::randn(seed, 0f32, 1.0, (b, kv, s, d), &dev)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap()
            };
            let (k, v) = (half(seed + 1), half(seed + 2));
            let wide = |x: &Tensor| {
                let x = x.to_dtype(DType::F32).unwrap();
                repeat_kv(&x, n_rep).unwrap().contiguous().unwrap()
            };
            let want = attention_composite(&q, &wide(&k), &wide(&v), 0.3, None).unwrap();
            let got = gqa_attention(&q, &k, &v, n_rep, 0.3, None).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            let e = max_abs_diff(&got, &want).unwrap();
            assert!(e < 1e-5, "n_rep {n_rep}: {e}");
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

    /// One prompt longer than the per-position kernel takes (20 new positions, batch 1) after a
    /// shared prefix (5 positions) and 3 positions of its own cache, from an f16 cache handed
    /// out as narrow views: the result equals the composite over the widened keys (prefix first),
    /// repeated per query head, under a causal bias, up to f32 summation order (a few dozen
    /// terms: 1e-5, as above). A block whose keys were cut ignoring the cached positions, or a
    /// prefix placed after the row's own keys, shows as an error of order 0.1. (On the VNNI
    /// decode path every prompt takes `InferAttention`, which this then checks instead.)
    #[test]
    fn a_long_prompt_after_a_shared_prefix_matches_composite() {
        let dev = Device::Cpu;
        let (kv, n_rep, t, p, own, d) = (2, 3, 20, 5, 3, 32);
        let s = p + own + t;
        let q = fedllm_testing::randn(240, 0f32, 1.0, (1, kv * n_rep, t, d), &dev).unwrap();
        let cache = |seed, len| {
            fedllm_testing::randn(seed, 0f32, 1.0, (1, kv, len + 2, d), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
                .narrow(2, 1, len)
                .unwrap()
        };
        let shared = (cache(241, p), cache(242, p));
        let (k, v) = (cache(243, own + t), cache(244, own + t));
        let bias: Vec<f32> = (0..t * s)
            .map(|x| if x % s > p + own + x / s { -1e30 } else { 0.0 })
            .collect();
        let bias = Tensor::from_vec(bias, (1, 1, t, s), &dev).unwrap();
        let wide = |a: &Tensor, b: &Tensor| {
            let x = Tensor::cat(&[a, b], 2)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            repeat_kv(&x, n_rep).unwrap().contiguous().unwrap()
        };
        let want = attention_composite(
            &q,
            &wide(&shared.0, &k),
            &wide(&shared.1, &v),
            0.3,
            Some(&bias),
        )
        .unwrap();
        let got = gqa_attention_after(&q, Some(&shared), &k, &v, n_rep, 0.3, Some(&bias)).unwrap();
        let e = max_abs_diff(&got, &want).unwrap();
        assert!(e < 1e-5, "{e}");
    }
}
