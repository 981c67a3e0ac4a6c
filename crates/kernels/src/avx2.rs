//! 256-bit building blocks for the AVX2 twins of the AVX-512 kernels. A twin holds each
//! 16-lane vector of its AVX-512 original as two halves (lanes 0–7, 8–15) and reduces them
//! in the order `_mm512_reduce_add_ps` does (halves, quarters, pairs), so it computes the
//! same operations in the same order: a machine without AVX-512 gets the same bits.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Whether this CPU runs the twins (AVX2, FMA and F16C).
pub fn available() -> bool {
    static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *A.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Σ of the 16 lanes held as (lanes 0–7, lanes 8–15).
///
/// # Safety
/// The CPU has AVX2 ([`available`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn reduce16(lo: __m256, hi: __m256) -> f32 {
    let a = _mm256_add_ps(lo, hi);
    let a = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let a = _mm_add_ps(a, _mm_shuffle_ps::<0b01_00_11_10>(a, a));
    _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps::<0b01>(a, a)))
}

/// exp of 8 lanes: `vexp`'s AVX-512 `exp16` step for step. Its `vscalefps` (p·2ⁿ) becomes
/// two multiplies by normal powers of two, 2^⌊n/2⌋ and 2^(n−⌊n/2⌋): n runs to 128, past the
/// largest f32 power, and both products are exact because the result is normal (x ≥ −87
/// keeps n ≥ −126, and n = −126 only with p > 1).
///
/// # Safety
/// The CPU has AVX2 and FMA ([`available`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: __m256) -> __m256 {
    let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_max_ps(
        _mm256_min_ps(x, _mm256_set1_ps(88.7)),
        _mm256_set1_ps(-87.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let ni = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(ni);
    let pow2 = |e: __m256i| {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            e,
            _mm256_set1_epi32(127),
        )))
    };
    let y = _mm256_mul_ps(
        _mm256_mul_ps(p, pow2(half)),
        pow2(_mm256_sub_epi32(ni, half)),
    );
    _mm256_and_ps(live, y)
}

/// Whether this CPU runs both the twins and their AVX-512 originals, so that a test can hold
/// them to the same bits; where it does not, says so on stderr (the comparison did not run).
pub fn twins_comparable(what: &str) -> bool {
    let both = available() && is_x86_feature_detected!("avx512f");
    if !both {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "note: no AVX-512 here: {what}: the AVX2 twins were not compared with AVX-512"
        );
    }
    both
}
