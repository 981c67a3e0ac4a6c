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
/// issue rate is what is measured. (instruction, multiply-adds per instruction, rate), for
/// the instructions this CPU has.
pub fn peak_rates(iters: usize) -> Vec<(&'static str, f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    return peak::Instr::ALL
        .into_iter()
        .filter(|i| i.supported())
        .map(|i| {
            let t = Instant::now();
            std::hint::black_box(i.run(iters));
            let s = t.elapsed().as_secs_f64();
            (i.name(), i.macs(), (iters * 12) as f64 * i.macs() / s / 1e9)
        })
        .collect();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        Vec::new()
    }
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) enum Instr {
        FmaYmm,
        MaddYmm,
        FmaZmm,
        Dpwssd,
        Dpbusd,
        Dpbf16,
    }

    impl Instr {
        pub(super) const ALL: [Instr; 6] = [
            Instr::FmaYmm,
            Instr::MaddYmm,
            Instr::FmaZmm,
            Instr::Dpwssd,
            Instr::Dpbusd,
            Instr::Dpbf16,
        ];

        pub(super) fn name(self) -> &'static str {
            match self {
                Instr::FmaYmm => "f32 FMA (ymm)",
                Instr::MaddYmm => "int16 vpmaddwd+vpaddd (ymm)",
                Instr::FmaZmm => "f32 FMA (zmm)",
                Instr::Dpwssd => "int16 vpdpwssd (zmm)",
                Instr::Dpbusd => "int8 vpdpbusd (zmm)",
                Instr::Dpbf16 => "bf16 vdpbf16ps (zmm)",
            }
        }

        pub(super) fn macs(self) -> f64 {
            match self {
                Instr::FmaYmm => 8.0,
                Instr::MaddYmm | Instr::FmaZmm => 16.0,
                Instr::Dpwssd | Instr::Dpbf16 => 32.0,
                Instr::Dpbusd => 64.0,
            }
        }

        pub(super) fn supported(self) -> bool {
            let f512 = is_x86_feature_detected!("avx512f");
            match self {
                Instr::FmaYmm => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
                }
                Instr::MaddYmm => is_x86_feature_detected!("avx2"),
                Instr::FmaZmm => f512,
                Instr::Dpwssd | Instr::Dpbusd => f512 && is_x86_feature_detected!("avx512vnni"),
                Instr::Dpbf16 => f512 && is_x86_feature_detected!("avx512bf16"),
            }
        }

        /// `iters` rounds of 12 independent instructions; panics where not [`Self::supported`].
        pub(super) fn run(self, iters: usize) -> f32 {
            assert!(self.supported(), "{} is not supported here", self.name());
            // SAFETY: each function's target features are those `supported` detected.
            unsafe {
                match self {
                    Instr::FmaYmm => ymm_fma(iters),
                    Instr::MaddYmm => ymm_madd(iters),
                    Instr::FmaZmm => zmm_fma(iters),
                    Instr::Dpwssd | Instr::Dpbusd => zmm_vnni(self, iters),
                    Instr::Dpbf16 => zmm_bf16(iters),
                }
            }
        }
    }

    /// Keeps the rounds apart (no folding of the loop by the compiler).
    macro_rules! rounds {
        ($iters:expr, $acc:ident, $step:expr) => {
            for _ in 0..$iters {
                for $acc in $acc.iter_mut() {
                    *$acc = $step(*$acc);
                }
                std::arch::asm!("", options(nomem, nostack));
            }
        };
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn ymm_fma(iters: usize) -> f32 {
        let mut f = [_mm256_set1_ps(1.0); 12];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(1e-7));
        rounds!(iters, f, |v| _mm256_fmadd_ps(v, a, b));
        f.iter().map(|v| _mm256_cvtss_f32(*v)).sum()
    }

    #[target_feature(enable = "avx2")]
    unsafe fn ymm_madd(iters: usize) -> f32 {
        let mut s = [_mm256_set1_epi32(1); 12];
        let b = _mm256_set1_epi32(0x0002_0003);
        // The product reads the sum, so it is not hoisted out of the loop.
        rounds!(iters, s, |v| _mm256_add_epi32(v, _mm256_madd_epi16(v, b)));
        s.iter().map(|v| _mm256_cvtsi256_si32(*v) as f32).sum()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn zmm_fma(iters: usize) -> f32 {
        let mut f = [_mm512_set1_ps(1.0); 12];
        let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(1e-7));
        rounds!(iters, f, |v| _mm512_fmadd_ps(v, a, b));
        f.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn zmm_vnni(which: Instr, iters: usize) -> f32 {
        let mut s = [_mm512_set1_epi32(1); 12];
        let (a, b) = (
            _mm512_set1_epi32(0x0001_0001),
            _mm512_set1_epi32(0x0002_0003),
        );
        if matches!(which, Instr::Dpwssd) {
            rounds!(iters, s, |v| _mm512_dpwssd_epi32(v, a, b));
        } else {
            rounds!(iters, s, |v| _mm512_dpbusd_epi32(v, a, b));
        }
        s.iter()
            .map(|v| _mm512_reduce_add_epi32(*v))
            .fold(0, i32::wrapping_add) as f32
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn zmm_bf16(iters: usize) -> f32 {
        let mut f = [_mm512_set1_ps(1.0); 12];
        let h: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3F80_3F80));
        rounds!(iters, f, |v| _mm512_dpbf16_ps(v, h, h));
        f.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
    }
}
