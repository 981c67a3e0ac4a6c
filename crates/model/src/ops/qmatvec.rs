//! Decode-time products with GGUF-quantized weights: y[m, n] = x[m, k] · W[n, k]ᵀ for a few
//! activation rows, reading the Q4_1 / Q8_0 blocks directly (no dequantized copy). The
//! paths ([`Path`]): with AVX-512 VNNI the activations are rounded to 8 bits per 32-value
//! block (as llama.cpp's Q8 activations) and each block is an integer dot product
//! (`vpdpbusd`); with AVX-512F alone the activations stay f32; without AVX-512 they are
//! rounded to 16 bits per block and each block is an exact integer dot (`vpmaddwd`), or, on
//! request, AVX2 twins of the f32 kernels give the AVX-512 bits ([`fedllm_kernels::avx2`]); a
//! portable loop otherwise. All run on the decode pool. The Int16 and Int8 paths' prompt rows
//! take the kernels' integer GEMMs instead ([`prompt_matmul`]).

use std::cell::Cell;
use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::f16;

/// Block geometry of the supported types: (elements, bytes).
fn block(t: GgmlDType) -> Option<(usize, usize)> {
    match t {
        GgmlDType::Q4_1 => Some((32, 20)),
        GgmlDType::Q8_0 => Some((32, 34)),
        _ => None,
    }
}

pub fn supported(t: GgmlDType) -> bool {
    block(t).is_some()
}

/// The block kernels' code paths, slowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// Scalar loops, f32 activations: any CPU.
    Portable,
    /// The AVX-512 f32 kernels on 8-lane halves (AVX2, FMA, F16C): the same bits.
    Avx2,
    /// Activations rounded to int16 per 32-value block (d = max|x|/32767), exact integer
    /// block dots (AVX2 `vpmaddwd`; prompts on AVX-512 VNNI `vpdpwssd`, the same bits), f32
    /// scales and sums: the default wherever AVX2 runs.
    Int16,
    /// AVX-512F FMA on f32 activations.
    Avx512,
    /// Activations rounded to int8 per 32-value block, integer block dots with AVX-512 VNNI
    /// (256-bit `vpdpbusd`), f32 scales and sums; Q4_1's offsets multiply the rounded values'
    /// sum d·Σq (llama.cpp's Q8_1 `s`: the rounded row times the dequantized weights, half
    /// the logit error of the exact Σx on SmolLM2). Without VNNI, the same exact integer dots
    /// from AVX2 (`vpmaddubsw`, `vpmaddwd`), so the same bits. Every row count takes these
    /// kernels: a row's numbers never depend on its batch, prompt rows included.
    Vnni,
    /// [`Path::Vnni`]'s 8-bit activations and decode kernels, with prompt rows on the int8
    /// GEMM (`gemm_i8`, 512-bit `vpdpbusd`: twice the int16 GEMM's products per instruction),
    /// as the Int16 path takes its own. AVX-512 VNNI only.
    Int8,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Int16 => "int16",
            Path::Avx512 => "avx512",
            Path::Vnni => "vnni",
            Path::Int8 => "int8",
        }
    }

    /// Every path, slowest first.
    pub const ALL: [Path; 6] = [
        Path::Portable,
        Path::Avx2,
        Path::Int16,
        Path::Avx512,
        Path::Vnni,
        Path::Int8,
    ];

    /// The bits activations are rounded to per 32-value block (None: they stay f32).
    pub fn activation_bits(self) -> Option<u32> {
        match self {
            Path::Int16 => Some(16),
            Path::Vnni | Path::Int8 => Some(8),
            Path::Portable | Path::Avx2 | Path::Avx512 => None,
        }
    }

    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL
            .into_iter()
            .find(|p| p.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU runs the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let f = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c");
            match self {
                Path::Portable => true,
                Path::Avx2 | Path::Int16 => fedllm_kernels::avx2::available(),
                Path::Avx512 => f,
                Path::Vnni => vnni_hw() || fedllm_kernels::avx2::available(),
                Path::Int8 => vnni_hw() && fedllm_kernels::gemm_i8::supported(GgmlDType::Q4_1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Portable
        }
    }
}

/// Whether the CPU has AVX-512 VNNI (with BW, VL, F16C) for [`Path::Vnni`]'s own kernels.
fn vnni_hw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Every path this CPU runs (what the tests iterate over).
pub fn available() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.supported()).collect()
}

/// `FEDLLM_DECODE`, parsed; Err names the bad value or a path this CPU lacks.
pub fn env_path() -> Result<Option<Path>, String> {
    match std::env::var("FEDLLM_DECODE") {
        Ok(v) if !v.trim().is_empty() => match Path::parse(&v) {
            Some(p) if p.supported() => Ok(Some(p)),
            Some(p) => Err(format!(
                "FEDLLM_DECODE={v:?}: this CPU cannot run {}",
                p.name()
            )),
            None => Err(format!(
                "FEDLLM_DECODE={v:?} is not one of int8, vnni, avx512, int16, avx2, portable"
            )),
        },
        _ => Ok(None),
    }
}

thread_local! {
    static FORCED: Cell<Option<Path>> = const { Cell::new(None) };
}

/// Runs `f` with this thread's products on `path` (the tests run every path in one process;
/// the path is chosen on the calling thread, so parallel tests do not interfere).
pub fn with_path<R>(path: Path, f: impl FnOnce() -> R) -> R {
    assert!(path.supported(), "{path:?} is not supported on this CPU");
    with_forced(Some(path), f)
}

/// Runs `f` with this thread's forced path set to `forced`, then restores the one before.
fn with_forced<R>(forced: Option<Path>, f: impl FnOnce() -> R) -> R {
    let before = FORCED.with(|c| c.replace(forced));
    struct Restore(Option<Path>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Runs `f` on a worker of rayon's pool, this thread's forced path carried along. A forward
/// called from outside the pool hands each of its few hundred parallel loops to the workers
/// and sleeps until they finish (a futex sleep and wake per loop); on a worker the loops
/// split with the other worker directly: 256-token int8 prefills 1,682 → 1,825 tok/s (means
/// of 6 alternating runs, 2-core Zen 4), int16 1,240 → 1,309 (5 runs). The path is set on
/// the worker even when none was forced here: a worker waiting inside another forward's loop
/// may run this one, and must not inherit that forward's path.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let forced = FORCED.with(|c| c.get());
    rayon::scope(|_| with_forced(forced, f))
}

/// The path products on this thread take: the forced one, else `FEDLLM_DECODE` (checked up
/// front by the binary), else int16 activations wherever AVX2 runs: a Q4_1 block at one row
/// took 1.06 ns there against the f32 twin's 1.57 (`fedllm bench blocks`, 2-core Zen 3); on a
/// 2-core AVX-512 EPYC its prompt GEMM (`vpdpwssd`) prefilled 256 tokens at 1,088–1,091 tok/s
/// against 640–709 for the AVX-512 f32 path, decoding at par; and its numbers are the same on
/// both machines. 16-bit rounding moves a product by at most d/2 per value, 1/258 of the 8-bit
/// error. VNNI is never the default: its 8-bit activations move SmolLM2's logits by ~1% (0.3 of 35), which flips
/// transformers' greedy choice where two tokens are that close (one of the 20 golden tokens,
/// past the answer). Int8 (VNNI's decode numerics, prompts on the int8 GEMM) is opt-in for the
/// same reason. Over 7,281 positions of GSM8K text (`fedllm bench logits`) the 8-bit paths move
/// the top choice at 2.6–2.8% of them, Int16 at 0.01–0.03% (transformers bf16 against its
/// fp32: 2.5%).
pub fn selected() -> Path {
    if let Some(p) = FORCED.with(|c| c.get()) {
        return p;
    }
    static S: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *S.get_or_init(|| match env_path() {
        Ok(Some(p)) => p,
        _ if Path::Int16.supported() => Path::Int16,
        _ if Path::Avx512.supported() => Path::Avx512,
        _ => Path::Portable,
    })
}

fn dot_scalar(t: GgmlDType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    match t {
        GgmlDType::Q4_1 => {
            for (b, blk) in row.chunks_exact(20).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let xs = &x[b * 32..b * 32 + 32];
                let mut s = 0f32;
                let mut xsum = 0f32;
                for j in 0..16 {
                    let q = blk[4 + j];
                    s += (q & 0x0F) as f32 * xs[j] + (q >> 4) as f32 * xs[j + 16];
                    xsum += xs[j] + xs[j + 16];
                }
                acc += d * s + m * xsum;
            }
        }
        GgmlDType::Q8_0 => {
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let xs = &x[b * 32..b * 32 + 32];
                let s: f32 = (0..32).map(|j| blk[2 + j] as i8 as f32 * xs[j]).sum();
                acc += d * s;
            }
        }
        _ => unreachable!("unsupported type"),
    }
    acc
}

