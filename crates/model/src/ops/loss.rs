//! Losses: next-token cross-entropy with ignored labels, and the fused cross-entropy op.

use candle_core::{DType, Result, Tensor};

use super::log_softmax_last;

/// Mean cross-entropy of next-token prediction: logits [B, T, V] against labels [B, T]
/// (i64, -100 = ignored), labels shifted left by one as transformers does.
/// Returns the loss and the number of counted tokens.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        candle_core::bail!("causal_lm_loss needs at least 2 positions");
    }
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let labels = labels
        .narrow(1, 1, t - 1)?
        .flatten_all()?
        .to_dtype(DType::I64)?;
    let host: Vec<i64> = labels.to_vec1()?;
    let count = host.iter().filter(|&&l| l != -100).count();
    let valid: Vec<f32> = host
        .iter()
        .map(|&l| if l == -100 { 0.0 } else { 1.0 })
        .collect();
    let idx: Vec<u32> = host
        .iter()
        .map(|&l| if l == -100 { 0 } else { l as u32 })
        .collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (b * (t - 1), 1), dev)?;
    let valid = Tensor::from_vec(valid, b * (t - 1), dev)?;
    let logp = log_softmax_last(&logits)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let total = (picked.clone() * valid.to_dtype(picked.dtype())?)?.sum_all()?;
    let loss = (total.neg()? / count.max(1) as f64)?;
    Ok((loss, count))
}

/// Mean cross-entropy of `logits` [N, V] against `targets` (one class per row), as one op whose
/// backward writes softmax − onehot directly: no full-size log-softmax intermediates are kept
/// (the 49k-vocabulary logits of a batch are hundreds of MB). CPU only; other devices use the
/// composite `log_softmax_last` + gather.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {n} rows, {} targets", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} outside the vocabulary ({v})");
    }
    if n == 0 {
        candle_core::bail!("cross_entropy: no rows");
    }
    if !logits.device().is_cpu() {
        let idx = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
        let picked = log_softmax_last(logits)?.gather(&idx, 1)?;
        return picked.sum_all()?.neg()? / n as f64;
    }
    let per_row = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(CrossEntropy {
            targets: targets.to_vec(),
        })?;
    per_row.sum_all()? / n as f64
}

struct CrossEntropy {
    targets: Vec<u32>,
}

fn ce_rows(l: &[f32], v: usize, targets: &[u32], mut f: impl FnMut(usize, &[f32], f32, f32)) {
    for (i, row) in l.chunks_exact(v).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        f(i, row, max, sum);
        let _ = targets;
    }
}

impl candle_core::CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cross_entropy: not contiguous".into()))?;
        let candle_core::CpuStorage::F32(data) = s else {
            candle_core::bail!("cross_entropy: expects f32")
        };
        let data = &data[start..end];
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(64).enumerate().for_each(|(c, o)| {
            let r0 = c * 64;
            let rows = &data[r0 * v..(r0 + o.len()) * v];
            ce_rows(rows, v, &self.targets, |i, row, max, sum| {
                o[i] = max + sum.ln() - row[self.targets[r0 + i] as usize];
            });
        });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(n),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, v) = arg.dims2()?;
        let x: Vec<f32> = arg
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.to_vec1()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v * 64).enumerate().for_each(|(c, o)| {
            let r0 = c * 64;
            let rows = o.len() / v;
            ce_rows(
                &x[r0 * v..(r0 + rows) * v],
                v,
                &self.targets,
                |i, row, max, sum| {
                    let gi = g[r0 + i];
                    let dst = &mut o[i * v..(i + 1) * v];
                    let scale = gi / sum;
                    for (d, &xv) in dst.iter_mut().zip(row) {
                        *d = (xv - max).exp() * scale;
                    }
                    dst[self.targets[r0 + i] as usize] -= gi;
                },
            );
        });
        Ok(Some(
            Tensor::from_vec(out, (n, v), arg.device())?.to_dtype(arg.dtype())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_grad, data};
    use super::*;
    use candle_core::{Device, Var};
    use fedllm_testing::max_abs_diff;
    /// Against central finite differences, ignored labels included.
    #[test]
    fn grad_causal_lm_loss() {
        let labels = Tensor::new(&[[-100i64, 2, 4], [1, -100, 0]], &Device::Cpu).unwrap();
        check_grad(&data(30), &[2, 3, 5], |x| Ok(causal_lm_loss(x, &labels)?.0));
    }

    /// The fused cross-entropy op equals the composite loss, value and gradient.
    #[test]
    fn fused_cross_entropy_matches_composite() {
        let dev = Device::Cpu;
        let (n, v) = (70, 33);
        let x = Var::from_tensor(&fedllm_testing::randn(207, 0f32, 3.0, (n, v), &dev).unwrap())
            .unwrap();
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        let fused = cross_entropy(x.as_tensor(), &targets).unwrap();
        let idx = Tensor::from_vec(targets.clone(), (n, 1), &dev).unwrap();
        let comp = (log_softmax_last(x.as_tensor())
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / n as f64)
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            comp.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let g1 = fused
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let g2 = comp.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let d = max_abs_diff(&g1, &g2).unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn loss_matches_hand_computation() {
        let dev = Device::Cpu;
        let logits =
            Tensor::from_vec(vec![0f32, 1., 2., 3., 1., 0., 0., 0., 5.], (1, 3, 3), &dev).unwrap();
        let labels = Tensor::new(&[[-100i64, 2, -100]], &dev).unwrap();
        let (loss, n) = causal_lm_loss(&logits, &labels).unwrap();
        assert_eq!(n, 1);
        let lse = (0f64.exp() + 1f64.exp() + 2f64.exp()).ln();
        let want = lse - 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }
}
