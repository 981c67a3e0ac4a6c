//! f32 products on `gemm` (candle's own GEMM, AVX-512 build) over strided operands, so views
//! (one head of [B, T, H, D], a transposed matrix) need no copies.

use gemm::{gemm, Parallelism};

/// dst[m, n] (= or +=) beta · lhs[m, k] · rhs[k, n], every operand by (row, column) strides,
/// threaded as `par` says (attention runs one product per task with `Parallelism::None`).
///
/// # Safety
/// Every pointer addresses all elements its shape and strides reach.
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (drs, dcs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lrs, lcs): (usize, usize),
    rhs: *const f32,
    (rrs, rcs): (usize, usize),
    beta: f32,
    par: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        dst,
        dcs as isize,
        drs as isize,
        accumulate,
        lhs,
        lcs as isize,
        lrs as isize,
        rhs,
        rcs as isize,
        rrs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        par,
    )
}

/// C [m, n] (= or +=) beta · op(A) · op(B) on contiguous row-major buffers, all threads:
/// A is [m, k] (or [k, m] with `ta`), B is [k, n] (or [n, k] with `tb`).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    accumulate: bool,
    beta: f32,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "sgemm: buffers too short"
    );
    let (ls, rs) = (
        if ta { (1, m) } else { (k, 1) },
        if tb { (1, k) } else { (n, 1) },
    );
    let par = match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    };
    // SAFETY: the lengths were checked against the shapes above.
    unsafe {
        mm(
            (m, n, k),
            c.as_mut_ptr(),
            (n, 1),
            accumulate,
            a.as_ptr(),
            ls,
            b.as_ptr(),
            rs,
            beta,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_transposes() {
        let (m, n, k) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.25).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = 2.0 * (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
            }
        }
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![1.0f32; m * n];
            let (aa, bb) = (if ta { &at } else { &a }, if tb { &bt } else { &b });
            sgemm((m, n, k), aa, ta, bb, tb, &mut c, true, 2.0);
            for (g, w) in c.iter().zip(&want) {
                assert!(
                    (g - (w + 1.0)).abs() < 1e-4,
                    "{ta} {tb}: {g} vs {}",
                    w + 1.0
                );
            }
        }
    }
}