/// Most activation rows one pass over a weight row serves (one accumulator register each).
const ROWS: usize = 8;

/// Σx over each 32-value block of each row of x [m, k]: Q4_1's offset term m·Σx per block.
fn block_sums(x: &[f32]) -> Vec<f32> {
    let mut sums = vec![0f32; x.len() / 32];
    fedllm_kernels::rounding::block_sums(x, &mut sums);
    sums
}

/// An f16's bits to f32 with the F16C instruction (the `half` crate's portable path is the
/// slowest part of a block otherwise).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn h2f(bits: u16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Up to `ROWS` rows of x against one weight row: each block is decoded once for all of
/// them. `out[j]` = x_j · w.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn dots_avx512<const M: usize>(
    t: GgmlDType,
    row: &[u8],
    x: &[f32],
    xsum: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let m = out.len().min(M);
    let nb = k / 32;
    let (x, xsum) = (x.as_ptr(), xsum.as_ptr());
    // Two vector accumulators per row, even blocks into one and odd into the other: at batch
    // 1 a single one makes every block wait on the previous block's FMA latency. Every batch
    // size sums a row the same way, so a row comes out bit for bit the same whatever the batch
    // (continuous batching relies on it). Blocks go in pairs so that each accumulator is named
    // statically: M bounds the rows, and the accumulators stay in registers (indexed by a
    // runtime value they spill to the stack, a load and a store per FMA).
    let mut acc = [[_mm512_setzero_ps(); M]; 2];
    let mut off = [[0f32; M]; 2];
    let [acc0, acc1] = &mut acc;
    let [off0, off1] = &mut off;
    match t {
        GgmlDType::Q4_1 => {
            for b in (0..nb).step_by(2) {
                q4_1_f32::<M>(row, x, xsum, k, b, m, acc0, off0);
                if b + 1 < nb {
                    q4_1_f32::<M>(row, x, xsum, k, b + 1, m, acc1, off1);
                }
            }
        }
        GgmlDType::Q8_0 => {
            for b in (0..nb).step_by(2) {
                q8_0_f32::<M>(row, x, k, b, m, acc0);
                if b + 1 < nb {
                    q8_0_f32::<M>(row, x, k, b + 1, m, acc1);
                }
            }
        }
        _ => unreachable!("unsupported type"),
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j])) + (off[0][j] + off[1][j]);
    }
}

/// Block `b` of a Q4_1 row against `m` f32 rows of x (row stride k), into `acc` and `off`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_1_f32<const M: usize>(
    row: &[u8],
    x: *const f32,
    xsum: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [std::arch::x86_64::__m512; M],
    off: &mut [f32; M],
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let blk = row.as_ptr().add(b * 20);
    // d and m converted together (one F16C conversion), the 16 bytes widened once (one
    // shuffle) and split into low and high nibbles in 32-bit lanes.
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
    let dv = _mm512_broadcastss_ps(dm);
    let mn = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
    let mask = _mm512_set1_epi32(0x0F);
    let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), dv);
    let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), dv);
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let xp = x.add(j * k + b * 32);
        let a = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), acc[j]);
        acc[j] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), a);
        off[j] += mn * *xsum.add(j * nb + b);
    }
}

/// Block `b` of a Q8_0 row against `m` f32 rows of x, into `acc`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn q8_0_f32<const M: usize>(
    row: &[u8],
    x: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [std::arch::x86_64::__m512; M],
) {
    use std::arch::x86_64::*;
    let blk = row.as_ptr().add(b * 34);
    let dv = _mm512_set1_ps(h2f(u16::from_le_bytes([*blk, *blk.add(1)])));
    let wide = |at: usize| {
        let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(at) as *const __m128i));
        _mm512_mul_ps(_mm512_cvtepi32_ps(q), dv)
    };
    let (f0, f1) = (wide(2), wide(18));
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let xp = x.add(j * k + b * 32);
        let a = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xp), acc[j]);
        acc[j] = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xp.add(16)), a);
    }
}

/// Up to `ROWS` rows of x against one dense f32 weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dense_dots_avx512(row: &[f32], x: &[f32], k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let m = out.len();
    let mut acc = [_mm512_setzero_ps(); ROWS];
    let mut i = 0;
    while i + 16 <= k {
        let w = _mm512_loadu_ps(row.as_ptr().add(i));
        for (j, aj) in acc.iter_mut().enumerate().take(m) {
            *aj = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.as_ptr().add(j * k + i)), *aj);
        }
        i += 16;
    }
    for (j, (o, a)) in out.iter_mut().zip(acc).enumerate() {
        let tail: f32 = (i..k).map(|c| row[c] * x[j * k + c]).sum();
        *o = _mm512_reduce_add_ps(a) + tail;
    }
}

/// [`dense_dots_avx512`] on 8-lane halves for the weight rows `w` (whole rows of k) against
/// all m rows of x, into `out[r·m + j]`. Each product keeps its own 16-lane chain in the
/// original's order; the tiles (four weight rows, x rows by three) only interleave chains so
/// that a dozen FMAs are in flight — one chain at a time waits out the FMA latency (5x slower
/// at eight rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dense_rows_avx2(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32], ahead: usize) {
    let n = w.len() / k;
    let (wp, xp, op) = (w.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    let mut r = 0;
    while r < n {
        let rows = (n - r).min(4);
        let mut j = 0;
        while j < m {
            let c = (m - j).min(3);
            // The first pass over rows streamed from memory also asks for the rows `ahead` on
            // (the hardware prefetcher alone left batch-8 steps at ~9 GB/s; with four, matvec
            // per step 54–74 → 41–57 ms on 2 AVX2 cores). Later passes find them cached.
            let pf = if j == 0 { ahead } else { 0 };
            for r2 in (r..r + rows).step_by(2) {
                let (w, x, o) = (wp.add(r2 * k), xp.add(j * k), op.add(r2 * m + j));
                match (c, (r + rows - r2).min(2)) {
                    (3, 2) => dense_tile_avx2::<2, 3>(w, x, k, o, m, pf),
                    (3, _) => dense_tile_avx2::<1, 3>(w, x, k, o, m, pf),
                    (2, 2) => dense_tile_avx2::<2, 2>(w, x, k, o, m, pf),
                    (2, _) => dense_tile_avx2::<1, 2>(w, x, k, o, m, pf),
                    (_, 2) => dense_tile_avx2::<2, 1>(w, x, k, o, m, pf),
                    _ => dense_tile_avx2::<1, 1>(w, x, k, o, m, pf),
                }
            }
            j += c;
        }
        r += rows;
    }
}

