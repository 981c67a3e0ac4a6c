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
                // The tables read in place (a copy of both per call cost ~1 ms of a prompt).
                let (cs, cl) = cos.storage_and_layout();
                let (ss, sl) = sin.storage_and_layout();
                if let (
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(cv)),
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(sv)),
                    Some((ca, cz)),
                    Some((sa, sz)),
                ) = (&*cs, &*ss, cl.contiguous_offsets(), sl.contiguous_offsets())
                {
                    if let Some(y) = rope_heads_view(x, &cv[ca..cz], &sv[sa..sz])? {
                        return Ok(y);
                    }
                } else if let Some(y) = rope_heads_view(x, &host(cos)?, &host(sin)?)? {
                    return Ok(y);
                }
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

/// Inference heads still in the projections' layout (x = a [B, T, H, D] tensor transposed to
/// [B, H, T, D], nothing tracking gradients): rotated straight into a new [B, H, T, D] tensor,
/// one pass instead of a strided copy, a copy and the rotation. None for any other x.
fn rope_heads_view(x: &Tensor, cos: &[f32], sin: &[f32]) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    let (b, h, t, d) = x.dims4()?;
    let stored = x.transpose(1, 2)?;
    if x.track_op() || !stored.is_contiguous() || x.is_contiguous() {
        return Ok(None);
    }
    let (st, l) = stored.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(v)), Some((a, z))) = (&*st, l.contiguous_offsets()) else {
        return Ok(None);
    };
    // SAFETY: `rope_from_bthd` writes every value of y.
    let mut y = unsafe { fedllm_kernels::uninit(b * h * t * d) };
    fedllm_kernels::fused::rope_from_bthd(&v[a..z], cos, sin, (b, h, t, d), &mut y);
    Ok(Some(Tensor::from_vec(y, (b, h, t, d), x.device())?))
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

    /// Inference heads in the projections' layout ([B, T, H, D] transposed, as attention
    /// takes them) rotate in one pass to the fused op's values on the same heads made
    /// contiguous, bit for bit (the same operations per value), for 1 and several batch rows.
    #[test]
    fn heads_view_rotates_as_the_contiguous_heads() {
        let dev = Device::Cpu;
        for (b, t, h, d) in [(1, 5, 3, 8), (2, 70, 9, 64)] {
            let x = fedllm_testing::randn(206, 0f32, 1.0, (b, t, h, d), &dev).unwrap();
            let cos = fedllm_testing::randn(207, 0f32, 1.0, (b, 1, t, d), &dev).unwrap();
            let sin = fedllm_testing::randn(208, 0f32, 1.0, (b, 1, t, d), &dev).unwrap();
            let view = x.transpose(1, 2).unwrap();
            let host = |c: &Tensor| c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = rope_heads_view(&view, &host(&cos), &host(&sin))
                .unwrap()
                .expect("a transposed [B, T, H, D] tensor takes the one-pass rotation");
            let op = crate::ops::fused::Rope {
                cos: std::sync::Arc::new(host(&cos)),
                sin: std::sync::Arc::new(host(&sin)),
                dims: (b, h, t, d),
            };
            let want = view.contiguous().unwrap().apply_op1(op).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                fedllm_testing::max_abs_diff(&got, &want).unwrap(),
                0.0,
                "{b} {t}"
            );
            assert!(
                rope_heads_view(&view.contiguous().unwrap(), &host(&cos), &host(&sin))
                    .unwrap()
                    .is_none()
            );
        }
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
