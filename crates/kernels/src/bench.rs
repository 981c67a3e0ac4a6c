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