/// R weight rows (from `w`, stride k) against C rows of x (stride k) into `o[r·m + c]`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // indices name a register tile's cells
unsafe fn dense_tile_avx2<const R: usize, const C: usize>(
    w: *const f32,
    x: *const f32,
    k: usize,
    o: *mut f32,
    m: usize,
    ahead: usize,
) {
    // `ahead` > 0: prefetch the rows that many rows further on, one line per row per step.
    use fedllm_kernels::avx2::reduce16;
    use std::arch::x86_64::*;
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let mut i = 0;
    while i + 16 <= k {
        if ahead > 0 {
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(r * k + i + ahead * k) as *const i8);
            }
        }
        for h in 0..2 {
            let wv: [__m256; R] =
                std::array::from_fn(|r| _mm256_loadu_ps(w.add(r * k + i + 8 * h)));
            for c in 0..C {
                let xv = _mm256_loadu_ps(x.add(c * k + i + 8 * h));
                for r in 0..R {
                    acc[r][c][h] = _mm256_fmadd_ps(wv[r], xv, acc[r][c][h]);
                }
            }
        }
        i += 16;
    }
    for (r, ar) in acc.iter().enumerate() {
        for (c, a) in ar.iter().enumerate() {
            let tail: f32 = (i..k).map(|t| *w.add(r * k + t) * *x.add(c * k + t)).sum();
            *o.add(r * m + c) = reduce16(a[0], a[1]) + tail;
        }
    }
}

/// y [m, n] = x [m, k] · W [n, k]ᵀ for a few rows of x and a dense f32 W: one streaming pass
/// over W (a GEMM would repack all of W for a handful of rows).
pub fn dense_matmul(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(w.len() == n * k && x.len() == m * k);
    let path = dense_path();
    rows_in_parallel(n, m, &|rs, o| {
        dense_rows(path, &w[rs.start * k..rs.end * k], x, k, m, o, 4)
    })
}

/// y [m, n] = x [m, k] · W [n, k]ᵀ for GGUF blocks `w` of type `t` computed as their
/// dequantized f32 values: each task widens four weight rows at a time into a scratch that
/// stays in L1 (candle's values, [`fedllm_kernels::gemm::dequant`]) and runs
/// [`dense_matmul`]'s kernel on them. Every output is `dense_matmul`'s on the dequantized
/// matrix bit for bit, reading the 0.6–1.1 bytes a value the blocks take instead of 4.
pub fn packed_matmul(t: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let (bs, ts) = (t.block_size(), t.type_size());
    assert!(k.is_multiple_of(bs) && w.len() == n * k / bs * ts && x.len() == m * k);
    let row_bytes = k / bs * ts;
    let path = dense_path();
    rows_in_parallel(n, m, &|rs, o| {
        let mut wide = vec![0f32; PACKED_ROWS * k];
        for r0 in rs.clone().step_by(PACKED_ROWS) {
            let rows = (rs.end - r0).min(PACKED_ROWS);
            let wide = &mut wide[..rows * k];
            fedllm_kernels::gemm::dequant(t, &w[r0 * row_bytes..(r0 + rows) * row_bytes], wide);
            let at = (r0 - rs.start) * m;
            dense_rows(path, wide, x, k, m, &mut o[at..at + rows * m], 0);
        }
    })
}

/// Weight rows [`packed_matmul`] widens at a time: 4 × 1536 values fill 24 of L1's 32 KiB.
const PACKED_ROWS: usize = 4;

/// The path dense rows take: they have no int8 form, so the VNNI path takes the f32 kernels
/// (the AVX2 twin where the CPU lacks AVX-512, its VNNI path being the AVX2 twin too).
fn dense_path() -> Path {
    match selected() {
        Path::Vnni | Path::Int16 if !Path::Avx512.supported() => Path::Avx2,
        Path::Int16 => Path::Avx512,
        p => p,
    }
}

