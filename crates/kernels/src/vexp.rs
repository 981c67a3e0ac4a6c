//! exp over slices, 16 lanes at a time on AVX-512 (range reduction to [-ln2/2, ln2/2], degree-6
//! polynomial, `vscalefps`): relative error ≤ 2e-7 against libm, which the softmaxes of
//! attention and the 49k-vocabulary cross-entropy call hundreds of millions of times a step.
//! Without AVX-512, the AVX2 twins ([`crate::avx2`]) run the same steps on two 8-lane halves.

use crate::has_avx512 as avx512;

/// x[i] = exp(x[i] − sub) · mul; returns Σ exp(x[i] − sub) (before `mul`).
pub fn exp_sub(x: &mut [f32], sub: f32, mul: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { exp_sub_avx512(x, sub, mul) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::avx2::available() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { exp_sub_avx2(x, sub, mul) };
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        let e = (*v - sub).exp();
        sum += e;
        *v = e * mul;
    }
    sum
}

/// x[i] = exp(x[i] − max) / Σ_j exp(x[j] − max), where every output is bit for bit the same
/// wherever masked entries (those whose exp is 0) sit in the row and however many there are:
/// each exp is computed alike at any position, and the sum runs over the nonzero terms in
/// order (packed together on AVX-512, so lanes follow their rank, not their position). A row
/// left-padded in a batch, or behind a shared prefix, then gets the probabilities it gets alone.
pub fn softmax_masked(x: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { softmax_masked_avx512(x, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::avx2::available() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { softmax_masked_avx2(x, max) };
    }
    softmax_masked_portable(x, max)
}

fn softmax_masked_portable(x: &mut [f32], max: f32) {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v; // adding an exact 0 leaves the sum as it was
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Σ exp(x[i] − sub), x unchanged.
pub fn sum_exp(x: &[f32], sub: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { sum_exp_avx512(x, sub) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::avx2::available() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { sum_exp_avx2(x, sub) };
    }
    x.iter().map(|&v| (v - sub).exp()).sum()
}

/// 1 / (1 + exp(−x)) elementwise into `out`.
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { sigmoid_avx512(x, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::avx2::available() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { sigmoid_avx2(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 1.0 / (1.0 + (-v).exp());
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        // Below −87 (exp under f32's smallest normal) the result is exactly 0: underflowing
        // through denormals costs a microcode assist per vector, a quarter of attention's time
        // where masked scores sit at −1e30.
        let live = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.7)),
            _mm512_set1_ps(-87.0),
        );
        let n =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sub_avx512(x: &mut [f32], sub: f32, mul: f32) -> f32 {
    use std::arch::x86_64::*;
    let (s, m) = (_mm512_set1_ps(sub), _mm512_set1_ps(mul));
    let mut acc = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        let e = imp::exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), s));
        acc = _mm512_add_ps(acc, e);
        _mm512_storeu_ps(c.as_mut_ptr(), _mm512_mul_ps(e, m));
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    for v in chunks.into_remainder() {
        let e = (*v - sub).exp();
        sum += e;
        *v = e * mul;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_masked_avx512(x: &mut [f32], max: f32) {
    use std::arch::x86_64::*;
    let n = x.len();
    let lanes = |left: usize| -> __mmask16 { ((1u32 << left.min(16)) - 1) as u16 };
    let s = _mm512_set1_ps(max);
    // The nonzero exps packed in order; a store may run 16 past the packed length.
    let mut packed = vec![0f32; n + 16];
    let mut len = 0;
    for i in (0..n).step_by(16) {
        let k = lanes(n - i);
        let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i));
        let e = _mm512_maskz_mov_ps(k, imp::exp16(_mm512_sub_ps(v, s)));
        _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), k, e);
        let nz = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(e, _mm512_setzero_ps());
        _mm512_storeu_ps(
            packed.as_mut_ptr().add(len),
            _mm512_maskz_compress_ps(nz, e),
        );
        len += nz.count_ones() as usize;
    }
    let mut acc = _mm512_setzero_ps();
    for j in (0..len).step_by(16) {
        acc = _mm512_add_ps(
            acc,
            _mm512_maskz_loadu_ps(lanes(len - j), packed.as_ptr().add(j)),
        );
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(acc));
    for i in (0..n).step_by(16) {
        let k = lanes(n - i);
        let p = x.as_mut_ptr().add(i);
        _mm512_mask_storeu_ps(p, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p), inv));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_exp_avx512(x: &[f32], sub: f32) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps(sub);
    let mut acc = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        acc = _mm512_add_ps(
            acc,
            imp::exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), s)),
        );
    }
    _mm512_reduce_add_ps(acc)
        + chunks
            .remainder()
            .iter()
            .map(|&v| (v - sub).exp())
            .sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sigmoid_avx512(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        let e = imp::exp16(_mm512_sub_ps(
            _mm512_setzero_ps(),
            _mm512_loadu_ps(x.as_ptr().add(i)),
        ));
        _mm512_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm512_div_ps(one, _mm512_add_ps(one, e)),
        );
        i += 16;
    }
    for j in i..n {
        out[j] = 1.0 / (1.0 + (-x[j]).exp());
    }
}

