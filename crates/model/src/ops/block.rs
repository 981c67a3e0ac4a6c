//! A LLaMA decoder layer's two halves as two candle ops each (training and scoring on the CPU):
//! `x + o(attention(q(h), k(h), v(h)))` and `x + down(silu(gate(h)) · up(h))`, h = RMSNorm(x).
//!
//! Why: candle's backward sums every gradient contribution into a fresh zero tensor (one
//! `zeros_like` and one add per edge of the graph). A layer built from per-projection ops has
//! 14 such edges of up to [tokens, intermediate] floats; as two ops it has 2, and the products
//! that share an input write their input gradients into one buffer. The adapters' tensors enter
//! as one concatenated vector, so the op sees every trainable value of its half-layer.
//!
//! The forward keeps what the backward needs (projections before RoPE, attention output and
//! softmax statistics, MLP pre-activations) inside the op; h is recomputed from x.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use fedllm_kernels::attention as attn;
use fedllm_kernels::fused as k;
use fedllm_kernels::strided::sgemm;
use fedllm_kernels::Isa;

use crate::cache::Ctx;
use crate::ops::linear::{frozen_product, Linear};
use crate::weights::Weight;

/// A LoRA branch's place in the concatenated adapter vector: A [r, in] at `off`, B [out, r]
/// right after it.
#[derive(Clone, Copy, Debug)]
struct Slot {
    off: usize,
    r: usize,
    scale: f32,
}

/// One frozen projection of a half-layer, with its optional (frozen) bias and LoRA branch.
struct Proj {
    weight: Weight,
    bias: Option<Vec<f32>>,
    lora: Option<Slot>,
    /// (out, in).
    n: usize,
    k: usize,
}

impl Proj {
    /// y (+)= x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ, x [m, in], y [m, out].
    fn forward(
        &self,
        x: &[f32],
        m: usize,
        pack: &[f32],
        y: &mut [f32],
        acc: bool,
        isa: Isa,
    ) -> Result<()> {
        frozen_product(&self.weight, false, true, x, m, y, acc, isa)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.n) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
        if let Some(s) = self.lora {
            let (a, b) = self.ab(s, pack);
            let mut xa = vec![0f32; m * s.r];
            sgemm((m, s.r, self.k), x, false, a, true, &mut xa, false, 1.0);
            sgemm((m, self.n, s.r), &xa, false, b, true, y, true, s.scale);
        }
        Ok(())
    }

    /// Given g = dL/dy [m, out]: dx (+)= g·W + s·(g·B)·A when `dx` is wanted, and this branch's
    /// dA, dB into `dpack`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        g: &[f32],
        m: usize,
        pack: &[f32],
        dpack: &mut [f32],
        dx: Option<(&mut [f32], bool)>,
        isa: Isa,
    ) -> Result<()> {
        let gb = self.lora.map(|s| {
            let (a, b) = self.ab(s, pack);
            let (r, n, kk) = (s.r, self.n, self.k);
            let mut gb = vec![0f32; m * r];
            sgemm((m, r, n), g, false, b, false, &mut gb, false, 1.0);
            let mut xa = vec![0f32; m * r];
            sgemm((m, r, kk), x, false, a, true, &mut xa, false, 1.0);
            let (da, db) = dpack[s.off..s.off + r * kk + n * r].split_at_mut(r * kk);
            sgemm((r, kk, m), &gb, true, x, false, da, false, s.scale);
            sgemm((n, r, m), g, true, &xa, false, db, false, s.scale);
            gb
        });
        if let Some((dx, acc)) = dx {
            frozen_product(&self.weight, false, false, g, m, dx, acc, isa)?;
            if let (Some(s), Some(gb)) = (self.lora, gb) {
                let (a, _) = self.ab(s, pack);
                sgemm((m, self.k, s.r), &gb, false, a, false, dx, true, s.scale);
            }
        }
        Ok(())
    }

    fn ab<'a>(&self, s: Slot, pack: &'a [f32]) -> (&'a [f32], &'a [f32]) {
        let a = &pack[s.off..s.off + s.r * self.k];
        let b = &pack[s.off + s.r * self.k..s.off + s.r * self.k + self.n * s.r];
        (a, b)
    }
}

