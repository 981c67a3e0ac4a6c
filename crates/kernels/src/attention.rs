//! Causal self-attention for training on the projections' own layout: q [B, T, H, D], k and v
//! [B, T, KV, D] (grouped-query heads read in place), RoPE applied inside, output [B, T, H, D].
//! Nothing is transposed, repeated or kept but each row's softmax max and 1/sum [B, H, T, 2] (not
//! a log-sum-exp: rows masked whole sit at −1e30, where max + ln(sum) loses the sum); the backward
//! recomputes the probabilities (flash-attention's trade). Products run on `gemm` with strides,
//! one (batch, head) or (batch, KV group) per task.

use crate::strided::mm;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

/// Rows of `heads` vectors of D per (b, t), with cos/sin [B, T, D] (rotate-half form);
/// `inverse` applies the transpose (rotation by −θ).
pub fn rope_bthd(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, d: usize, inverse: bool) {
    let half = d / 2;
    x.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(bt, row)| {
            let (c, s) = (&cos[bt * d..(bt + 1) * d], &sin[bt * d..(bt + 1) * d]);
            for v in row.chunks_exact_mut(d) {
                for i in 0..half {
                    let (x1, x2) = (v[i], v[i + half]);
                    if inverse {
                        v[i] = x1 * c[i] + x2 * s[i + half];
                        v[i + half] = x2 * c[i + half] - x1 * s[i];
                    } else {
                        v[i] = x1 * c[i] - x2 * s[i];
                        v[i + half] = x2 * c[i + half] + x1 * s[i + half];
                    }
                }
            }
        });
}

struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// scale · Q_bh · K_bgᵀ + bias_b into `s` [T, T].
#[allow(clippy::too_many_arguments)]
unsafe fn scores(
    sh: Shape,
    qr: &[f32],
    kr: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    bi: usize,
    hi: usize,
    s: &mut [f32],
) {
    let Shape { t, h, kv, d, .. } = sh;
    let g = hi / (h / kv);
    let q = qr.as_ptr().add(bi * t * h * d + hi * d);
    let k = kr.as_ptr().add(bi * t * kv * d + g * d);
    mm(
        (t, t, d),
        s.as_mut_ptr(),
        (t, 1),
        false,
        q,
        (h * d, 1),
        k,
        (1, kv * d),
        scale,
    );
    if let Some(bias) = bias {
        for (x, &b) in s.iter_mut().zip(&bias[bi * t * t..(bi + 1) * t * t]) {
            *x += b;
        }
    }
}

/// out [B, T, H, D] and the row statistics `stats` [B, H, T, 2] (max, 1/sum) from q, k, v
/// (pre-rotation) — see the module doc.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    sh: Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cos: &[f32],
    sin: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
    stats: &mut [f32],
) {
    let Shape { b, t, h, kv, d } = sh;
    let (mut qr, mut kr) = (q.to_vec(), k.to_vec());
    rope_bthd(&mut qr, cos, sin, h, d, false);
    rope_bthd(&mut kr, cos, sin, kv, d, false);
    let op = Ptr(out.as_mut_ptr());
    let op = &op;
    stats.par_chunks_mut(2 * t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |s, (bh, st)| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / (h / kv);
            unsafe { scores(sh, &qr, &kr, bias, scale, bi, hi, s) };
            for (row, l) in s.chunks_exact_mut(t).zip(st.chunks_exact_mut(2)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let inv = 1.0 / crate::vexp::sum_exp(row, max);
                crate::vexp::exp_sub(row, max, inv);
                l[0] = max;
                l[1] = inv;
            }
            // SAFETY: each task writes only head hi of batch bi in `out`.
            unsafe {
                let o = op.0.add(bi * t * h * d + hi * d);
                let vp = v.as_ptr().add(bi * t * kv * d + g * d);
                mm(
                    (t, d, t),
                    o,
                    (h * d, 1),
                    false,
                    s.as_ptr(),
                    (t, 1),
                    vp,
                    (kv * d, 1),
                    1.0,
                );
            }
        },
    );
    debug_assert_eq!(stats.len(), 2 * b * h * t);
}

