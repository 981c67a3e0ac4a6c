//! candle ops over `fedllm_kernels::fused`: RMSNorm, SwiGLU and RoPE as single ops with written
//! backwards (CPU, f32). `ops` routes to them and keeps the composites for other devices and
//! dtypes; each is tested against its composite, value and gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use fedllm_kernels::fused as k;

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let (a, z) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..z]),
        _ => candle_core::bail!("{what}: expects f32"),
    }
}

/// Runs `f` over a tensor's f32 values (made contiguous first).
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(f(slice(s, l, what)?)),
        _ => candle_core::bail!("{what}: not on the CPU"),
    }
}

fn out(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

pub(crate) struct RmsNorm {
    pub eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, "rms_norm")?, slice(s2, l2, "rms_norm")?);
        // SAFETY: `rms_norm_fwd` writes every value.
        let mut y = unsafe { fedllm_kernels::uninit(x.len()) };
        k::rms_norm_fwd(x, w, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut dx = vec![0f32; x.elem_count()];
        let dw = with_f32(x, "rms_norm", |xs| {
            with_f32(w, "rms_norm", |ws| {
                with_f32(g, "rms_norm", |gs| {
                    k::rms_norm_bwd(xs, ws, gs, self.eps, &mut dx)
                })
            })
        })???;
        Ok((Some(out(dx, x)?), Some(out(dw, w)?)))
    }
}

pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, "swiglu")?, slice(s2, l2, "swiglu")?);
        let mut y = vec![0f32; g.len()];
        k::swiglu_fwd(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_f32(gate, "swiglu", |g| {
            with_f32(up, "swiglu", |u| {
                with_f32(dy, "swiglu", |d| k::swiglu_bwd(g, u, d, &mut dg, &mut du))
            })
        })???;
        Ok((Some(out(dg, gate)?), Some(out(du, up)?)))
    }
}

/// cos/sin as host rows [B, T, D]; x is [B, H, T, D].
pub(crate) struct Rope {
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub dims: (usize, usize, usize, usize),
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "rope")?;
        let mut y = vec![0f32; x.len()];
        k::rope(x, &self.cos, &self.sin, self.dims, false, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(g, "rope", |gs| {
            k::rope(gs, &self.cos, &self.sin, self.dims, true, &mut dx)
        })?;
        Ok(Some(out(dx, x)?))
    }
}

/// Causal self-attention on the projections' layout (see `fedllm_kernels::attention`):
/// inputs q [B, T, H·D], k/v [B, T, KV·D]; RoPE applied inside.
pub(crate) struct TrainAttention {
    pub shape: fedllm_kernels::attention::Shape,
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    /// [B, T, T] additive (causal and padding), None = nothing masked.
    pub bias: Option<Arc<Vec<f32>>>,
    pub scale: f32,
    /// Per-row softmax (max, 1/sum) [B, H, T, 2], written by the forward for the backward.
    pub lse: std::sync::Mutex<Vec<f32>>,
}

impl candle_core::CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            slice(s1, l1, "attention")?,
            slice(s2, l2, "attention")?,
            slice(s3, l3, "attention")?,
        );
        let sh = self.shape;
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; 2 * sh.b * sh.h * sh.t];
        fedllm_kernels::attention::forward(
            sh,
            q,
            k,
            v,
            &self.cos,
            &self.sin,
            self.bias.as_deref().map(|b| b.as_slice()),
            self.scale,
            &mut out,
            &mut lse,
        );
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.elem_count()],
            vec![0f32; k.elem_count()],
            vec![0f32; v.elem_count()],
        );
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        with_f32(q, "attention", |qs| {
            with_f32(k, "attention", |ks| {
                with_f32(v, "attention", |vs| {
                    with_f32(o, "attention", |os| {
                        with_f32(g, "attention", |gs| {
                            fedllm_kernels::attention::backward(
                                self.shape,
                                (qs, ks, vs),
                                &self.cos,
                                &self.sin,
                                self.bias.as_deref().map(|b| b.as_slice()),
                                self.scale,
                                os,
                                &lse,
                                gs,
                                (&mut dq, &mut dk, &mut dv),
                            )
                        })
                    })
                })
            })
        })?????;
        Ok((Some(out(dq, q)?), Some(out(dk, k)?), Some(out(dv, v)?)))
    }
}