/// The projections of one half-layer and their adapters' tensors, concatenated in order (A
/// then B of each adapted projection), or None when some projection has no kernel path here
/// (dropout, a trainable weight or bias, another device or dtype).
fn projections(lins: &[&Linear], x: &Tensor) -> Result<Option<(Vec<Proj>, Tensor, Isa)>> {
    let mut isa = None;
    let mut parts = Vec::new();
    let mut projs = Vec::new();
    let mut off = 0;
    for lin in lins {
        let Some(i) = lin.kernel_isa(x) else {
            return Ok(None);
        };
        if lin.is_in_out() || lin.bias().is_some_and(|b| b.track_op()) {
            return Ok(None);
        }
        isa = Some(isa.map_or(i, |j: Isa| j.min(i)));
        let (n, kk) = lin.out_in();
        let lora = match &lin.lora {
            None => None,
            Some(l) => {
                let no_dropout = l.dropout.as_ref().is_none_or(|(p, _)| *p <= 0.0);
                if !no_dropout || l.a.dtype() != DType::F32 || l.b.dtype() != DType::F32 {
                    return Ok(None);
                }
                let r = l.a.dim(0)?;
                if l.a.dims() != [r, kk] || l.b.dims() != [n, r] {
                    return Ok(None);
                }
                parts.push(l.a.flatten_all()?);
                parts.push(l.b.flatten_all()?);
                let s = Slot {
                    off,
                    r,
                    scale: l.scale as f32,
                };
                off += r * kk + n * r;
                Some(s)
            }
        };
        let bias = match lin.bias() {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        projs.push(Proj {
            weight: lin.weight().clone(),
            bias,
            lora,
            n,
            k: kk,
        });
    }
    let pack = if parts.is_empty() {
        // Nothing trainable: a constant stands in for the adapter vector.
        Tensor::zeros(1, DType::F32, x.device())?
    } else {
        Tensor::cat(&parts, 0)?
    };
    Ok(isa.map(|i| (projs, pack, i)))
}

/// Whether `x` and the norm weight suit the fused halves (f32 on the CPU, frozen norm).
fn takes(x: &Tensor, norm: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && norm.dtype() == DType::F32
        && !norm.track_op()
        && x.rank() == 3
}

/// `x + o(attention(q(h), k(h), v(h)))`, h = RMSNorm(x), as one op; None when the layer has no
/// fused path (the caller then composes it from single ops).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_half(
    x: &Tensor,
    norm: &Tensor,
    eps: f64,
    qkvo: [&Linear; 4],
    (h, kv, d): (usize, usize, usize),
    scale: f64,
    ctx: &Ctx,
) -> Result<Option<Tensor>> {
    if !takes(x, norm) || h % kv != 0 || d % 2 != 0 {
        return Ok(None);
    }
    let Some(host) = ctx.host()? else {
        return Ok(None);
    };
    let Some((projs, pack, isa)) = projections(&qkvo, x)? else {
        return Ok(None);
    };
    let (b, t, hid) = x.dims3()?;
    if projs[0].n != h * d || projs[1].n != kv * d || projs[3].k != h * d || projs[3].n != hid {
        return Ok(None);
    }
    let op = AttnHalf {
        norm: norm.to_vec1()?,
        eps: eps as f32,
        projs,
        shape: attn::Shape { b, t, h, kv, d },
        cos: host.cos.clone(),
        sin: host.sin.clone(),
        bias: host.bias.clone(),
        scale: scale as f32,
        isa,
        want_grad: x.track_op() || pack.track_op(),
        saved: Mutex::new(None),
    };
    let x2 = x.reshape((b * t, hid))?.contiguous()?;
    Ok(Some(x2.apply_op2(&pack, op)?.reshape((b, t, hid))?))
}

