//! Normalisations: LLaMA's RMSNorm (fused on the CPU in f32) and GPT-2's LayerNorm.

use candle_core::{Result, Tensor, D};

use super::{fused_f32, wide};

/// LLaMA RMSNorm, computed in f32 as transformers does, then cast back before the weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    crate::profile::span(crate::profile::Phase::NormRope, || {
        if fused_f32(&[x, weight]) {
            let op = crate::ops::fused::RmsNorm { eps: eps as f32 };
            return x.contiguous()?.apply_op2(&weight.contiguous()?, op);
        }
        rms_norm_composite(x, weight, eps)
    })
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

#[cfg(test)]
mod tests {
    use super::super::check::{check_grad, data, var, weighted};
    use super::*;
    use candle_core::Device;
    #[test]
    fn grad_norms() {
        let w = Tensor::new(&[1.1f64, 0.9, 1.3, 0.7], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0], &Device::Cpu).unwrap();
        check_grad(&data(8), &[2, 4], |x| weighted(&rms_norm(x, &w, 1e-5)?));
        check_grad(&data(8), &[2, 4], |x| {
            weighted(&layer_norm(x, &w, &b, 1e-5)?)
        });
    }

    /// The fused RMSNorm equals its composite, value and gradients (37 rows of 50: not a
    /// multiple of the kernel's row blocks).
    #[test]
    fn fused_rms_norm_matches_composite() {
        let (x, w) = (var(201, &[37, 50], 2.0), var(202, &[50], 1.0));
        fedllm_testing::assert_same_op(
            &rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            &rms_norm_composite(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
            &[&x, &w],
            (1e-5, 1e-4),
            "rms_norm",
        );
    }
}
