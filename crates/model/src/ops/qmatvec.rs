//! Decode-time products with GGUF-quantized weights: y[m, n] = x[m, k] · W[n, k]ᵀ for a few
//! activation rows, reading the Q4_1 / Q8_0 blocks directly (no dequantized copy, activations
//! kept in f32). candle's own kernels have no SIMD path for Q4_1 and quantize the activations;
//! this one uses AVX-512 when the CPU has it, a portable loop otherwise, and all cores.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

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
            std::env::var_os("FEDLLM_NO_AVX512").is_none() && is_x86_feature_detected!("avx512f")
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(t: GgmlDType, row: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    let mut tail = 0f32;
    match t {
        GgmlDType::Q4_1 => {
            let mask = _mm_set1_epi8(0x0F);
            for (b, blk) in row.chunks_exact(20).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let qs = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(qs, mask)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16(qs, 4),
                    mask,
                )));
                let x0 = _mm512_loadu_ps(x.as_ptr().add(b * 32));
                let x1 = _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16));
                let s = _mm512_fmadd_ps(lo, x0, _mm512_mul_ps(hi, x1));
                acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
                // m · Σx over the block
                let xs = _mm512_add_ps(x0, x1);
                acc = _mm512_fmadd_ps(xs, _mm512_set1_ps(m), acc);
            }
        }
        GgmlDType::Q8_0 => {
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let q0 = _mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(blk.as_ptr().add(18) as *const __m128i);
                let f0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
                let f1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
                let x0 = _mm512_loadu_ps(x.as_ptr().add(b * 32));
                let x1 = _mm512_loadu_ps(x.as_ptr().add(b * 32 + 16));
                let s = _mm512_fmadd_ps(f0, x0, _mm512_mul_ps(f1, x1));
                acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
            }
        }
        _ => tail = f32::NAN,
    }
    _mm512_reduce_add_ps(acc) + tail
}

/// y [m, n] for x [m, k] (row-major f32) and raw blocks of W [n, k].
pub fn matmul(t: GgmlDType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let (be, bb) = block(t).expect("supported type");
    assert!(k.is_multiple_of(be) && w.len() == n * k / be * bb && x.len() == m * k);
    let row_bytes = k / be * bb;
    let avx = use_avx512();
    let mut yt = vec![0f32; n * m]; // [n, m]: each weight row is read once for all m rows
    yt.par_chunks_mut(m * 64).enumerate().for_each(|(c, out)| {
        for (i, o) in out.chunks_mut(m).enumerate() {
            let r = c * 64 + i;
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            for (j, oj) in o.iter_mut().enumerate() {
                let xr = &x[j * k..(j + 1) * k];
                *oj = if avx {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX-512F was detected at run time; the slices cover whole blocks.
                    unsafe {
                        dot_avx512(t, row, xr)
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    dot_scalar(t, row, xr)
                } else {
                    dot_scalar(t, row, xr)
                };
            }
        }
    });
    let mut y = vec![0f32; m * n];
    for r in 0..n {
        for j in 0..m {
            y[j * n + r] = yt[r * m + j];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    #[test]
    fn matches_dequantized_matmul_on_both_paths() {
        let dev = Device::Cpu;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (n, k, m) in [(37, 64, 1), (5, 96, 3), (130, 32, 8)] {
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