/// `x + down(silu(gate(h)) · up(h))`, h = RMSNorm(x), as one op; None as `attention_half`.
pub(crate) fn mlp_half(
    x: &Tensor,
    norm: &Tensor,
    eps: f64,
    gud: [&Linear; 3],
) -> Result<Option<Tensor>> {
    if !takes(x, norm) {
        return Ok(None);
    }
    let Some((projs, pack, isa)) = projections(&gud, x)? else {
        return Ok(None);
    };
    let (b, t, hid) = x.dims3()?;
    if projs[0].n != projs[1].n || projs[2].k != projs[0].n || projs[2].n != hid {
        return Ok(None);
    }
    let op = MlpHalf {
        norm: norm.to_vec1()?,
        eps: eps as f32,
        projs,
        isa,
        want_grad: x.track_op() || pack.track_op(),
        saved: Mutex::new(None),
    };
    let x2 = x.reshape((b * t, hid))?.contiguous()?;
    Ok(Some(x2.apply_op2(&pack, op)?.reshape((b, t, hid))?))
}

struct AttnHalf {
    norm: Vec<f32>,
    eps: f32,
    /// q, k, v, o.
    projs: Vec<Proj>,
    shape: attn::Shape,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
    scale: f32,
    isa: Isa,
    want_grad: bool,
    /// q, k, v (before RoPE), attention output, softmax statistics.
    saved: Mutex<Option<[Vec<f32>; 5]>>,
}

struct MlpHalf {
    norm: Vec<f32>,
    eps: f32,
    /// gate, up, down.
    projs: Vec<Proj>,
    isa: Isa,
    want_grad: bool,
    /// gate and up pre-activations.
    saved: Mutex<Option<[Vec<f32>; 2]>>,
}

fn host<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    crate::ops::fused::slice(s, l, what)
}

/// Runs `f` over the f32 values of contiguous CPU tensors.
fn with_host<R>(ts: [&Tensor; 3], what: &str, f: impl FnOnce([&[f32]; 3]) -> R) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut sl: Vec<&[f32]> = Vec::with_capacity(3);
    for (st, l) in &guards {
        match &**st {
            Storage::Cpu(s) => sl.push(host(s, l, what)?),
            _ => candle_core::bail!("{what}: not on the CPU"),
        }
    }
    Ok(f([sl[0], sl[1], sl[2]]))
}

/// A buffer for the kernel call it is handed to next, which writes every element before
/// anything reads it (every use in this file): no zeroing pass over activation-sized memory.
fn written_later(n: usize) -> Vec<f32> {
    // SAFETY: per the contract above, no element is read before the kernel writes it.
    unsafe { fedllm_kernels::uninit(n) }
}

/// What a forward keeps for its backward.
fn keep<T>(m: &Mutex<Option<T>>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
}

fn taken<T>(m: &Mutex<Option<T>>, what: &str) -> Result<T> {
    m.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{what}: backward ran twice or without a tracked forward"
            ))
        })
}

/// A half-layer's input side: x, h = RMSNorm(x) and the projections reading h.
struct Input<'a> {
    norm: &'a [f32],
    eps: f32,
    isa: Isa,
    xs: &'a [f32],
    pack: &'a [f32],
    want_dx: bool,
}

impl Input<'_> {
    fn rows(&self) -> usize {
        self.xs.len() / self.norm.len()
    }

    /// dL/dx of `x + f(h)` (None when x tracks no gradient), given dL/dout `g` and the
    /// gradients `dys` of the projections `projs` reading h; their adapters' gradients go to
    /// `dpack` on the way. h is recomputed from x.
    fn backward<const N: usize>(
        &self,
        projs: &[Proj],
        dys: [&[f32]; N],
        g: &[f32],
        dpack: &mut [f32],
    ) -> Result<Option<Vec<f32>>> {
        let m = self.rows();
        let mut h = written_later(self.xs.len());
        k::rms_norm_fwd(self.xs, self.norm, self.eps, &mut h);
        let mut dh = self.want_dx.then(|| written_later(self.xs.len()));
        for (i, (p, dy)) in projs.iter().zip(dys).enumerate() {
            let dx = dh.as_deref_mut().map(|d| (d, i > 0));
            p.backward(&h, dy, m, self.pack, dpack, dx, self.isa)?;
        }
        Ok(dh.map(|dh| norm_backward(self.xs, self.norm, self.eps, &dh, g)))
    }
}