/// `w`'s whole rows (stride k) against all m rows of x into `o[i·m + j]`; `ahead` > 0 has
/// the AVX2 kernel prefetch rows that far on (rows streamed from memory, not a scratch).
fn dense_rows(path: Path, w: &[f32], x: &[f32], k: usize, m: usize, o: &mut [f32], ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx2 {
        // SAFETY: AVX2 and FMA were detected; the slices are whole k-strided rows.
        return unsafe { dense_rows_avx2(w, x, k, m, o, ahead) };
    }
    for (i, row) in w.chunks_exact(k).enumerate() {
        for (g, og) in o[i * m..(i + 1) * m].chunks_mut(ROWS).enumerate() {
            let xs = &x[g * ROWS * k..(g * ROWS + og.len()) * k];
            if path >= Path::Avx512 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was detected at run time; slices are k-strided rows.
                unsafe {
                    dense_dots_avx512(row, xs, k, og)
                }
            } else {
                for (j, oj) in og.iter_mut().enumerate() {
                    *oj = row
                        .iter()
                        .zip(&xs[j * k..(j + 1) * k])
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
        }
    }
}

/// The output pointer the pool's threads write disjoint rows through.
struct Out(*mut f32);
// SAFETY: each weight row's outputs are written by exactly one chunk.
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `[at, at + len)` must lie in the buffer and be written by this caller alone.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// y [m, n] where `rows(rs, out)` fills `out[i·m + j]` = x_j · W_(rs.start + i): weight rows
/// in chunks across the decode pool, then transposed.
fn rows_in_parallel(
    n: usize,
    m: usize,
    rows: &(dyn Fn(Range<usize>, &mut [f32]) + Sync),
) -> Vec<f32> {
    let pool = fedllm_kernels::pool::global();
    let chunk = n.div_ceil(4 * pool.threads()).max(16);
    let mut yt = vec![0f32; n * m]; // [n, m]: each weight row is read once for all m rows
    let out = Out(yt.as_mut_ptr());
    pool.for_chunks(n, chunk, &|rs| {
        // SAFETY: the chunk's rows' outputs lie inside yt and belong to this chunk alone.
        let o = unsafe { out.slice(rs.start * m, rs.len() * m) };
        rows(rs, o);
    });
    transpose(yt, n, m)
}

fn transpose(yt: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for r in 0..n {
        for j in 0..m {
            y[j * n + r] = yt[r * m + j];
        }
    }
    y
}

/// y [m, n] for x [m, k] (row-major f32) and raw blocks of W [n, k]. The weight rows go to
/// the decode pool in chunks, and each weight row is read once for every group of `ROWS` x
/// rows.
pub fn matmul(t: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let (be, bb) = block(t).expect("supported type");
    assert!(k.is_multiple_of(be) && w.len() == n * k / be * bb && x.len() == m * k);
    let row_bytes = k / be * bb;
    let path = selected();
    // Σx per block: the f32 and int16 paths' Q4_1 offsets (the 8-bit paths take d·Σq).
    let xsum = match path {
        Path::Vnni | Path::Int8 => Vec::new(),
        _ => block_sums(x),
    };
    let acts = match path {
        Path::Vnni | Path::Int8 => Activations::I8(Q8Rows::new(x, true)),
        Path::Int16 => Activations::I16(I16Rows::new(x)),
        _ => Activations::F32,
    };
    let nb = k / 32;
    rows_in_parallel(n, m, &|rs, o| {
        for j0 in (0..m).step_by(ROWS) {
            let g = Group {
                j0,
                rows: (m - j0).min(ROWS),
                stride: m,
            };
            let sums = xsum.get(j0 * nb..).unwrap_or(&[]);
            match (path, &acts) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: without VNNI, `Path::supported` detected AVX2, FMA and F16C; the
                // slices cover whole blocks of these rows.
                (Path::Vnni | Path::Int8, Activations::I8(q8)) if !vnni_hw() => unsafe {
                    let a = q8.rows(j0, k);
                    rows_vnni_avx2(t, w, row_bytes, rs.clone(), a, k, o, g)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: VNNI, AVX-512 BW/VL and F16C were detected (`vnni_hw`); the slices
                // cover whole blocks of these rows.
                (Path::Vnni | Path::Int8, Activations::I8(q8)) => unsafe {
                    let a = q8.rows(j0, k);
                    if g.rows == 1 {
                        rows_vnni::<1>(t, w, row_bytes, rs.clone(), a, k, o, g)
                    } else {
                        rows_vnni::<ROWS>(t, w, row_bytes, rs.clone(), a, k, o, g)
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Path::supported` detected AVX2, FMA and F16C; the rounded rows
                // hold these rows' whole blocks.
                (Path::Int16, Activations::I16(a)) => unsafe {
                    rows_i16(t, w, row_bytes, rs.clone(), a.rows(j0, k), sums, k, o, g)
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F and F16C were detected; the slices cover whole blocks.
                (Path::Avx512, _) => unsafe {
                    let xs = &x[j0 * k..];
                    if g.rows == 1 {
                        rows_avx512::<1>(t, w, row_bytes, rs.clone(), xs, sums, k, o, g)
                    } else {
                        rows_avx512::<ROWS>(t, w, row_bytes, rs.clone(), xs, sums, k, o, g)
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2, FMA and F16C were detected; the slices cover whole blocks.
                (Path::Avx2, _) => unsafe {
                    rows_avx2(t, w, row_bytes, rs.clone(), &x[j0 * k..], sums, k, o, g)
                },
                _ => {
                    for (i, r) in rs.clone().enumerate() {
                        let row = &w[r * row_bytes..(r + 1) * row_bytes];
                        for j in 0..g.rows {
                            let xj = &x[(j0 + j) * k..(j0 + j + 1) * k];
                            o[i * m + j0 + j] = dot_scalar(t, row, xj);
                        }
                    }
                }
            }
        }
    })
}

/// y [m, n] = x [m, k] · Wᵀ for kept Q4_1/Q8_0 blocks W [n, k], x rounded as `path` (Int16 or
/// Int8) rounds it, on the kernels' integer GEMM (`gemm_i16`, `gemm_i8`): the prompt rows of
/// those paths, whose decode rows take [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn prompt_matmul(
    path: Path,
    t: GgmlDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>, String> {
    if x.len() != m * k {
        return Err(format!(
            "integer prompt product: x has {} values for [{m}, {k}]",
            x.len()
        ));
    }
    // SAFETY: the product (not accumulating) writes every element.
    let mut y = unsafe { fedllm_kernels::uninit(m * n) };
    match path {
        Path::Int16 => fedllm_kernels::gemm_i16::matmul(t, w, n, k, x, m, &mut y, false)?,
        Path::Int8 => fedllm_kernels::gemm_i8::matmul(t, w, n, k, x, m, &mut y, false)?,
        p => return Err(format!("{} prompts take no integer GEMM", p.name())),
    }
    Ok(y)
}

/// Which activation rows a kernel call serves: `rows` from `j0`, in outputs of `stride`
/// values per weight row.
#[derive(Clone, Copy)]
struct Group {
    j0: usize,
    rows: usize,
    stride: usize,
}

impl Group {
    fn out<'a>(&self, o: &'a mut [f32], i: usize) -> &'a mut [f32] {
        &mut o[i * self.stride + self.j0..i * self.stride + self.j0 + self.rows]
    }
}

/// [`dots_vnni`] over the weight rows `rs` (the loop inside the target-feature function, so
/// the kernel inlines: a call per row of 18 blocks cost a third of the product).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_vnni<const M: usize>(
    t: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    rs: Range<usize>,
    a: Q8View,
    k: usize,
    o: &mut [f32],
    g: Group,
) {
    for (i, r) in rs.enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        dots_vnni::<M>(t, row, a, k, g.out(o, i));
    }
}

/// [`dots_avx512`] over the weight rows `rs`, as [`rows_vnni`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512<const M: usize>(
    t: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    rs: Range<usize>,
    x: &[f32],
    sums: &[f32],
    k: usize,
    o: &mut [f32],
    g: Group,
) {
    for (i, r) in rs.enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        dots_avx512::<M>(t, row, x, sums, k, g.out(o, i));
    }
}

/// [`rows_avx512`] with the AVX2 twins: each weight row against the group's rows of x four at
/// a time (the row stays in L1 between the fours).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    t: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    rs: Range<usize>,
    x: &[f32],
    sums: &[f32],
    k: usize,
    o: &mut [f32],
    g: Group,
) {
    let nb = k / 32;
    for (i, r) in rs.enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (p, out) in g.out(o, i).chunks_mut(4).enumerate() {
            let (xs, ss) = (&x[4 * p * k..], &sums[4 * p * nb..]);
            match out.len() {
                4 => dots_avx2::<4>(t, row, xs, ss, k, out),
                3 => dots_avx2::<3>(t, row, xs, ss, k, out),
                2 => dots_avx2::<2>(t, row, xs, ss, k, out),
                _ => dots_avx2::<1>(t, row, xs, ss, k, out),
            }
        }
    }
}

/// [`dots_avx512`] on 8-lane halves: each 16-lane accumulator of the original is a pair (lanes
/// 0–7, 8–15), every lane gets the same FMAs in the same order, and the final sum reduces as
/// `_mm512_reduce_add_ps` does. From 3 rows on, the even blocks run first, then the odd ones:
/// each parity's accumulators are their own chains, so the order within each is kept, and
/// only one parity's (2 per row) need registers at a time — room for 4 rows beside a decoded
/// block. Fewer rows alternate the parities as the original does: with only two chains per
/// row in flight, a block would wait on the previous block's FMA latency.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2<const M: usize>(
    t: GgmlDType,
    row: &[u8],
    x: &[f32],
    xsum: &[f32],
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let m = out.len().min(M);
    let nb = k / 32;
    let (x, xsum) = (x.as_ptr(), xsum.as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; M]; 2];
    let mut off = [[0f32; M]; 2];
    let [acc0, acc1] = &mut acc;
    let [off0, off1] = &mut off;
    match t {
        GgmlDType::Q4_1 if M >= 3 => {
            for b in (0..nb).step_by(2) {
                q4_1_avx2::<M>(row, x, xsum, k, b, m, acc0, off0);
            }
            for b in (1..nb).step_by(2) {
                q4_1_avx2::<M>(row, x, xsum, k, b, m, acc1, off1);
            }
        }
        GgmlDType::Q4_1 => {
            for b in (0..nb).step_by(2) {
                q4_1_avx2::<M>(row, x, xsum, k, b, m, acc0, off0);
                if b + 1 < nb {
                    q4_1_avx2::<M>(row, x, xsum, k, b + 1, m, acc1, off1);
                }
            }
        }
        GgmlDType::Q8_0 if M >= 3 => {
            for b in (0..nb).step_by(2) {
                q8_0_avx2::<M>(row, x, k, b, m, acc0);
            }
            for b in (1..nb).step_by(2) {
                q8_0_avx2::<M>(row, x, k, b, m, acc1);
            }
        }
        GgmlDType::Q8_0 => {
            for b in (0..nb).step_by(2) {
                q8_0_avx2::<M>(row, x, k, b, m, acc0);
                if b + 1 < nb {
                    q8_0_avx2::<M>(row, x, k, b + 1, m, acc1);
                }
            }
        }
        _ => unreachable!("unsupported type"),
    }
    for (j, o) in out.iter_mut().enumerate() {
        let lo = _mm256_add_ps(acc[0][j][0], acc[1][j][0]);
        let hi = _mm256_add_ps(acc[0][j][1], acc[1][j][1]);
        *o = fedllm_kernels::avx2::reduce16(lo, hi) + (off[0][j] + off[1][j]);
    }
}

/// [`q4_1_f32`] on halves: values 0–15 are the low nibbles of bytes 0–15, 16–31 the high.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_1_avx2<const M: usize>(
    row: &[u8],
    x: *const f32,
    xsum: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [[std::arch::x86_64::__m256; 2]; M],
    off: &mut [f32; M],
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let blk = row.as_ptr().add(b * 20);
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
    let dv = _mm256_broadcastss_ps(dm);
    let mn = _mm_cvtss_f32(_mm_movehdup_ps(dm));
    let mask = _mm256_set1_epi32(0x0F);
    // [half][lo, hi]: bytes 8h..8h+8 as values 8h.. (low nibbles) and 16+8h.. (high).
    let v: [[__m256; 2]; 2] = std::array::from_fn(|h| {
        let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(4 + 8 * h) as *const __m128i));
        [
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, mask)), dv),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(q)), dv),
        ]
    });
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let xp = x.add(j * k + b * 32);
        for h in 0..2 {
            let a = _mm256_fmadd_ps(v[h][0], _mm256_loadu_ps(xp.add(8 * h)), acc[j][h]);
            acc[j][h] = _mm256_fmadd_ps(v[h][1], _mm256_loadu_ps(xp.add(16 + 8 * h)), a);
        }
        off[j] += mn * *xsum.add(j * nb + b);
    }
}

/// [`q8_0_f32`] on halves.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2<const M: usize>(
    row: &[u8],
    x: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [[std::arch::x86_64::__m256; 2]; M],
) {
    use std::arch::x86_64::*;
    let blk = row.as_ptr().add(b * 34);
    let dv = _mm256_set1_ps(h2f(u16::from_le_bytes([*blk, *blk.add(1)])));
    // Values 8i..8i+8.
    let f: [__m256; 4] = std::array::from_fn(|i| {
        let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * i) as *const __m128i));
        _mm256_mul_ps(_mm256_cvtepi32_ps(q), dv)
    });
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let xp = x.add(j * k + b * 32);
        for h in 0..2 {
            let a = _mm256_fmadd_ps(f[h], _mm256_loadu_ps(xp.add(8 * h)), acc[j][h]);
            acc[j][h] = _mm256_fmadd_ps(f[2 + h], _mm256_loadu_ps(xp.add(16 + 8 * h)), a);
        }
    }
}

/// Rows of x rounded per 32-value block to T, as the integer paths multiply them: scale
/// d = max|x|/L, q = round-half-even(x·(1/d)) — L = 127 for the VNNI path's i8 (llama.cpp's
/// Q8 activations), 32767 for the Int16 path, whose blocks are stored even values first
/// (0, 2, …, 30), then the odd ones: the order in which its shifts take a block's weights apart.
struct Rounded<T> {
    q: Vec<T>,
    /// [rows, blocks]: d.
    d: Vec<f32>,
    /// [rows, blocks]: d·Σq, what the 8-bit paths' Q4_1 offsets and Q8_0 correction multiply
    /// (Int16: empty).
    dq: Vec<f32>,
}

type Q8Rows = Rounded<i8>;
type I16Rows = Rounded<i16>;
type Q8View<'a> = RoundedView<'a, i8>;
type I16View<'a> = RoundedView<'a, i16>;

/// The activations a path multiplies: as given (f32 paths) or rounded (integer paths).
enum Activations {
    F32,
    I8(Q8Rows),
    I16(I16Rows),
}

/// A window of [`Rounded`] rows starting at one row.
#[derive(Clone, Copy)]
struct RoundedView<'a, T> {
    q: &'a [T],
    d: &'a [f32],
    dq: &'a [f32],
}

impl<'a, T> RoundedView<'a, T> {
    /// The window `rows` rows (of k values) further on.
    fn skip(self, rows: usize, k: usize) -> RoundedView<'a, T> {
        RoundedView {
            q: &self.q[rows * k..],
            d: &self.d[rows * k / 32..],
            dq: self.dq.get(rows * k / 32..).unwrap_or(&[]),
        }
    }
}

impl<T> Rounded<T> {
    fn rows(&self, j0: usize, k: usize) -> RoundedView<'_, T> {
        RoundedView {
            q: &self.q,
            d: &self.d,
            dq: &self.dq,
        }
        .skip(j0, k)
    }
}

impl Rounded<i8> {
    /// `simd` picks the AVX-512 rounding loop where the CPU has it; both give the same bytes.
    fn new(x: &[f32], simd: bool) -> Q8Rows {
        let nb = x.len() / 32;
        let mut r = Q8Rows {
            q: vec![0; x.len()],
            d: vec![0.0; nb],
            dq: vec![0.0; nb],
        };
        let mut sq = vec![0i32; nb];
        fedllm_kernels::rounding::round_row_i8(x, &mut r.q, &mut r.d, &mut sq, simd);
        for ((dq, d), sq) in r.dq.iter_mut().zip(&r.d).zip(sq) {
            *dq = d * sq as f32;
        }
        r
    }
}

impl Rounded<i16> {
    fn new(x: &[f32]) -> I16Rows {
        assert!(x.len().is_multiple_of(32));
        let mut r = I16Rows {
            // SAFETY: every block is rounded into below (x holds whole blocks).
            q: unsafe { fedllm_kernels::uninit(x.len()) },
            d: vec![0.0; x.len() / 32],
            dq: Vec::new(),
        };
        fedllm_kernels::rounding::round_row_i16(x, &mut r.q, &mut r.d);
        r
    }
}

/// Σ of a 256-bit register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Up to `ROWS` int8 rows against one weight row, a block's integer dot at a time: Q4_1's
/// nibbles are unsigned and multiply the signed activations directly; Q8_0's bytes are made
/// unsigned by +128 and the 128·Σq this adds is taken off through `dq`. Each block's integer
/// dot is exact; its scale and the sums are f32, summed as in [`dots_avx512`] (even and odd
/// blocks apart, the same order at any batch size).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni,f16c")]
unsafe fn dots_vnni<const M: usize>(
    t: GgmlDType,
    row: &[u8],
    a: Q8View,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let m = out.len().min(M);
    let nb = k / 32;
    let mut acc = [[_mm256_setzero_ps(); M]; 2];
    let mut off = [[0f32; M]; 2];
    let [acc0, acc1] = &mut acc;
    let [off0, off1] = &mut off;
    let q4 = t == GgmlDType::Q4_1;
    assert!(q4 || t == GgmlDType::Q8_0, "unsupported type");
    // Q4_1's offset m·(d_x·Σq) per block, Q8_0's -128·d·(d_x·Σq).
    let sums = a.dq.as_ptr();
    for b in (0..nb).step_by(2) {
        block_vnni::<M>(q4, row, a, sums, k, b, m, acc0, off0);
        if b + 1 < nb {
            block_vnni::<M>(q4, row, a, sums, k, b + 1, m, acc1, off1);
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = hsum256(_mm256_add_ps(acc[0][j], acc[1][j])) + (off[0][j] + off[1][j]);
    }
}

/// Block `b` of a Q4_1 (`q4`) or Q8_0 row against `m` int8 rows, into `acc` and `off`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_vnni<const M: usize>(
    q4: bool,
    row: &[u8],
    a: Q8View,
    sums: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
    off: &mut [f32; M],
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let (w, dw, ow) = if q4 {
        let blk = row.as_ptr().add(b * 20);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
        // Byte i holds value i (low nibble) and value i + 16 (high nibble).
        let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let w = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
        let w = _mm256_and_si256(w, _mm256_set1_epi8(0x0F));
        (w, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    } else {
        let blk = row.as_ptr().add(b * 34);
        let dw = h2f(u16::from_le_bytes([*blk, *blk.add(1)]));
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), dw, -128.0 * dw)
    };
    let (q, d) = (a.q.as_ptr(), a.d.as_ptr());
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let qa = _mm256_loadu_si256(q.add(j * k + b * 32) as *const __m256i);
        let dot = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, qa));
        acc[j] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * *d.add(j * nb + b)), acc[j]);
        off[j] += ow * *sums.add(j * nb + b);
    }
}

/// [`rows_vnni`] on AVX2 alone: each weight row against the group's int8 rows, four at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_vnni_avx2(
    t: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    rs: Range<usize>,
    a: Q8View,
    k: usize,
    o: &mut [f32],
    g: Group,
) {
    for (i, r) in rs.enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (p, out) in g.out(o, i).chunks_mut(4).enumerate() {
            let a = a.skip(4 * p, k);
            match out.len() {
                4 => dots_vnni_avx2::<4>(t, row, a, k, out),
                3 => dots_vnni_avx2::<3>(t, row, a, k, out),
                2 => dots_vnni_avx2::<2>(t, row, a, k, out),
                _ => dots_vnni_avx2::<1>(t, row, a, k, out),
            }
        }
    }
}

/// [`dots_vnni`] with [`block_vnni_avx2`]: the same f32 steps in the same order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_vnni_avx2<const M: usize>(
    t: GgmlDType,
    row: &[u8],
    a: Q8View,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let m = out.len().min(M);
    let nb = k / 32;
    let mut acc = [[_mm256_setzero_ps(); M]; 2];
    let mut off = [[0f32; M]; 2];
    let [acc0, acc1] = &mut acc;
    let [off0, off1] = &mut off;
    let q4 = t == GgmlDType::Q4_1;
    assert!(q4 || t == GgmlDType::Q8_0, "unsupported type");
    let sums = a.dq.as_ptr();
    for b in (0..nb).step_by(2) {
        block_vnni_avx2::<M>(q4, row, a, sums, k, b, m, acc0, off0);
        if b + 1 < nb {
            block_vnni_avx2::<M>(q4, row, a, sums, k, b + 1, m, acc1, off1);
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = hsum256(_mm256_add_ps(acc[0][j], acc[1][j])) + (off[0][j] + off[1][j]);
    }
}

/// [`block_vnni`] on AVX2. `vpdpbusd` sums four u8·i8 products per 32-bit lane; here
/// `vpmaddubsw` sums pairs into 16 bits and `vpmaddwd` pairs of those into the same lanes, all
/// exact: Q4_1's pairs reach 2·15·127. Q8_0's weights are multiplied signed (|w|, and x with
/// w's sign: pairs reach 2·128·127), and the +128 of the VNNI form is added back as 128·Σx
/// per lane, so every lane holds the VNNI path's integer.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_vnni_avx2<const M: usize>(
    q4: bool,
    row: &[u8],
    a: Q8View,
    sums: *const f32,
    k: usize,
    b: usize,
    m: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
    off: &mut [f32; M],
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let ones16 = _mm256_set1_epi16(1);
    let (w, dw, ow) = if q4 {
        let blk = row.as_ptr().add(b * 20);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
        let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let w = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
        let w = _mm256_and_si256(w, _mm256_set1_epi8(0x0F));
        (w, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
    } else {
        let blk = row.as_ptr().add(b * 34);
        let dw = h2f(u16::from_le_bytes([*blk, *blk.add(1)]));
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        (w, dw, -128.0 * dw)
    };
    let (q, d) = (a.q.as_ptr(), a.d.as_ptr());
    #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
    for j in 0..M.min(m) {
        let qa = _mm256_loadu_si256(q.add(j * k + b * 32) as *const __m256i);
        let lanes = if q4 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, qa), ones16)
        } else {
            let signed = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(qa, w)),
                ones16,
            );
            let xs = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), qa), ones16);
            _mm256_add_epi32(signed, _mm256_slli_epi32::<7>(xs))
        };
        let dot = _mm256_cvtepi32_ps(lanes);
        acc[j] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * *d.add(j * nb + b)), acc[j]);
        off[j] += ow * *sums.add(j * nb + b);
    }
}

/// The Int16 path over the weight rows `rs`: each weight row against the group's rows, up to
/// four at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_i16(
    t: GgmlDType,
    w: &[u8],
    row_bytes: usize,
    rs: Range<usize>,
    a: I16View,
    sums: &[f32],
    k: usize,
    o: &mut [f32],
    g: Group,
) {
    let nb = k / 32;
    let q4 = t == GgmlDType::Q4_1;
    assert!(q4 || t == GgmlDType::Q8_0, "unsupported type");
    for (i, r) in rs.enumerate() {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        let out = g.out(o, i);
        let mut j = 0;
        while j < out.len() {
            let step = [4, 2, 1]
                .into_iter()
                .find(|s| j + s <= out.len())
                .unwrap_or(1);
            let (q, d, s) = (
                a.q[j * k..].as_ptr(),
                a.d[j * nb..].as_ptr(),
                sums[j * nb..].as_ptr(),
            );
            let o = &mut out[j..j + step];
            match (step, q4) {
                (4, true) => dots_i16::<4, true>(row, q, d, s, k, o),
                (4, false) => dots_i16::<4, false>(row, q, d, s, k, o),
                (2, true) => dots_i16::<2, true>(row, q, d, s, k, o),
                (2, false) => dots_i16::<2, false>(row, q, d, s, k, o),
                (_, true) => dots_i16::<1, true>(row, q, d, s, k, o),
                (_, false) => dots_i16::<1, false>(row, q, d, s, k, o),
            }
            j += step;
        }
    }
}

/// M int16 rows (stride k, scales d, Σx per block `xsum`) against one Q4_1 (`Q4`) or Q8_0
/// weight row. Each block's integer dot is exact: `vpmaddwd` sums two products per 32-bit lane
/// and two of those are added, at most 4·128·32767 < 2²⁴ in magnitude, so its f32 conversion
/// is exact too; the block then scales into one f32 accumulator per row (d_x first, then the
/// weights' d), and Q4_1's offset m·Σx (exact f32 Σx) into a lane of its own. Four rows at most:
/// two registers per row then leave room for the decoded block (with eight they spill). Every
/// row sums its blocks in the same order whatever M is, so a row's result never depends on
/// the batch.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_i16<const M: usize, const Q4: bool>(
    row: &[u8],
    q: *const i16,
    d: *const f32,
    xsum: *const f32,
    k: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let mut acc = [_mm256_setzero_ps(); M];
    // Lane 1: Σ m·Σx (lane 0 collects d·Σx, unused).
    let mut off = [_mm_setzero_ps(); M];
    let nib = _mm256_set1_epi16(0x0F);
    // Dword shifts that bring each word's nibble 0 / 1 (low half) or 2 / 3 (high half) down.
    let (s_even, s_odd) = (
        _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0),
        _mm256_set_epi32(12, 12, 12, 12, 8, 8, 8, 8),
    );
    for b in 0..nb {
        // The block's even values (0, 2, …, 30) and odd ones as 16-bit lanes; d (and m).
        let (we, wo, dm) = if Q4 {
            // Word i holds values 2i, 2i + 16, 2i + 1, 2i + 17 in its four nibbles.
            let blk = row.as_ptr().add(b * 20);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
            let qs = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(4) as *const __m128i));
            (
                _mm256_and_si256(_mm256_srlv_epi32(qs, s_even), nib),
                _mm256_and_si256(_mm256_srlv_epi32(qs, s_odd), nib),
                dm,
            )
        } else {
            let blk = row.as_ptr().add(b * 34);
            let v = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let dw = _mm_set_ss(h2f(u16::from_le_bytes([*blk, *blk.add(1)])));
            (
                _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v)),
                _mm256_srai_epi16::<8>(v),
                dw,
            )
        };
        let dv = _mm256_broadcastss_ps(dm);
        #[allow(clippy::needless_range_loop)] // j also strides the activation pointers
        for j in 0..M {
            let xq = q.add(j * k + b * 32);
            let lanes = _mm256_add_epi32(
                _mm256_madd_epi16(we, _mm256_loadu_si256(xq as *const __m256i)),
                _mm256_madd_epi16(wo, _mm256_loadu_si256(xq.add(16) as *const __m256i)),
            );
            let scaled = _mm256_mul_ps(
                _mm256_cvtepi32_ps(lanes),
                _mm256_broadcast_ss(&*d.add(j * nb + b)),
            );
            acc[j] = _mm256_fmadd_ps(scaled, dv, acc[j]);
            if Q4 {
                off[j] = _mm_fmadd_ps(dm, _mm_broadcast_ss(&*xsum.add(j * nb + b)), off[j]);
            }
        }
    }
    for (o, (a, f)) in out.iter_mut().zip(acc.iter().zip(off)) {
        *o = hsum256(*a) + _mm_cvtss_f32(_mm_movehdup_ps(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// The dense kernel (x rows in groups of 8, k not a multiple of 16) equals the plain
    /// triple loop in f64 up to f32 summation error: k ≤ 100 terms of magnitude ≤ ~3, so 1e-4
    /// absolute.
    #[test]
    fn dense_matches_the_plain_product() {
        for (n, k, m) in [(37, 40, 1), (6, 96, 3), (33, 100, 8), (21, 64, 11)] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 997) as f32 / 499.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 104729) % 991) as f32 / 330.0 - 1.5)
                .collect();
            let got = dense_matmul(&w, n, k, &x, m);
            for j in 0..m {
                for r in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| w[r * k + c] as f64 * x[j * k + c] as f64)
                        .sum();
                    let e = (got[j * n + r] as f64 - want).abs();
                    assert!(e < 1e-4, "{n}x{k} m={m} [{j},{r}]: {e}");
                }
            }
        }
    }

    /// A seeded normal [n, k] matrix quantized to `t`: its blocks and their dequantized values.
    fn quantized(seed: u64, t: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let w = fedllm_testing::randn(seed, 0f32, 1.0, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let wd = q.dequantize(&dev).unwrap().flatten_all().unwrap();
        (q.data().unwrap().to_vec(), wd.to_vec1().unwrap())
    }

    /// Packed blocks give the dense kernel's numbers on the dequantized matrix bit for bit,
    /// on every path: n = 37 leaves partial 4-row groups and pool chunks, m up to 9 covers
    /// partial tiles of x rows and more than one group, Q6K (k = 256) a type widened by
    /// candle's own decoder.
    #[test]
    fn packed_rows_equal_dense_rows_of_the_dequantized_matrix() {
        let dev = Device::Cpu;
        for (t, k) in [
            (GgmlDType::Q4_1, 96),
            (GgmlDType::Q8_0, 96),
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q6K, 256),
        ] {
            let n = 37;
            let (raw, wd) = quantized(321, t, n, k);
            let x: Vec<f32> = fedllm_testing::randn(322, 0f32, 1.0, (9 * k,), &dev)
                .unwrap()
                .to_vec1()
                .unwrap();
            for p in available() {
                for m in [1, 2, 3, 4, 8, 9] {
                    let (x, n) = (&x[..m * k], n);
                    let want = with_path(p, || dense_matmul(&wd, n, k, x, m));
                    let got = with_path(p, || packed_matmul(t, &raw, n, k, x, m));
                    assert_eq!(got, want, "{p:?} {t:?} m={m}");
                }
            }
        }
    }

    /// A row's products are bit for bit the same alone and inside a batch of any size, on
    /// every path, so a request decodes the same tokens whoever shares its batch (continuous
    /// batching) and however many rows a prompt read has.
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        for p in available() {
            with_path(p, || rows_alone_and_batched(p));
        }
    }

    fn rows_alone_and_batched(p: Path) {
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (24, 96);
            let w = fedllm_testing::randn(311, 0f32, 1.0, (n, k), &dev).unwrap();
            let raw = QTensor::quantize(&w, t).unwrap().data().unwrap().to_vec();
            let x: Vec<f32> = fedllm_testing::randn(312, 0f32, 1.0, (20, k), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for m in [1, 2, 7, 8, 9, 11, 20] {
                let batch = matmul(t, &raw, n, k, &x[..m * k], m);
                for j in 0..m {
                    let alone = matmul(t, &raw, n, k, &x[j * k..(j + 1) * k], 1);
                    assert_eq!(
                        &batch[j * n..(j + 1) * n],
                        &alone[..],
                        "{p:?} {t:?} m={m} row {j}"
                    );
                }
            }
        }
        // Dense f32 rows (evaluation's dequantized weights): 25 weight rows leave a part
        // tile, k = 100 a tail past the 16-lane steps.
        let (n, k) = (25, 100);
        let w: Vec<f32> = fedllm_testing::randn(313, 0f32, 1.0, (n * k,), &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let x: Vec<f32> = fedllm_testing::randn(314, 0f32, 1.0, (20 * k,), &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 11, 20] {
            let batch = dense_matmul(&w, n, k, &x[..m * k], m);
            for j in 0..m {
                let alone = dense_matmul(&w, n, k, &x[j * k..(j + 1) * k], 1);
                assert_eq!(
                    &batch[j * n..(j + 1) * n],
                    &alone[..],
                    "{p:?} dense m={m} row {j}"
                );
            }
        }
    }

    /// Every path against the dequantized product (candle's own dequantization and matmul).
    /// The f32 paths differ only in summation order: 1e-3 relative. The VNNI path multiplies
    /// x rounded as llama.cpp rounds Q8 activations (per 32 values d = max|x|/127, q =
    /// round-half-even(x·(1/d)) in f32), the Int16 path x rounded the same way to 32767 levels;
    /// Q4_1's offset m multiplies the rounded values' sum on the 8-bit paths (the rounded row
    /// times the dequantized weights) and the exact Σx on the Int16 path: that product,
    /// computed here in f64 from the dequantized weights (Q4_1's m is each block's minimum),
    /// within f32 slack; and within the rounding bound of the exact product, Σ d/2·|w| (8-bit)
    /// or Σ d/2·|w − m| (Int16). The slack: each block's integer dot
    /// is exact, its scaling rounds twice, the blocks sum in chains of ≤ k/32 into 8 lanes
    /// reduced in 3 steps, and Q4_1's Σx sums 32 values: (k/32 + 40) roundings of 2⁻²⁴ of
    /// Σ(|w − m| + |m|)·|x| bound it. Truncating, rounding with another scale, or pairing a
    /// weight with the wrong activation (the Int16 blocks are stored even values first) misses
    /// the rounded product by far more.
    #[test]
    fn every_path_matches_the_dequantized_product() {
        let dev = Device::Cpu;
        for p in available() {
            for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
                for (n, k, m) in [(37, 64, 1), (5, 96, 3), (130, 32, 8), (20, 64, 11)] {
                    let (raw, wd) = quantized(301, t, n, k);
                    let x = fedllm_testing::randn(302, 0f32, 1.0, (m, k), &dev).unwrap();
                    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                    let got = with_path(p, || matmul(t, &raw, n, k, &xv, m));
                    for (j, r) in (0..m).flat_map(|j| (0..n).map(move |r| (j, r))) {
                        let (wr, xj) = (&wd[r * k..(r + 1) * k], &xv[j * k..(j + 1) * k]);
                        let want: f64 = wr.iter().zip(xj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let y = got[j * n + r] as f64;
                        let levels = p
                            .activation_bits()
                            .map_or(0.0, |b| ((1 << (b - 1)) - 1) as f32);
                        if levels == 0.0 {
                            let e = (y - want).abs();
                            assert!(e <= 1e-3 * (1.0 + want.abs()), "{p:?} {t:?} [{j},{r}]: {e}");
                            continue;
                        }
                        let (mut rounded, mut rounding, mut mag) = (0f64, 0f64, 0f64);
                        for (wb, xb) in wr.chunks(32).zip(xj.chunks(32)) {
                            let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / levels;
                            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                            let min = wb.iter().fold(f32::MAX, |a, v| a.min(*v));
                            let mb = if t == GgmlDType::Q4_1 {
                                min as f64
                            } else {
                                0.0
                            };
                            // Whether Q4_1's offset multiplies the exact Σx, and so the part
                            // of each weight that meets the unrounded x.
                            let exact_sum = p.activation_bits() == Some(16);
                            let unrounded = if exact_sum { mb } else { 0.0 };
                            for (w, x) in wb.iter().zip(xb) {
                                let xq = d as f64 * (x * id).round_ties_even() as f64;
                                let xm = if exact_sum { *x as f64 } else { xq };
                                rounded += (*w as f64 - mb) * xq + mb * xm;
                                rounding += d as f64 * 0.5 * (*w as f64 - unrounded).abs();
                                mag += ((*w as f64 - mb).abs() + mb.abs()) * x.abs() as f64;
                            }
                        }
                        let slack = (k / 32 + 40) as f64 * 2f64.powi(-24) * (1.0 + mag);
                        let e = (y - rounded).abs();
                        assert!(
                            e <= slack,
                            "{p:?} {t:?} {n}x{k} m={m} [{j},{r}]: {e} from rounded"
                        );
                        let e = (y - want).abs();
                        assert!(
                            e <= rounding * (1.0 + 1e-6) + slack,
                            "{p:?} {t:?} [{j},{r}]: {e}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 twins give the AVX-512 f32 kernels' bits: quantized (single rows and groups,
    /// odd block counts) and dense weights.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_twins_give_the_avx512_bits() {
        if !fedllm_kernels::avx2::twins_comparable("qmatvec")
            || !Path::Avx2.supported()
            || !Path::Avx512.supported()
        {
            return;
        }
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (n, k, m) in [(37, 96, 1), (20, 64, 3), (33, 160, 8), (9, 32, 11)] {
                let w = fedllm_testing::randn(321, 0f32, 1.0, (n, k), &dev).unwrap();
                let raw = QTensor::quantize(&w, t).unwrap().data().unwrap().to_vec();
                let x: Vec<f32> = fedllm_testing::randn(322, 0f32, 1.0, (m, k), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let run = |p| with_path(p, || matmul(t, &raw, n, k, &x, m));
                assert_eq!(run(Path::Avx2), run(Path::Avx512), "{t:?} {n}x{k} m={m}");
                // Dense rows one value longer: the scalar tail past the 16-lane steps.
                let wd: Vec<f32> = (0..n * (k + 1))
                    .map(|i| (i % 13) as f32 * 0.1 - 0.6)
                    .collect();
                let xd: Vec<f32> = (0..m * (k + 1))
                    .map(|i| (i % 7) as f32 * 0.3 - 0.9)
                    .collect();
                let run = |p| with_path(p, || dense_matmul(&wd, n, k + 1, &xd, m));
                assert_eq!(run(Path::Avx2), run(Path::Avx512), "dense {n}x{k} m={m}");
            }
        }
    }

    /// The AVX2 form of the VNNI path gives the VNNI kernels' bits (the same integer per lane,
    /// the same f32 steps), Q4_1 and Q8_0, one row and groups.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_twin_gives_the_vnni_bits() {
        if !vnni_hw() {
            eprintln!("note: no AVX-512 VNNI here: its AVX2 twin was not compared with it");
            return;
        }
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (n, k, m) in [(37, 96, 1), (20, 64, 3), (33, 160, 8)] {
                let w = fedllm_testing::randn(331, 0f32, 1.0, (n, k), &dev).unwrap();
                let raw = QTensor::quantize(&w, t).unwrap().data().unwrap().to_vec();
                let x: Vec<f32> = fedllm_testing::randn(332, 0f32, 2.0, (m, k), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let hw = with_path(Path::Vnni, || matmul(t, &raw, n, k, &x, m));
                let q8 = Q8Rows::new(&x, true);
                let mut yt = vec![0f32; n * m];
                let g = Group {
                    j0: 0,
                    rows: m,
                    stride: m,
                };
                let rb = raw.len() / n;
                // SAFETY: VNNI hardware implies AVX2, FMA and F16C; whole blocks.
                unsafe { rows_vnni_avx2(t, &raw, rb, 0..n, q8.rows(0, k), k, &mut yt, g) };
                assert_eq!(transpose(yt, n, m), hw, "{t:?} {n}x{k} m={m}");
            }
        }
    }

    /// The AVX-512 rounding of activations gives the scalar loop's bytes and scales (the
    /// kernels' exactness rests on both paths quantizing alike), zero blocks included.
    #[test]
    fn activation_rounding_is_the_same_with_and_without_simd() {
        if !Path::Avx512.supported() {
            eprintln!("note: no AVX-512 here, the SIMD rounding is not exercised");
            return;
        }
        let dev = Device::Cpu;
        let mut x: Vec<f32> = fedllm_testing::randn(303, 0f32, 3.0, (4, 96), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        x[32..64].fill(0.0);
        let (a, b) = (Q8Rows::new(&x, true), Q8Rows::new(&x, false));
        assert_eq!((&a.q, &a.d, &a.dq), (&b.q, &b.d, &b.dq));
        assert_eq!((a.d[1], a.dq[1]), (0.0, 0.0));
        // By hand: a block of 0..31 has d = 31/127 and q = round(v·127/31): 1 → 4 (4.10),
        // 8 → 33 (32.77, where truncation gives 32).
        let ramp: Vec<f32> = (0..32).map(|v| v as f32).collect();
        let r = Q8Rows::new(&ramp, true);
        assert_eq!(r.d[0], 31.0 / 127.0);
        assert_eq!((r.q[1], r.q[8], r.q[31]), (4, 33, 127));
    }

    /// A non-finite activation (NaN or ±inf) makes every product of its row non-finite on
    /// every path (and the Int16 and Int8 paths' prompt products), as the f32 product does, and leaves
    /// the other rows finite: the integer paths must not round it into a finite value (`maxps`
    /// and `f32::max` skip NaN).
    #[test]
    fn a_non_finite_activation_is_never_a_finite_product() {
        let (n, k) = (20, 96);
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (raw, _) = quantized(341, t, n, k);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x: Vec<f32> = fedllm_testing::randn(342, 0f32, 1.0, (3 * k,), &Device::Cpu)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                x[k + 40] = bad;
                let prompt = [Path::Int16, Path::Int8]
                    .into_iter()
                    .filter(|p| p.supported())
                    .map(|p| (p.name(), prompt_matmul(p, t, &raw, n, k, &x, 3).unwrap()));
                let decode = available()
                    .into_iter()
                    .map(|p| (p.name(), with_path(p, || matmul(t, &raw, n, k, &x, 3))));
                for (p, y) in decode.chain(prompt) {
                    for (j, row) in y.chunks(n).enumerate() {
                        let finite = row.iter().filter(|v| v.is_finite()).count();
                        let want = if j == 1 { 0 } else { n };
                        assert_eq!(finite, want, "{p} {t:?} {bad} row {j}: {row:?}");
                    }
                }
            }
        }
    }
}
