//! GFLOP/s of the bf16 GEMM on the shapes of workload W1 (SmolLM2-135M, 1,024 rows), next to
//! candle's f32 matmul on the same shapes.

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::gemm::{matmul_bf16, ASrc, BSrc};
use crate::isa::Isa;

#[derive(Debug, Clone)]
pub struct GemmRow {
    pub what: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// GFLOP/s per instruction set tried, then candle f32.
    pub gflops: Vec<(String, f64)>,
}

/// (name, k, n) of the frozen products in one W1 step; m = batch × sequence.
pub const W1_SHAPES: [(&str, usize, usize); 6] = [
    ("q/o_proj", 576, 576),
    ("k/v_proj", 576, 192),
    ("gate/up_proj", 576, 1536),
    ("down_proj", 1536, 576),
    ("lm_head", 576, 49152),
    ("lm_head dX", 49152, 576),
];

/// The fastest of `reps` runs of `f` (after one warm-up), in seconds.
pub fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn bench_gemm(m: usize, isas: &[Isa], reps: usize) -> candle_core::Result<Vec<GemmRow>> {
    let mut rows = Vec::new();
    for &(what, k, n) in &W1_SHAPES {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
            .collect();
        let flop = 2.0 * (m * k * n) as f64;
        let mut c = vec![0f32; m * n];
        let mut gflops = Vec::new();
        for &isa in isas {
            let b = BSrc::F32 {
                data: &w,
                rows: n,
                cols: k,
                t: true,
            };
            let s = best_of(reps, || {
                matmul_bf16(ASrc::F32(&a), m, b, &mut c, isa).expect("bench shapes are valid")
            });
            gflops.push((isa.name().to_string(), flop / s / 1e9));
        }
        let at = Tensor::from_slice(&a, (m, k), &Device::Cpu)?;
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
        let mut err = None;
        let s = best_of(reps, || {
            if let Err(e) = wt.t().and_then(|t| at.matmul(&t)) {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        gflops.push(("candle f32".to_string(), flop / s / 1e9));
        rows.push(GemmRow {
            what,
            m,
            k,
            n,
            gflops,
        });
    }
    Ok(rows)
}

/// Register-only multiply-add rates of one core (G multiply-adds/s): the ceiling a GEMM on
/// that instruction can reach. Twelve independent accumulators hide the latency, so the
/// issue rate is what is measured. (instruction, multiply-adds per instruction, rate).
pub fn peak_rates(iters: usize) -> Vec<(&'static str, f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut out = Vec::new();
        let has = |f: &[&str]| f.iter().all(|f| feature(f));
        let kinds: [(&str, f64, &[&str], u8); 4] = [
            ("f32 FMA (ymm)", 8.0, &["avx2", "fma"], 0),
            ("f32 FMA (zmm)", 16.0, &["avx512f"], 1),
            ("int16 vpdpwssd (zmm)", 32.0, &["avx512f", "avx512vnni"], 2),
            ("int8 vpdpbusd (zmm)", 64.0, &["avx512f", "avx512vnni"], 3),
        ];
        let kinds = kinds.into_iter().chain([
            ("int16 vpmaddwd+vpaddd (ymm)", 16.0, &["avx2"][..], 4),
            (
                "bf16 vdpbf16ps (zmm)",
                32.0,
                &["avx512f", "avx512bf16"][..],
                5,
            ),
        ]);
        for (name, macs, feats, kind) in kinds {
            if !has(feats) {
                continue;
            }
            let t = Instant::now();
            // SAFETY: the instruction's features were detected above.
            std::hint::black_box(unsafe { peak::run(kind, iters) });
            let s = t.elapsed().as_secs_f64();
            out.push((name, macs, (iters * 12) as f64 * macs / s / 1e9));
        }
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        Vec::new()
    }
}

#[cfg(target_arch = "x86_64")]
fn feature(f: &str) -> bool {
    match f {
        "avx2" => is_x86_feature_detected!("avx2"),
        "fma" => is_x86_feature_detected!("fma"),
        "avx512f" => is_x86_feature_detected!("avx512f"),
        "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
        "avx512bf16" => is_x86_feature_detected!("avx512bf16"),
        _ => false,
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// `iters` rounds of 12 independent instructions of `kind`.
    pub(super) unsafe fn run(kind: u8, iters: usize) -> f32 {
        match kind {
            0 => ymm_fma(iters),
            4 => ymm_madd(iters),
            _ => zmm(kind, iters),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn ymm_fma(iters: usize) -> f32 {
        let mut f = [_mm256_set1_ps(1.0); 12];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for f in f.iter_mut() {
                *f = _mm256_fmadd_ps(*f, a, b);
            }
            // Keeps the rounds apart (no folding of the loop by the compiler).
            std::arch::asm!("", options(nomem, nostack));
        }
        f.iter().map(|v| _mm256_cvtss_f32(*v)).sum()
    }

    #[target_feature(enable = "avx2")]
    unsafe fn ymm_madd(iters: usize) -> f32 {
        let mut s = [_mm256_set1_epi32(1); 12];
        let b = _mm256_set1_epi32(0x0002_0003);
        for _ in 0..iters {
            for s in s.iter_mut() {
                // The product reads the sum, so it is not hoisted out of the loop.
                *s = _mm256_add_epi32(*s, _mm256_madd_epi16(*s, b));
            }
            std::arch::asm!("", options(nomem, nostack));
        }
        s.iter().map(|v| _mm256_cvtsi256_si32(*v) as f32).sum()
    }

    #[target_feature(enable = "avx512f,avx512vnni,avx512bf16")]
    unsafe fn zmm(kind: u8, iters: usize) -> f32 {
        let mut s = [_mm512_set1_epi32(1); 12];
        let mut f = [_mm512_set1_ps(1.0); 12];
        let (a, b) = (
            _mm512_set1_epi32(0x0001_0001),
            _mm512_set1_epi32(0x0002_0003),
        );
        let (fa, fb) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
        let h = _mm512_castsi512_ps(a);
        let hb: __m512bh = std::mem::transmute(h);
        for _ in 0..iters {
            for j in 0..12 {
                match kind {
                    1 => f[j] = _mm512_fmadd_ps(f[j], fa, fb),
                    2 => s[j] = _mm512_dpwssd_epi32(s[j], a, b),
                    3 => s[j] = _mm512_dpbusd_epi32(s[j], a, b),
                    _ => f[j] = _mm512_dpbf16_ps(f[j], hb, hb),
                }
            }
            std::arch::asm!("", options(nomem, nostack));
        }
        let ints: i32 = s
            .iter()
            .map(|v| _mm512_reduce_add_epi32(*v))
            .fold(0, i32::wrapping_add);
        f.iter().map(|v| _mm512_reduce_add_ps(*v)).sum::<f32>() + ints as f32
    }
}
