//! Helpers shared by the parity tests of every crate: where the golden reference vectors live,
//! and how far two tensors are apart (everywhere, or only where an attention mask is 1).

use std::path::PathBuf;

use candle_core::{DType, Result, Tensor};

/// `FEDLLM_GOLDEN`, else the repository's `fixtures/golden`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("FEDLLM_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"),
    }
}

/// max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// max |got − want| for [B, T, V] tensors at positions whose mask is 1. When the tensors have
/// `n` more positions than the mask (prompt-type adapters' virtual tokens, which come first),
/// those are always compared.
pub fn masked_max_abs_diff(got: &Tensor, want: &Tensor, mask: &[Vec<u8>]) -> Result<f32> {
    let (g, w) = (got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
    let extra = w.first().map_or(0, |r| r.len()) - mask.first().map_or(0, |r| r.len());
    let mut e = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for t in 0..w[b].len() {
            if t < extra || row[t - extra] == 1 {
                e = g[b][t]
                    .iter()
                    .zip(&w[b][t])
                    .map(|(x, y)| (x - y).abs())
                    .fold(e, f32::max);
            }
        }
    }
    Ok(e)
}

/// A fused op against the composite it replaces: `fused` and `composite` (computed from the same
/// `vars`) agree within `tol.0`, and the gradients of Σ coef·y within `tol.1` for every var.
pub fn assert_same_op(
    fused: &Tensor,
    composite: &Tensor,
    vars: &[&candle_core::Var],
    tol: (f32, f32),
    what: &str,
) {
    let e = max_abs_diff(fused, composite).expect("comparable outputs");
    assert!(e < tol.0, "{what}: forward differs by {e}");
    let coef = Tensor::randn(0f32, 1.0, fused.shape(), fused.device()).expect("coefficients");
    let grads = |y: &Tensor| {
        (y * &coef)
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward())
            .expect("backward")
    };
    let (gf, gc) = (grads(fused), grads(composite));
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (gf.get(v.as_tensor()), gc.get(v.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("{what}: input {i} has no gradient on one side")
        };
        let e = max_abs_diff(a, b).expect("comparable gradients");
        assert!(e < tol.1, "{what}: gradient of input {i} differs by {e}");
    }
}
