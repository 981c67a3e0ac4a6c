//! Rotary position embedding (fused on the CPU in f32).

use candle_core::{Result, Tensor, D};

use super::fused_f32;

/// Non-interleaved rotary embedding (transformers' `rotate_half` form).
/// x: [B, H, T, D]; cos, sin: [B, 1, T, D].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::profile::span(crate::profile::Phase::NormRope, || {
        if fused_f32(&[x, cos, sin]) {
            let (b, h, t, d) = x.dims4()?;
            if cos.dims4()? == (b, 1, t, d) && sin.dims4()? == (b, 1, t, d) {
                let host = |c: &Tensor| -> Result<std::sync::Arc<Vec<f32>>> {
                    Ok(std::sync::Arc::new(c.flatten_all()?.to_vec1()?))
                };
                let op = crate::ops::fused::Rope {
                    cos: host(cos)?,
                    sin: host(sin)?,
                    dims: (b, h, t, d),
                };
                return x.contiguous()?.apply_op1(op);
            }
        }
        rope_composite(x, cos, sin)
    })
}

pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_grad, data, var, weighted};
    use super::*;
    use candle_core::Device;
    /// The composite against central finite differences.
    #[test]
    fn grad_rope() {
        let cos = Tensor::from_vec(
            data(8).iter().map(|&v| v as f64).collect::<Vec<_>>(),
            (1, 1, 2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let sin = cos.affine(0.5, 0.1).unwrap();
        check_grad(&data(16), &[1, 2, 2, 4], |x| {
            weighted(&rope(x, &cos, &sin)?)
        });
    }

    /// The fused RoPE equals its composite, value and gradient.
    #[test]
    fn fused_rope_matches_composite() {
        let dev = Device::Cpu;
        let x = var(203, &[2, 3, 5, 8], 1.0);
        let cos = fedllm_testing::randn(204, 0f32, 1.0, (2, 1, 5, 8), &dev).unwrap();
        let sin = fedllm_testing::randn(205, 0f32, 1.0, (2, 1, 5, 8), &dev).unwrap();
        fedllm_testing::assert_same_op(
            &rope(x.as_tensor(), &cos, &sin).unwrap(),
            &rope_composite(x.as_tensor(), &cos, &sin).unwrap(),
            &[&x],
            (1e-5, 1e-4),
            "rope",
        );
    }
}
