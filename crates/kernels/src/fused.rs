//! Row-wise training ops fused into one pass each (forward and backward), so a layer keeps
//! only its inputs alive instead of every intermediate of a composite. f32, all cores.

use rayon::prelude::*;

const ROWS_PER_TASK: usize = 16;

/// Below this many elements a row-wise op runs on the calling thread: handing a decode step's
/// few rows to rayon's pool costs more than the op (a cross-thread wake-up per call).
const PAR_MIN: usize = 16384;

/// y = x / sqrt(mean(x²) + eps) · w over rows of `h`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    let rows = |(y, x): (&mut [f32], &[f32])| {
        let mut r = [0f32; ROWS_PER_TASK];
        for (y, x) in y
            .chunks_mut(h * ROWS_PER_TASK)
            .zip(x.chunks(h * ROWS_PER_TASK))
        {
            rstd_rows(x, h, eps, &mut r);
            scale_rows(y, x, &r, w);
        }
    };
    if x.len() < PAR_MIN {
        return rows((y, x));
    }
    crate::halves::rows_mut(y, h, |r, y| {
        y.par_chunks_mut(h * ROWS_PER_TASK)
            .zip(x[r.start * h..r.end * h].par_chunks(h * ROWS_PER_TASK))
            .for_each(rows)
    });
}

crate::wide_fn! {
    /// y = x · r · w for each h-row of x (h = w.len()) with its r.
    fn scale_rows(y: &mut [f32], x: &[f32], r: &[f32], w: &[f32]) {
        let h = w.len();
        for ((y, x), &r) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(r) {
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        }
    }
}

crate::wide_fn! {
    /// y ·= a · b, element by element.
    fn times_product(y: &mut [f32], a: &[f32], b: &[f32]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y *= a * b;
        }
    }
}