/// [`exp_sub_avx512`] on 8-lane halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_avx2(x: &mut [f32], sub: f32, mul: f32) -> f32 {
    use crate::avx2::{exp8, reduce16};
    use std::arch::x86_64::*;
    let (s, m) = (_mm256_set1_ps(sub), _mm256_set1_ps(mul));
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for (h, a) in acc.iter_mut().enumerate() {
            let p = c.as_mut_ptr().add(8 * h);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
            *a = _mm256_add_ps(*a, e);
            _mm256_storeu_ps(p, _mm256_mul_ps(e, m));
        }
    }
    let mut sum = reduce16(acc[0], acc[1]);
    for v in chunks.into_remainder() {
        let e = (*v - sub).exp();
        sum += e;
        *v = e * mul;
    }
    sum
}

/// [`softmax_masked_avx512`] on 8-lane halves: every entry through `exp8` (the tail too), the
/// nonzero exps packed in order and summed 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_masked_avx2(x: &mut [f32], max: f32) {
    use crate::avx2::{exp8, reduce16};
    use std::arch::x86_64::*;
    let n = x.len();
    let s = _mm256_set1_ps(max);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // Zero-padded to whole 16-lane chunks: the padding adds exact zeros, as masked lanes do.
    let mut packed = vec![0f32; n + 16];
    let mut len = 0;
    let mut e8 = [0f32; 8];
    for i in (0..n).step_by(8) {
        let k = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i).min(8) as i32), lane);
        let p = x.as_mut_ptr().add(i);
        let e = _mm256_and_ps(
            exp8(_mm256_sub_ps(_mm256_maskload_ps(p, k), s)),
            _mm256_castsi256_ps(k),
        );
        _mm256_maskstore_ps(p, k, e);
        _mm256_storeu_ps(e8.as_mut_ptr(), e);
        for &v in e8.iter().filter(|&&v| v != 0.0) {
            packed[len] = v;
            len += 1;
        }
    }
    let mut acc = [_mm256_setzero_ps(); 2];
    for j in (0..len).step_by(16) {
        for (h, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(packed.as_ptr().add(j + 8 * h)));
        }
    }
    let inv = 1.0 / reduce16(acc[0], acc[1]);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// [`sum_exp_avx512`] on 8-lane halves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(x: &[f32], sub: f32) -> f32 {
    use crate::avx2::{exp8, reduce16};
    use std::arch::x86_64::*;
    let s = _mm256_set1_ps(sub);
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (h, a) in acc.iter_mut().enumerate() {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr().add(8 * h)), s));
            *a = _mm256_add_ps(*a, e);
        }
    }
    reduce16(acc[0], acc[1])
        + chunks
            .remainder()
            .iter()
            .map(|&v| (v - sub).exp())
            .sum::<f32>()
}