/// The frame both backwards share: host views of x, the adapters and dL/dout, the adapters'
/// gradient vector, and the gradients as tensors (dx where x tracks, the adapters' where they
/// do). `body(input, g, dpack)` returns dL/dx.
fn half_backward(
    norm: &[f32],
    eps: f32,
    isa: Isa,
    [x, pack, g]: [&Tensor; 3],
    what: &str,
    body: impl FnOnce(&Input, &[f32], &mut [f32]) -> Result<Option<Vec<f32>>>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let mut dpack = vec![0f32; pack.elem_count()];
    let dx = with_host([x, pack, g], what, |[xs, ps, gs]| {
        let input = Input {
            norm,
            eps,
            isa,
            xs,
            pack: ps,
            want_dx: x.track_op(),
        };
        body(&input, gs, &mut dpack)
    })??;
    let dx = dx
        .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
        .transpose()?;
    let dp = pack
        .track_op()
        .then(|| Tensor::from_vec(dpack, pack.shape(), pack.device()))
        .transpose()?;
    Ok((dx, dp))
}

/// dx = g + RMSNorm'(x)ᵀ·dh.
fn norm_backward(x: &[f32], w: &[f32], eps: f32, dh: &[f32], g: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut dx = written_later(x.len());
    k::rms_norm_bwd(x, w, dh, eps, &mut dx);
    dx.par_chunks_mut(4096)
        .zip(g.par_chunks(4096))
        .for_each(|(d, g)| d.iter_mut().zip(g).for_each(|(d, g)| *d += g));
    dx
}