fn rstd(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|&v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// [`rstd`] of each h-row of `x` into `r`, eight rows' sums side by side: each row's sum keeps
/// its order (so its bits), but eight chains hide the add latency one chain waits on (a
/// prompt's norms took ~5 ms of a 256-token prefill as single chains).
fn rstd_rows(x: &[f32], h: usize, eps: f32, r: &mut [f32]) {
    const G: usize = 8;
    let mut groups = x.chunks_exact(G * h);
    for (grp, r) in groups.by_ref().zip(r.chunks_exact_mut(G)) {
        let mut ss = [0f32; G];
        for i in 0..h {
            for (j, ss) in ss.iter_mut().enumerate() {
                let v = grp[j * h + i];
                *ss += v * v;
            }
        }
        for (r, ss) in r.iter_mut().zip(ss) {
            *r = 1.0 / (ss / h as f32 + eps).sqrt();
        }
    }
    let done = x.len() / (G * h) * G;
    for (row, r) in groups.remainder().chunks_exact(h).zip(&mut r[done..]) {
        *r = rstd(row, eps);
    }
}

/// dx and dw of `rms_norm_fwd` given dy. dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ_rows g·x̂.
pub fn rms_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32]) -> Vec<f32> {
    let h = w.len();
    dx.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .zip(g.par_chunks(h * ROWS_PER_TASK))
        .map(|((dx, x), g)| {
            let mut dw = vec![0f32; h];
            for ((dx, x), g) in dx
                .chunks_exact_mut(h)
                .zip(x.chunks_exact(h))
                .zip(g.chunks_exact(h))
            {
                let r = rstd(x, eps);
                let mut dot = 0f32;
                for i in 0..h {
                    let xh = x[i] * r;
                    dot += g[i] * w[i] * xh;
                    dw[i] += g[i] * xh;
                }
                let mean = dot / h as f32;
                for i in 0..h {
                    dx[i] = r * (g[i] * w[i] - x[i] * r * mean);
                }
            }
            dw
        })
        .reduce(
            || vec![0f32; h],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// y = silu(gate) · up.
pub fn swiglu_fwd(gate: &[f32], up: &[f32], y: &mut [f32]) {
    let part = |(y, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
        crate::vexp::sigmoid(g, y);
        times_product(y, g, u);
    };
    if gate.len() < PAR_MIN {
        return y
            .chunks_mut(4096)
            .zip(gate.chunks(4096).zip(up.chunks(4096)))
            .for_each(part);
    }
    y.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(part);
}

/// (d gate, d up) of `swiglu_fwd` given dy.
pub fn swiglu_bwd(gate: &[f32], up: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            gate.par_chunks(4096)
                .zip(up.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            let mut sig = [0f32; 4096];
            crate::vexp::sigmoid(g, &mut sig);
            for i in 0..g.len() {
                let s = sig[i];
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
}

/// One head vector rotated in place (rotate-half form) by cos/sin rows of its length;
/// `inverse` applies the transpose (rotation by −θ, the backward).
pub fn rotate(v: &mut [f32], c: &[f32], s: &[f32], inverse: bool) {
    let half = v.len() / 2;
    for i in 0..half {
        // forward: y1 = x1 c1 − x2 s1, y2 = x2 c2 + x1 s2;
        // transpose: y1 = x1 c1 + x2 s2, y2 = x2 c2 − x1 s1.
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

/// [`rope`] (forward) of heads stored [B, T, H, D] (the projections' layout) into y
/// [B, H, T, D]: each row copied where it goes and rotated there by [`rotate`] while it is in
/// L1, instead of a transposing copy of the whole tensor first.
pub fn rope_from_bthd(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    (b, h, t, d): (usize, usize, usize, usize),
    y: &mut [f32],
) {
    assert!(x.len() >= b * t * h * d && y.len() >= b * h * t * d && d.is_multiple_of(2));
    assert!(cos.len() >= b * t * d && sin.len() >= b * t * d);
    let row = |hi: usize, r: usize, y: *mut f32| {
        let (bi, ti) = (r / t, r % t);
        let at = r * d;
        // SAFETY: (head hi, row r) is one d-row of y [B, H, T, D], written by this call only.
        let dst = unsafe { std::slice::from_raw_parts_mut(y.add(((bi * h + hi) * t + ti) * d), d) };
        dst.copy_from_slice(&x[(r * h + hi) * d..][..d]);
        rotate(dst, &cos[at..at + d], &sin[at..at + d], false);
    };
    let y = crate::gemm::SyncPtr(y.as_mut_ptr());
    if b * h * t * d < PAR_MIN {
        return (0..h).for_each(|hi| (0..b * t).for_each(|r| row(hi, r, y.0)));
    }
    // Rows split as the products around it split theirs (`halves`): each core rotates the
    // rows its q/k product wrote, then its attention reads them.
    crate::halves::run(b * t, |rows| {
        (0..h).into_par_iter().for_each(|hi| {
            let y = &y;
            rows.clone().for_each(|r| row(hi, r, y.0))
        })
    });
}

/// Rotary embedding (rotate-half form) over x [B, H, T, D] with cos/sin [B, T, D];
/// `inverse` applies the transpose (the backward: rotation by −θ).
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    (b, h, t, d): (usize, usize, usize, usize),
    inverse: bool,
    y: &mut [f32],
) {
    let head = |(bh, (y, x)): (usize, (&mut [f32], &[f32]))| {
        let bi = bh / h;
        debug_assert!(bi < b);
        for ti in 0..t {
            let at = (bi * t + ti) * d;
            let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
            y[ti * d..(ti + 1) * d].copy_from_slice(&x[ti * d..(ti + 1) * d]);
            rotate(&mut y[ti * d..(ti + 1) * d], c, s, inverse);
        }
    };
    // A decode step's few heads: rayon's hand-off cost more than the rotation (~0.9 ms of a
    // batch-1 step for SmolLM2's 60 calls).
    if x.len() < PAR_MIN {
        return y
            .chunks_mut(t * d)
            .zip(x.chunks(t * d))
            .enumerate()
            .for_each(head);
    }
    y.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .enumerate()
        .for_each(head);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;

    /// Checks an analytic gradient `grad` of L(x) = Σ coef·f(x) against central differences.
    /// f runs in f32: with step h = 1e-2 the truncation error is h²/6·|f'''| ≈ 2e-5 and the
    /// rounding error ε·Σ|coef·y|/h ≈ 6e-8·(elements)/1e-2 ≈ 1e-4 for these sizes (|y|, |coef| ≤ 1
    /// scale); 2e-3·(1 + |fd|) keeps a margin of 10x above both and is far below any real error
    /// (a wrong term moves a gradient by O(1)).
    fn check(what: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64) {
        let h = 1e-2f32;
        for i in 0..x.len() {
            let mut p = x.to_vec();
            p[i] += h;
            let fp = loss(&p);
            p[i] -= 2.0 * h;
            let fm = loss(&p);
            let fd = (fp - fm) / (2.0 * h as f64);
            assert!(
                (fd - grad[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "{what}[{i}]: finite difference {fd} vs analytic {}",
                grad[i]
            );
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum()
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let (rows, h, eps) = (3, 8, 1e-5);
        let (x, w, coef) = (data(rows * h, 1), data(h, 2), data(rows * h, 3));
        let y_of = |x: &[f32], w: &[f32]| {
            let mut y = vec![0f32; rows * h];
            rms_norm_fwd(x, w, eps, &mut y);
            y
        };
        let mut dx = vec![0f32; rows * h];
        let dw = rms_norm_bwd(&x, &w, &coef, eps, &mut dx);
        check("dx", &x, &dx, |x| dot(&y_of(x, &w), &coef));
        check("dw", &w, &dw, |w| dot(&y_of(&x, w), &coef));
    }

    /// Each row's output is the textbook formula's bits (Σx² summed in order from the first
    /// value, then x · 1/sqrt(Σx²/h + eps) · w), whatever its place among the rows: counts
    /// around the 8-row groups and the 16-row tasks, on one thread, on rayon's, and split in
    /// two halves of rows (100 rows: 48 and 52, the second's last task 4 rows).
    #[test]
    fn rms_norm_rows_are_the_formula_in_order() {
        let (h, eps) = (576, 1e-5f32);
        let w = data(h, 8);
        for rows in [1, 7, 8, 9, 16, 23, 37, 100] {
            // Rows of very different scales: a reordered sum would round differently.
            let x: Vec<f32> = data(rows * h, rows)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1 + (i * 7919) % 1000) as f32)
                .collect();
            let mut want = vec![0f32; rows * h];
            for (y, x) in want.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                let mut ss = 0f32;
                for v in x {
                    ss += v * v;
                }
                let r = 1.0 / (ss / h as f32 + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x * r * w;
                }
            }
            let mut got = vec![f32::NAN; rows * h];
            rms_norm_fwd(&x, &w, eps, &mut got);
            let first_diff = got
                .iter()
                .zip(&want)
                .position(|(g, w)| g.to_bits() != w.to_bits());
            assert_eq!(first_diff, None, "{rows} rows: first differing value");
        }
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let n = 24;
        let (g, u, coef) = (data(n, 4), data(n, 5), data(n, 6));
        // Gate values up to ±3 exercise sigmoid's curved part, not just its linear middle.
        let g: Vec<f32> = g.iter().map(|v| v * 3.0).collect();
        let y_of = |g: &[f32], u: &[f32]| {
            let mut y = vec![0f32; n];
            swiglu_fwd(g, u, &mut y);
            y
        };
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_bwd(&g, &u, &coef, &mut dg, &mut du);
        check("dgate", &g, &dg, |g| dot(&y_of(g, &u), &coef));
        check("dup", &u, &du, |u| dot(&y_of(&g, u), &coef));
    }

    /// RoPE's backward is the inverse rotation applied to dy (a rotation's transpose).
    #[test]
    fn rope_backward_matches_finite_differences() {
        let (b, h, t, d) = (2, 2, 3, 4);
        let n = b * h * t * d;
        let (x, coef) = (data(n, 7), data(n, 8));
        let theta = data(b * t * d, 9);
        let cos: Vec<f32> = theta.iter().map(|a| (a * 3.0).cos()).collect();
        let sin: Vec<f32> = theta.iter().map(|a| (a * 3.0).sin()).collect();
        let y_of = |x: &[f32]| {
            let mut y = vec![0f32; n];
            rope(x, &cos, &sin, (b, h, t, d), false, &mut y);
            y
        };
        let mut dx = vec![0f32; n];
        rope(&coef, &cos, &sin, (b, h, t, d), true, &mut dx);
        check("dx", &x, &dx, |x| dot(&y_of(x), &coef));
    }
}
