//! Decode-time products with GGUF-quantized weights: y[m, n] = x[m, k] · W[n, k]ᵀ for a few
//! activation rows, reading the Q4_1 / Q8_0 blocks directly (no dequantized copy, activations
//! kept in f32). candle's own kernels have no SIMD path for Q4_1 and quantize the activations;
//! this one uses AVX-512 when the CPU has it, a portable loop otherwise, and all cores.

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

fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var_os("FEDLLM_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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
    x.chunks_exact(32).map(|b| b.iter().sum()).collect()
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
    // Two vector accumulators per row, alternating by block: at batch 1 a single one makes
    // every block wait on the previous block's FMA latency. Every batch size sums a row the
    // same way, so a row comes out bit for bit the same whatever the batch (continuous
    // batching relies on it).
    // M bounds the rows (`out.len()`); at M = 1 the accumulators stay in registers (a
    // runtime count spills them, which at batch 1 cost a sixth of the step).
    let mut acc = [[_mm512_setzero_ps(); M]; 2];
    let mut off = [[0f32; M]; 2];
    match t {
        GgmlDType::Q4_1 => {
            let mask = _mm512_set1_epi32(0x0F);
            for b in 0..nb {
                let blk = row.as_ptr().add(b * 20);
                // d and m converted together (one F16C conversion), the 16 bytes widened once
                // (one shuffle) and split into low and high nibbles in 32-bit lanes.
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                let dv = _mm512_broadcastss_ps(dm);
                let mn = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
                let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), dv);
                let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), dv);
                let (acc, off) = (&mut acc[b & 1], &mut off[b & 1]);
                for (j, (aj, oj)) in acc.iter_mut().zip(off.iter_mut()).enumerate().take(m) {
                    let xp = x.as_ptr().add(j * k + b * 32);
                    let a = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), *aj);
                    *aj = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), a);
                    *oj += mn * xsum[j * nb + b];
                }
            }
        }
        GgmlDType::Q8_0 => {
            for b in 0..nb {
                let blk = row.as_ptr().add(b * 34);
                let dv = _mm512_set1_ps(h2f(u16::from_le_bytes([*blk, *blk.add(1)])));
                let f0 = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(2) as *const __m128i
                    ))),
                    dv,
                );
                let f1 = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(18) as *const __m128i
                    ))),
                    dv,
                );
                for (j, aj) in acc[b & 1].iter_mut().enumerate().take(m) {
                    let xp = x.as_ptr().add(j * k + b * 32);
                    let a = _mm512_fmadd_ps(f0, _mm512_loadu_ps(xp), *aj);
                    *aj = _mm512_fmadd_ps(f1, _mm512_loadu_ps(xp.add(16)), a);
                }
            }
        }
        _ => unreachable!("unsupported type"),
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j])) + (off[0][j] + off[1][j]);
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

/// y [m, n] = x [m, k] · W [n, k]ᵀ for a few rows of x and a dense f32 W: one streaming pass
/// over W (a GEMM would repack all of W for a handful of rows).
pub fn dense_matmul(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert!(w.len() == n * k && x.len() == m * k);
    let avx = use_avx512();
    rows_in_parallel(n, m, &|r, o| {
        let row = &w[r * k..(r + 1) * k];
        for (g, og) in o.chunks_mut(ROWS).enumerate() {
            let xs = &x[g * ROWS * k..(g * ROWS + og.len()) * k];
            if avx {
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
    })
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

/// y [m, n] where `row(r, out)` fills `out[j]` = x_j · W_r: weight rows in chunks across the
/// decode pool, then transposed.
fn rows_in_parallel(n: usize, m: usize, row: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    let pool = fedllm_kernels::pool::global();
    let chunk = n.div_ceil(4 * pool.threads()).max(16);
    let mut yt = vec![0f32; n * m]; // [n, m]: each weight row is read once for all m rows
    let out = Out(yt.as_mut_ptr());
    pool.for_chunks(n, chunk, &|rs| {
        for r in rs {
            // SAFETY: row r's m outputs lie inside yt and belong to this chunk alone.
            let o = unsafe { out.slice(r * m, m) };
            row(r, o);
        }
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
    let avx = use_avx512();
    let xsum = block_sums(x);
    rows_in_parallel(n, m, &|r, o| {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (g, og) in o.chunks_mut(ROWS).enumerate() {
            let j0 = g * ROWS;
            let xs = &x[j0 * k..(j0 + og.len()) * k];
            if avx {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512F was detected at run time; the slices cover whole blocks.
                unsafe {
                    let sums = &xsum[j0 * (k / 32)..];
                    if og.len() == 1 {
                        dots_avx512::<1>(t, row, xs, sums, k, og)
                    } else {
                        dots_avx512::<ROWS>(t, row, xs, sums, k, og)
                    }
                }
            } else {
                for (j, oj) in og.iter_mut().enumerate() {
                    *oj = dot_scalar(t, row, &xs[j * k..(j + 1) * k]);
                }
            }
        }
    })
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

    /// A row's products are bit for bit the same alone and inside a batch of any size, so a
    /// request decodes the same tokens whoever shares its batch (continuous batching).
    #[test]
    fn a_rows_result_does_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (n, k) = (24, 96);
            let w = fedllm_testing::randn(311, 0f32, 1.0, (n, k), &dev).unwrap();
            let raw = QTensor::quantize(&w, t).unwrap().data().unwrap().to_vec();
            let x: Vec<f32> = fedllm_testing::randn(312, 0f32, 1.0, (11, k), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for m in 1..=11 {
                let batch = matmul(t, &raw, n, k, &x[..m * k], m);
                for j in 0..m {
                    let alone = matmul(t, &raw, n, k, &x[j * k..(j + 1) * k], 1);
                    assert_eq!(
                        &batch[j * n..(j + 1) * n],
                        &alone[..],
                        "{t:?} m={m} row {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_dequantized_matmul_on_both_paths() {
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (n, k, m) in [(37, 64, 1), (5, 96, 3), (130, 32, 8), (20, 64, 11)] {
                let w = fedllm_testing::randn(301, 0f32, 1.0, (n, k), &dev).unwrap();
                let q = QTensor::quantize(&w, t).unwrap();
                let wd = q.dequantize(&dev).unwrap();
                let x = fedllm_testing::randn(302, 0f32, 1.0, (m, k), &dev).unwrap();
                let want: Vec<f32> = x
                    .matmul(&wd.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let raw = q.data().unwrap();
                let got = matmul(t, &raw, n, k, &xv, m);
                let row_bytes = raw.len() / n;
                let scalar: Vec<f32> = (0..m)
                    .flat_map(|j| (0..n).map(move |r| (j, r)))
                    .map(|(j, r)| {
                        dot_scalar(
                            t,
                            &raw[r * row_bytes..(r + 1) * row_bytes],
                            &xv[j * k..(j + 1) * k],
                        )
                    })
                    .collect();
                for ((a, b), c) in got.iter().zip(&want).zip(&scalar) {
                    assert!(
                        (a - b).abs() < 1e-3 * (1.0 + b.abs()),
                        "{t:?} {n}x{k} m={m}: {a} vs {b}"
                    );
                    assert!(
                        (c - b).abs() < 1e-3 * (1.0 + b.abs()),
                        "{t:?} scalar: {c} vs {b}"
                    );
                }
            }
        }
    }
}