impl CustomOp2 for AttnHalf {
    fn name(&self) -> &'static str {
        "attention-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, pack) = (host(s1, l1, "attention")?, host(s2, l2, "attention")?);
        let (m, isa, p) = (l1.dims()[0], self.isa, &self.projs);
        let mut h = written_later(x.len());
        k::rms_norm_fwd(x, &self.norm, self.eps, &mut h);
        let mut qkv: [Vec<f32>; 3] = std::array::from_fn(|i| written_later(m * p[i].n));
        for (pi, y) in p.iter().zip(qkv.iter_mut()) {
            pi.forward(&h, m, pack, y, false, isa)?;
        }
        drop(h);
        let [q, kk, v] = qkv;
        let sh = self.shape;
        let mut y = written_later(q.len());
        let mut stats = written_later(2 * sh.b * sh.h * sh.t);
        let bias = self.bias.as_deref().map(|b| b.as_slice());
        attn::forward(
            sh, &q, &kk, &v, &self.cos, &self.sin, bias, self.scale, &mut y, &mut stats,
        );
        let mut out = x.to_vec();
        p[3].forward(&y, m, pack, &mut out, true, isa)?;
        if self.want_grad {
            keep(&self.saved, [q, kk, v, y, stats]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [q, kk, v, y, stats] = taken(&self.saved, "attention half")?;
        let (isa, p, sh) = (self.isa, &self.projs, self.shape);
        let what = "attention half";
        half_backward(
            &self.norm,
            self.eps,
            isa,
            [x, pack, g],
            what,
            |input, gs, dpack| {
                let (m, ps) = (input.rows(), input.pack);
                let mut dy = written_later(y.len());
                p[3].backward(&y, gs, m, ps, dpack, Some((&mut dy, false)), isa)?;
                let (mut dq, mut dk, mut dv) = (
                    written_later(q.len()),
                    written_later(kk.len()),
                    written_later(v.len()),
                );
                let bias = self.bias.as_deref().map(|b| b.as_slice());
                attn::backward(
                    sh,
                    (&q, &kk, &v),
                    &self.cos,
                    &self.sin,
                    bias,
                    self.scale,
                    &y,
                    &stats,
                    &dy,
                    (&mut dq, &mut dk, &mut dv),
                );
                drop((y, dy));
                input.backward(&p[..3], [&dq[..], &dk, &dv], gs, dpack)
            },
        )
    }
}

impl CustomOp2 for MlpHalf {
    fn name(&self) -> &'static str {
        "mlp-half"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, pack) = (host(s1, l1, "mlp")?, host(s2, l2, "mlp")?);
        let (m, isa, p) = (l1.dims()[0], self.isa, &self.projs);
        let mut h = written_later(x.len());
        k::rms_norm_fwd(x, &self.norm, self.eps, &mut h);
        let inter = p[0].n;
        let (mut gt, mut up) = (written_later(m * inter), written_later(m * inter));
        p[0].forward(&h, m, pack, &mut gt, false, isa)?;
        p[1].forward(&h, m, pack, &mut up, false, isa)?;
        drop(h);
        let mut a = written_later(m * inter);
        k::swiglu_fwd(&gt, &up, &mut a);
        let mut out = x.to_vec();
        p[2].forward(&a, m, pack, &mut out, true, isa)?;
        if self.want_grad {
            keep(&self.saved, [gt, up]);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gt, up] = taken(&self.saved, "mlp half")?;
        let (isa, p) = (self.isa, &self.projs);
        half_backward(
            &self.norm,
            self.eps,
            isa,
            [x, pack, g],
            "mlp half",
            |input, gs, dpack| {
                let (m, ps) = (input.rows(), input.pack);
                // The down projection's input is needed only for its own adapter's gradients.
                let a = if p[2].lora.is_some() {
                    let mut a = written_later(gt.len());
                    k::swiglu_fwd(&gt, &up, &mut a);
                    a
                } else {
                    Vec::new()
                };
                let mut da = written_later(gt.len());
                p[2].backward(&a, gs, m, ps, dpack, Some((&mut da, false)), isa)?;
                drop(a);
                let (mut dg, mut du) = (written_later(gt.len()), written_later(gt.len()));
                k::swiglu_bwd(&gt, &up, &da, &mut dg, &mut du);
                drop(da);
                input.backward(&p[..2], [&dg[..], &du], gs, dpack)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{build_ctx, CtxSpec};
    use crate::ops;
    use crate::ops::linear::{LoraHook, MatmulPrecision};
    use candle_core::{Device, Var};

    /// Deterministic values of spread `std`: the n-th call of a test (each test runs on its own
    /// thread) always draws the same ones, so a tolerance that passes once passes every run.
    fn randn(shape: &[usize], std: f32) -> Tensor {
        thread_local!(static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(1) });
        let seed = CALLS.with(|c| c.replace(c.get() + 1));
        let mut rng = fedllm_rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| std * 1.732 * (2.0 * rng.next_f64() as f32 - 1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A frozen linear [out, in] with an optional frozen bias and LoRA branch of rank 3.
    fn linear(out: usize, inp: usize, bias: bool, lora: bool, vars: &mut Vec<Var>) -> Linear {
        let b = bias.then(|| randn(&[out], 0.5));
        let mut l = Linear::new(Weight::Dense(randn(&[out, inp], 0.3)), b).unwrap();
        l.precision = MatmulPrecision::Kernel(Isa::Avx512);
        if lora {
            let a = Var::from_tensor(&randn(&[3, inp], 0.3)).unwrap();
            let bv = Var::from_tensor(&randn(&[out, 3], 0.3)).unwrap();
            l.lora = Some(LoraHook {
                a: a.as_tensor().clone(),
                b: bv.as_tensor().clone(),
                scale: 0.7,
                dropout: None,
            });
            vars.extend([a, bv]);
        }
        l
    }

    /// x·Wᵀ + bias + s·x·Aᵀ·Bᵀ in plain candle ops.
    fn plain(l: &Linear, x: &Tensor) -> Tensor {
        let Weight::Dense(w) = l.weight() else {
            unreachable!()
        };
        let mut y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        if let Some(b) = l.bias() {
            y = y.broadcast_add(b).unwrap();
        }
        if let Some(lo) = &l.lora {
            let d = x
                .broadcast_matmul(&lo.a.t().unwrap())
                .unwrap()
                .broadcast_matmul(&lo.b.t().unwrap())
                .unwrap();
            y = (y + (d * lo.scale).unwrap()).unwrap();
        }
        y
    }

    /// Both halves of a layer (biases, adapters on some projections, grouped heads, causal and
    /// padding masks, 70 rows: two attention row blocks) equal the layer composed from plain
    /// candle ops, value and gradients of x and every adapter tensor; and with an input that
    /// tracks no gradient (the first layer), the adapters' gradients still match.
    #[test]
    fn halves_match_plain_layer() {
        let dev = Device::Cpu;
        let (b, t, hid, h, kv, inter) = (2, 70, 16, 4, 2, 24);
        let d = hid / h;
        let mut vars = Vec::new();
        let q = linear(h * d, hid, true, true, &mut vars);
        let k = linear(kv * d, hid, true, false, &mut vars);
        let v = linear(kv * d, hid, true, true, &mut vars);
        let o = linear(hid, h * d, false, true, &mut vars);
        let gate = linear(inter, hid, false, true, &mut vars);
        let up = linear(inter, hid, false, false, &mut vars);
        let down = linear(hid, inter, false, true, &mut vars);
        let (n1, n2) = (randn(&[hid], 1.0), randn(&[hid], 1.0));
        let eps = 1e-5;
        let mask: Vec<Vec<u8>> = vec![vec![1; t], (0..t).map(|j| (j >= 2) as u8).collect()];
        let spec = CtxSpec {
            batch: b,
            t,
            past: 0,
            key_mask: Some(&mask),
            sliding_window: None,
        };
        let ctx = build_ctx(&spec, Some(&[1.0, 0.1]), DType::F32, &dev).unwrap();
        let scale = 0.5;
        let x0 = randn(&[b, t, hid], 1.0);
        for tracked in [true, false] {
            let xv = Var::from_tensor(&x0).unwrap();
            let x = if tracked {
                xv.as_tensor().clone()
            } else {
                x0.clone()
            };
            let a = attention_half(&x, &n1, eps, [&q, &k, &v, &o], (h, kv, d), scale, &ctx)
                .unwrap()
                .expect("the attention half takes this layer");
            let fused = mlp_half(&a, &n2, eps, [&gate, &up, &down])
                .unwrap()
                .expect("the mlp half takes this layer");

            let hn = ops::rms_norm_composite(&x, &n1, eps).unwrap();
            let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d)).unwrap().transpose(1, 2);
            let (cos, sin) = ctx.rope.as_ref().unwrap();
            let qh = ops::rope_composite(&heads(plain(&q, &hn), h).unwrap(), cos, sin).unwrap();
            let kh = ops::rope_composite(&heads(plain(&k, &hn), kv).unwrap(), cos, sin).unwrap();
            let kh = ops::repeat_kv(&kh, h / kv).unwrap().contiguous().unwrap();
            let vh = ops::repeat_kv(&heads(plain(&v, &hn), kv).unwrap(), h / kv)
                .unwrap()
                .contiguous()
                .unwrap();
            let y = ops::attention_composite(&qh, &kh, &vh, scale, ctx.bias.as_ref())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            let x2 = (&x + plain(&o, &y)).unwrap();
            let h2 = ops::rms_norm_composite(&x2, &n2, eps).unwrap();
            let act = (ops::silu(&plain(&gate, &h2)).unwrap() * plain(&up, &h2)).unwrap();
            let comp = (&x2 + plain(&down, &act)).unwrap();

            let mut all: Vec<&Var> = vars.iter().collect();
            if tracked {
                all.push(&xv);
            }
            fedllm_testing::assert_same_op(
                &fused,
                &comp,
                &all,
                (1e-4, 1e-4),
                &format!("layer halves, input tracked {tracked}"),
            );
        }
    }

    /// Dropout on an adapter, or a trainable weight, leaves the layer to the single ops.
    #[test]
    fn declines_what_it_cannot_fuse() {
        let mut vars = Vec::new();
        let x = randn(&[1, 3, 8], 1.0);
        let norm = randn(&[8], 1.0);
        let mut g = linear(12, 8, false, true, &mut vars);
        let u = linear(12, 8, false, false, &mut vars);
        let dn = linear(8, 12, false, false, &mut vars);
        assert!(mlp_half(&x, &norm, 1e-5, [&g, &u, &dn]).unwrap().is_some());
        let rng = Arc::new(Mutex::new(fedllm_rng::Rng::new(1)));
        g.lora.as_mut().unwrap().dropout = Some((0.1, rng));
        assert!(mlp_half(&x, &norm, 1e-5, [&g, &u, &dn]).unwrap().is_none());
        let w = Var::from_tensor(&randn(&[12, 8], 1.0)).unwrap();
        let trainable = Linear::new(Weight::Dense(w.as_tensor().clone()), None).unwrap();
        assert!(mlp_half(&x, &norm, 1e-5, [&trainable, &u, &dn])
            .unwrap()
            .is_none());
    }
}
