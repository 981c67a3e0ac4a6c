//! Activations: SiLU, LLaMA's SwiGLU gate (fused on the CPU in f32) and GPT-2's `gelu_new`.

use candle_core::{Result, Tensor};

use super::fused_f32;

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// silu(gate) · up, LLaMA's MLP gate.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    crate::profile::span(crate::profile::Phase::NormRope, || {
        if fused_f32(&[gate, up]) && gate.shape() == up.shape() {
            return gate
                .contiguous()?
                .apply_op2(&up.contiguous()?, crate::ops::fused::SwiGlu);
        }
        silu(gate)? * up
    })
}

/// GPT-2's `gelu_new` (tanh approximation); candle's `gelu` is exactly that form.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

#[cfg(test)]
mod tests {
    use super::super::check::{check_grad, data, var, weighted};
    use super::*;
    /// Against central finite differences.
    #[test]
    fn grad_activations() {
        check_grad(&data(10), &[2, 5], |x| weighted(&silu(x)?));
        check_grad(&data(10), &[2, 5], |x| weighted(&gelu_new(x)?));
    }

    /// The fused SwiGLU equals silu(gate)·up, value and gradients (rows of 5001: a tail past
    /// every vector width).
    #[test]
    fn fused_swiglu_matches_composite() {
        let (g, u) = (var(206, &[3, 5001], 3.0), var(207, &[3, 5001], 1.0));
        fedllm_testing::assert_same_op(
            &swiglu(g.as_tensor(), u.as_tensor()).unwrap(),
            &(silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap(),
            &[&g, &u],
            (1e-5, 1e-4),
            "swiglu",
        );
    }
}
