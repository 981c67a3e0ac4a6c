//! The op layer every forward and backward goes through, one op family per file, each beside
//! its composite reference and its gradient test. The composites are candle primitives that
//! have a backward (candle's fused `softmax_last_dim`, `rms_norm`, `rope*` and `layer_norm`
//! drop gradients silently); on the CPU in f32 the fused ops (`fused`, `block`, `linear`)
//! replace them with written backwards. Device-generic: other devices take the composites.

use candle_core::{DType, Result, Tensor};

mod activation;
mod attention;
pub(crate) mod block;
pub mod fused;
pub mod linear;
mod loss;
mod norm;
pub mod qmatvec;
mod rope;
mod softmax;

pub use activation::{gelu_new, silu, swiglu};
pub use attention::{
    attention, attention_composite, gqa_attention, gqa_attention_after, repeat_kv, self_attention,
};
pub use loss::{causal_lm_loss, cross_entropy};
pub use norm::{layer_norm, rms_norm, rms_norm_composite};
pub use rope::{rope, rope_composite};
pub use softmax::{log_softmax_last, softmax_last};

/// Reductions run in f32 (f64 stays f64, which the gradient tests use).
pub(crate) fn wide(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F64 | DType::F32 => Ok(x.clone()),
        _ => x.to_dtype(DType::F32),
    }
}

/// Whether the fused CPU kernels take these tensors.
pub(crate) fn fused_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Finite-difference gradient checks and seeded variables shared by the ops' tests.
#[cfg(test)]
pub(crate) mod check {
    use candle_core::{Device, Result, Tensor, Var};

    /// Central finite differences of `f` (a scalar) at `x`, against candle's backward.
    pub(crate) fn check_grad(x: &[f32], shape: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) {
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

    pub(crate) fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 2.0)
            .collect()
    }

    /// A weighted sum makes every output element matter to the scalar being differentiated.
    pub(crate) fn weighted(y: &Tensor) -> Result<Tensor> {
        let n = y.elem_count();
        let w: Vec<f64> = (0..n).map(|i| 0.3 + (i % 5) as f64 * 0.17).collect();
        (y.flatten_all()? * Tensor::from_vec(w, n, y.device())?)?.sum_all()
    }

    /// A seeded N(0, s²) variable for op-versus-composite checks.
    pub(crate) fn var(seed: u64, shape: &[usize], s: f64) -> Var {
        let t = fedllm_testing::randn(seed, 0f32, 1.0, shape, &Device::Cpu).unwrap();
        Var::from_tensor(&(t * s).unwrap()).unwrap()
    }
}