/// [`sigmoid_avx512`] on 8-lane halves (the same 16-value chunks, the same scalar tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid_avx2(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    let n = x.len().min(out.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(8) {
        let e = crate::avx2::exp8(_mm256_sub_ps(
            _mm256_setzero_ps(),
            _mm256_loadu_ps(x.as_ptr().add(i)),
        ));
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm256_div_ps(one, _mm256_add_ps(one, e)),
        );
    }
    for j in whole..n {
        out[j] = 1.0 / (1.0 + (-x[j]).exp());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm() {
        let xs: Vec<f32> = (0..3201).map(|i| (i as f32 - 1600.0) * 0.05).collect();
        let mut y = xs.clone();
        let sum = exp_sub(&mut y, 1.5, 2.0);
        let mut want_sum = 0f64;
        for (&x, &y) in xs.iter().zip(&y) {
            let w = ((x - 1.5) as f64).exp();
            want_sum += w;
            assert!(
                ((y as f64) - 2.0 * w).abs() <= 1e-6 * 2.0 * w + 1e-37,
                "exp({x}) {y} vs {}",
                2.0 * w
            );
        }
        assert!(((sum as f64) - want_sum).abs() <= 1e-5 * want_sum);
        assert!(((sum_exp(&xs, 1.5) as f64) - want_sum).abs() <= 1e-5 * want_sum);
        // Masked scores: far below the range give 0, not NaN.
        let mut m = vec![-1e30f32; 19];
        assert_eq!(exp_sub(&mut m, 3.0, 1.0), 0.0);
        assert!(m.iter().all(|&v| v == 0.0));
        let mut s = vec![0f32; xs.len()];
        sigmoid(&xs, &mut s);
        for (&x, &s) in xs.iter().zip(&s) {
            let w = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!(((s as f64) - w).abs() <= 1e-6, "sigmoid({x})");
        }
    }

    /// A softmax row gives the same bits with masked entries (−∞, −1e30) inserted anywhere, in
    /// any number (left padding, a gap behind a prefix, the causal future), and matches the
    /// f64 softmax to f32 rounding (1e-6 relative: each value is one exp at 2e-7 and a sum of
    /// ≤ 37 positive terms).
    #[test]
    fn masked_softmax_ignores_where_the_mask_sits() {
        masked_rows_as_alone(softmax_masked);
        masked_rows_as_alone(softmax_masked_portable);
        #[cfg(target_arch = "x86_64")]
        if crate::avx2::available() {
            masked_rows_as_alone(|x, m| unsafe { softmax_masked_avx2(x, m) });
        }
    }

    /// The AVX2 twins compute the AVX-512 functions' bits (same steps, same order), over
    /// values across exp's whole range, masked entries and lengths off the 16-lane grid.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_twins_give_the_avx512_bits() {
        if !crate::avx2::twins_comparable("vexp") {
            return;
        }
        for n in [1, 7, 16, 37, 200, 3201] {
            let xs: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    0 => -1e30,
                    1 => f32::NEG_INFINITY,
                    _ => ((i * 7919) % 4001) as f32 * 0.045 - 95.0,
                })
                .collect();
            let (mut a, mut b) = (xs.clone(), xs.clone());
            // SAFETY: both ISAs were detected.
            unsafe {
                let sa = exp_sub_avx512(&mut a, 1.5, 0.7);
                let sb = exp_sub_avx2(&mut b, 1.5, 0.7);
                assert_eq!((sa.to_bits(), &a), (sb.to_bits(), &b), "exp_sub n={n}");
                let max = xs.iter().fold(f32::MIN, |m, &v| m.max(v));
                let (mut a, mut b) = (xs.clone(), xs.clone());
                softmax_masked_avx512(&mut a, max);
                softmax_masked_avx2(&mut b, max);
                assert_eq!(a, b, "softmax_masked n={n}");
                let (sa, sb) = (sum_exp_avx512(&xs, 2.0), sum_exp_avx2(&xs, 2.0));
                assert_eq!(sa.to_bits(), sb.to_bits(), "sum_exp n={n}");
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                sigmoid_avx512(&xs, &mut a);
                sigmoid_avx2(&xs, &mut b);
                assert_eq!(a, b, "sigmoid n={n}");
            }
        }
    }

    fn masked_rows_as_alone(softmax_masked: fn(&mut [f32], f32)) {
        let row: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        let max = row.iter().fold(f32::MIN, |a, &b| a.max(b));
        let mut alone = row.clone();
        softmax_masked(&mut alone, max);
        let z: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        for (&p, &v) in alone.iter().zip(&row) {
            let want = ((v - max) as f64).exp() / z;
            assert!(((p as f64) - want).abs() <= 1e-6 * want, "{p} vs {want}");
        }
        for (front, gap_at, gap, back) in
            [(1, 0, 0, 0), (5, 20, 3, 0), (0, 16, 17, 2), (30, 3, 40, 9)]
        {
            let mut masked = vec![f32::NEG_INFINITY; front];
            masked.extend(&row[..gap_at]);
            masked.extend(vec![-1e30f32; gap]);
            masked.extend(&row[gap_at..]);
            masked.extend(vec![f32::NEG_INFINITY; back]);
            softmax_masked(&mut masked, max);
            let kept: Vec<f32> = masked[front..front + gap_at]
                .iter()
                .chain(&masked[front + gap_at + gap..front + gap + row.len()])
                .copied()
                .collect();
            assert_eq!(
                kept, alone,
                "front {front}, gap {gap} at {gap_at}, back {back}"
            );
            assert!(masked[..front].iter().all(|&p| p == 0.0));
        }
    }
}
