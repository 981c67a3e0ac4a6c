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

/// `rope` of a projection's output y [B, T, H·D] as heads [B, H, T, D] (the transpose, then
/// `rope` with the forward's tables): at inference on the CPU in f32 one pass from y's layout
/// with the forward's host tables, the same numbers.
pub fn rope_heads(y: &Tensor, h: usize, ctx: &crate::cache::Ctx) -> Result<Tensor> {
    let (b, t, hd) = y.dims3()?;
    let d = hd / h.max(1);
    let Some((cos, sin)) = &ctx.rope else {
        candle_core::bail!("rope_heads: the forward has no rotary tables");
    };
    if !y.track_op() && fused_f32(&[y]) {
        if let Some(host) = ctx.host()? {
            if host.cos.len() == b * t * d && host.sin.len() == b * t * d {
                let op = crate::ops::fused::RopeHeads {
                    cos: host.cos.clone(),
                    sin: host.sin.clone(),
                    dims: (b, h, t, d),
                };
                return crate::profile::span(crate::profile::Phase::NormRope, || {
                    y.contiguous()?.apply_op1_no_bwd(&op)
                });
            }
        }
    }
    rope(&y.reshape((b, t, h, d))?.transpose(1, 2)?, cos, sin)
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

    /// `rope_heads` (one pass from the projection's layout with the forward's host tables)
    /// equals the transpose then `rope` bit for bit: the same rotation of the same values. Two
    /// rows, the second left-padded by 2, after 3 cached positions (positions differ per row),
    /// below and above the kernel's parallel threshold (240 and 43,200 values).
    #[test]
    fn rope_heads_equals_rope_of_the_transposed_heads() {
        use crate::cache::{build_ctx, CtxSpec};
        let dev = Device::Cpu;
        let d = 8;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        for (b, t, h) in [(2, 5, 3), (2, 300, 9)] {
            let mask: Vec<Vec<u8>> = (0..b)
                .map(|r| (0..3 + t).map(|j| u8::from(r == 0 || j >= 2)).collect())
                .collect();
            let spec = CtxSpec {
                batch: b,
                t,
                past: 3,
                key_mask: Some(&mask),
                sliding_window: None,
            };
            let ctx = build_ctx(&spec, Some(&inv), candle_core::DType::F32, &dev).unwrap();
            let y = fedllm_testing::randn(251, 0f32, 1.0, (b, t, h * d), &dev).unwrap();
            let (cos, sin) = ctx.rope.as_ref().unwrap();
            let heads = y.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap();
            let want = rope(&heads, cos, sin).unwrap();
            let got = rope_heads(&y, h, &ctx).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                fedllm_testing::max_abs_diff(&got, &want).unwrap(),
                0.0,
                "[{b}, {t}, {h}]"
            );
        }
    }
}