/// (dq, dk, dv) given the forward's inputs, output `o`, row `stats` and dL/dout.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    sh: Shape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    cos: &[f32],
    sin: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    o: &[f32],
    stats: &[f32],
    dout: &[f32],
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Shape { b, t, h, kv, d } = sh;
    let n_rep = h / kv;
    let (mut qr, mut kr) = (q.to_vec(), k.to_vec());
    rope_bthd(&mut qr, cos, sin, h, d, false);
    rope_bthd(&mut kr, cos, sin, kv, d, false);
    dk.fill(0.0);
    dv.fill(0.0);
    let (pq, pk, pv) = (
        Ptr(dq.as_mut_ptr()),
        Ptr(dk.as_mut_ptr()),
        Ptr(dv.as_mut_ptr()),
    );
    let (pq, pk, pv) = (&pq, &pk, &pv);
    (0..b * kv).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t]),
        |(p, dp, di), bg| {
            let (bi, g) = (bg / kv, bg % kv);
            for hi in g * n_rep..(g + 1) * n_rep {
                // SAFETY: this task owns group g of batch bi in dk/dv and its heads in dq.
                unsafe {
                    scores(sh, &qr, &kr, bias, scale, bi, hi, p);
                    let st = &stats[2 * (bi * h + hi) * t..2 * (bi * h + hi + 1) * t];
                    for (row, l) in p.chunks_exact_mut(t).zip(st.chunks_exact(2)) {
                        crate::vexp::exp_sub(row, l[0], l[1]);
                    }
                    let at_h = bi * t * h * d + hi * d;
                    let at_g = bi * t * kv * d + g * d;
                    let go = dout.as_ptr().add(at_h);
                    // dV_g += Pᵀ · dO_h
                    mm(
                        (t, d, t),
                        pv.0.add(at_g),
                        (kv * d, 1),
                        true,
                        p.as_ptr(),
                        (1, t),
                        go,
                        (h * d, 1),
                        1.0,
                    );
                    // dP = dO_h · V_gᵀ
                    mm(
                        (t, t, d),
                        dp.as_mut_ptr(),
                        (t, 1),
                        false,
                        go,
                        (h * d, 1),
                        v.as_ptr().add(at_g),
                        (1, kv * d),
                        1.0,
                    );
                    for (i, x) in di.iter_mut().enumerate() {
                        let r = at_h + i * h * d;
                        *x = (0..d).map(|j| dout[r + j] * o[r + j]).sum();
                    }
                    for ((ds, &pp), i) in dp.iter_mut().zip(p.iter()).zip((0..t * t).map(|x| x / t))
                    {
                        *ds = pp * (*ds - di[i]) * scale;
                    }
                    // dQr_h = dS · K_g ; dKr_g += dSᵀ · Qr_h
                    mm(
                        (t, d, t),
                        pq.0.add(at_h),
                        (h * d, 1),
                        false,
                        dp.as_ptr(),
                        (t, 1),
                        kr.as_ptr().add(at_g),
                        (kv * d, 1),
                        1.0,
                    );
                    mm(
                        (t, d, t),
                        pk.0.add(at_g),
                        (kv * d, 1),
                        true,
                        dp.as_ptr(),
                        (1, t),
                        qr.as_ptr().add(at_h),
                        (h * d, 1),
                        1.0,
                    );
                }
            }
        },
    );
    rope_bthd(dq, cos, sin, h, d, true);
    rope_bthd(dk, cos, sin, kv, d, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1999) as f32 / 1999.0 - 0.5) * 2.0)
            .collect()
    }

    /// The backward against central differences of the forward (f32, so loose but telling).
    #[test]
    fn backward_matches_finite_differences() {
        let sh = Shape {
            b: 2,
            t: 5,
            h: 4,
            kv: 2,
            d: 4,
        };
        let (nq, nk) = (sh.b * sh.t * sh.h * sh.d, sh.b * sh.t * sh.kv * sh.d);
        let (q, k, v) = (data(nq, 1), data(nk, 2), data(nk, 3));
        let cos = data(sh.b * sh.t * sh.d, 4);
        let sin = data(sh.b * sh.t * sh.d, 5);
        let mut bias = vec![0f32; sh.b * sh.t * sh.t];
        for bi in 0..sh.b {
            for i in 0..sh.t {
                for j in 0..sh.t {
                    // Causal; batch 1 left-padded by 1. (A row masked whole has an analytic
                    // gradient f32 differences cannot see: −1e30 swallows the scores.)
                    if j > i || (bi == 1 && j < 1 && i > 0) {
                        bias[(bi * sh.t + i) * sh.t + j] = -1e30;
                    }
                }
            }
        }
        let coef = data(nq, 6);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let mut out = vec![0f32; nq];
            let mut st = vec![0f32; 2 * sh.b * sh.h * sh.t];
            forward(sh, q, k, v, &cos, &sin, Some(&bias), 0.4, &mut out, &mut st);
            out.iter().zip(&coef).map(|(a, b)| (a * b) as f64).sum()
        };
        let mut out = vec![0f32; nq];
        let mut st = vec![0f32; 2 * sh.b * sh.h * sh.t];
        forward(
            sh,
            &q,
            &k,
            &v,
            &cos,
            &sin,
            Some(&bias),
            0.4,
            &mut out,
            &mut st,
        );
        let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        backward(
            sh,
            (&q, &k, &v),
            &cos,
            &sin,
            Some(&bias),
            0.4,
            &out,
            &st,
            &coef,
            (&mut dq, &mut dk, &mut dv),
        );
        let h = 1e-2f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in (0..grad.len()).step_by(7) {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which][i] += h;
                let fp = loss(&args[0], &args[1], &args[2]);
                args[which][i] -= 2.0 * h;
                let fm = loss(&args[0], &args[1], &args[2]);
                let fd = (fp - fm) / (2.0 * h as f64);
                assert!(
                    (fd - grad[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                    "arg {which}[{i}]: fd {fd} vs {}",
                    grad[i]
                );
            }
        }
    }
}
