//! Softmax and log-softmax over the last dimension, in f32.

use candle_core::{Result, Tensor, D};

use super::wide;

/// Softmax over the last dimension in f32. The max is detached: softmax is shift-invariant, so
/// its gradient is unchanged and we avoid a backward through `max`.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)?.to_dtype(dtype)
}

/// log-softmax over the last dimension in f32.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = wide(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_grad, data, weighted};
    use super::*;
    /// Both against central finite differences.
    #[test]
    fn grad_softmax() {
        check_grad(&data(10), &[2, 5], |x| weighted(&softmax_last(x)?));
        check_grad(&data(10), &[2, 5], |x| weighted(&log_softmax_last(x)?));
    }
}
