//! Activations rounded to integer levels per 32-value block, d = max|x| / levels and
//! q = round-half-even(x / d): int8 (127 levels) for the VNNI-style decode dots, int16 (32767)
//! for the Int16 path's `vpmaddwd` dots, decode (`fedllm_model::qmatvec`) and prompt
//! ([`crate::gemm_i16`]) alike.

/// One block rounded to `levels` steps each side: d, and each rounded value to `put`. A NaN
/// makes d NaN (`f32::max` would skip it), so the products it enters are NaN, as in f32.
pub fn round_levels(x: &[f32], levels: f32, mut put: impl FnMut(usize, i32)) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let amax = if x.iter().any(|v| v.is_nan()) {
        f32::NAN
    } else {
        amax
    };
    let d = amax / levels;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (i, v) in x.iter().enumerate() {
        put(i, (v * id).round_ties_even() as i32);
    }
    d
}

/// Σx of each 32-value block of `x` in order (value 0 first), into `out`: Q4_1's offset term
/// m·Σx. Eight blocks' chains run side by side, each still in order, so the bits are the plain
/// loop's; one chain at a time waits on the add latency (about 4 cycles a value).
pub fn block_sums(x: &[f32], out: &mut [f32]) {
    assert!(x.len().is_multiple_of(32) && out.len() >= x.len() / 32);
    let (groups, rest) = x.split_at(x.len() / 256 * 256);
    for (g, o) in groups.chunks_exact(256).zip(out.chunks_exact_mut(8)) {
        // -0.0 as `Iterator::sum` starts: a block of -0.0s sums to -0.0 there too.
        let mut s = [-0f32; 8];
        for i in 0..32 {
            for (j, s) in s.iter_mut().enumerate() {
                *s += g[32 * j + i];
            }
        }
        o.copy_from_slice(&s);
    }
    for (b, o) in rest.chunks_exact(32).zip(&mut out[groups.len() / 32..]) {
        *o = b.iter().sum();
    }
}

/// One block to int16, stored even values first: d. `simd` takes AVX2 where the CPU has it:
/// the same values.
pub fn round_block_i16(x: &[f32], q: &mut [i16], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd && crate::avx2::available() {
        // SAFETY: AVX2 was detected; x holds a whole block.
        return unsafe { round_block_i16_avx2(x, q) };
    }
    round_levels(x, 32767.0, |i, r| q[i / 2 + 16 * (i % 2)] = r as i16)
}

/// Each 32-value block of `x` to int16 as [`round_block_i16`] (into `q`, d into `d`): the same
/// values. The blocks' independent chains (max, divide, round) overlap in one loop, where a
/// call per block waited on each in turn.
pub fn round_row_i16(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    assert!(x.len().is_multiple_of(32) && q.len() >= x.len() && d.len() >= x.len() / 32);
    #[cfg(target_arch = "x86_64")]
    if crate::avx2::available() {
        // SAFETY: AVX2 was detected; the slices hold every block (asserted).
        return unsafe { round_row_i16_avx2(x, q, d) };
    }
    for (d, (xs, qs)) in d
        .iter_mut()
        .zip(x.chunks_exact(32).zip(q.chunks_exact_mut(32)))
    {
        *d = round_block_i16(xs, qs, false);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_row_i16_avx2(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    for (d, (xs, qs)) in d
        .iter_mut()
        .zip(x.chunks_exact(32).zip(q.chunks_exact_mut(32)))
    {
        *d = round_block_i16_avx2(xs, qs);
    }
}

/// [`round_block_i16`] on 256-bit registers (the same products, rounded to nearest even by
/// `vcvtps2dq`): the same values. Non-finite activations, which the scalar loop turns into
/// other garbage, are not promised equal.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn round_block_i16_avx2(x: &[f32], q: &mut [i16]) -> f32 {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x[8 * i..8 * i + 8].as_ptr()));
    let sign = _mm256_set1_ps(-0.0);
    let abs = |i: usize| _mm256_andnot_ps(sign, v[i]);
    let a = _mm256_max_ps(_mm256_max_ps(abs(0), abs(1)), _mm256_max_ps(abs(2), abs(3)));
    let a = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    let amax = _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
    // As `round_levels`: a NaN makes d NaN (`maxps` may drop it).
    let unord = |i: usize, j: usize| _mm256_cmp_ps::<_CMP_UNORD_Q>(v[i], v[j]);
    let nan = _mm256_movemask_ps(_mm256_or_ps(unord(0, 1), unord(2, 3))) != 0;
    let amax = if nan { f32::NAN } else { amax };
    let d = amax / 32767.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let i: [__m256i; 4] = std::array::from_fn(|j| _mm256_cvtps_epi32(_mm256_mul_ps(v[j], id)));
    // Values 16h..16h+16 as words (packs interleaves 128-bit halves, the permute restores the
    // order), then each half's even words before its odd ones, then the halves regrouped:
    // [evens of both] then [odds of both].
    let evens_first = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, //
        0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
    );
    let half: [__m256i; 2] = std::array::from_fn(|h| {
        let p = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(i[2 * h], i[2 * h + 1]));
        _mm256_permute4x64_epi64::<0xD8>(_mm256_shuffle_epi8(p, evens_first))
    });
    assert!(q.len() >= 32);
    let at = q.as_mut_ptr() as *mut __m256i;
    _mm256_storeu_si256(at, _mm256_permute2x128_si256::<0x20>(half[0], half[1]));
    _mm256_storeu_si256(
        at.add(1),
        _mm256_permute2x128_si256::<0x31>(half[0], half[1]),
    );
    d
}

/// One block to int8 (127 levels), natural order: (d, Σq). `simd` takes AVX-512 where the
/// CPU has it: the same bytes.
pub fn round_block_i8(x: &[f32], q: &mut [i8], simd: bool) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if simd && crate::has_avx512() {
        // SAFETY: AVX-512F was detected; the caller's slices hold a whole block.
        return unsafe { round_block_i8_avx512(x, q) };
    }
    let mut sum = 0;
    let d = round_levels(x, 127.0, |i, r| {
        q[i] = r as i8;
        sum += r;
    });
    (d, sum)
}

/// Each 32-value block of `x` to int8 as [`round_block_i8`]: bytes into `q`, d and Σq into
/// `d` and `sq`; the same values, the blocks overlapping as in [`round_row_i16`].
pub fn round_row_i8(x: &[f32], q: &mut [i8], d: &mut [f32], sq: &mut [i32], simd: bool) {
    let nb = x.len() / 32;
    assert!(x.len().is_multiple_of(32) && q.len() >= x.len() && d.len() >= nb && sq.len() >= nb);
    #[cfg(target_arch = "x86_64")]
    if simd && crate::has_avx512() {
        // SAFETY: AVX-512F was detected; the slices hold every block (asserted).
        return unsafe { round_row_i8_avx512(x, q, d, sq) };
    }
    for (b, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        (d[b], sq[b]) = round_block_i8(xs, qs, false);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_row_i8_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], sq: &mut [i32]) {
    for (b, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        (d[b], sq[b]) = round_block_i8_avx512(xs, qs);
    }
}

/// [`round_block_i8`] on 512-bit registers (same operations, same bytes).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn round_block_i8_avx512(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() >= 32 && q.len() >= 32);
    let v0 = _mm512_loadu_ps(x.as_ptr());
    let v1 = _mm512_loadu_ps(x.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    // As `round_levels`: a NaN makes d NaN.
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v0, v1) != 0;
    let amax = if nan { f32::NAN } else { amax };
    let d = amax / 127.0;
    let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let i0 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v0, id));
    let i1 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v1, id));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(i1),
    );
    (d, _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int16 rounding: the AVX2 loop gives the scalar loop's values and scale, zero blocks
    /// included, and blocks are stored even values first.
    #[test]
    fn int16_rounding_is_the_same_with_and_without_simd() {
        let x = crate::test_data(4 * 96, 304);
        let x: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 7) as f32)
            .collect();
        for b in x.chunks_exact(32).chain([&[0f32; 32][..]]) {
            let (mut a, mut s) = ([0i16; 32], [0i16; 32]);
            let (da, ds) = (
                round_block_i16(b, &mut a, true),
                round_block_i16(b, &mut s, false),
            );
            assert_eq!((a, da.to_bits()), (s, ds.to_bits()));
        }
        // By hand: 0..30 and 100 have d = 100/32767, q = round(v·327.67): 1 → 328 (truncation
        // gives 327), 3 → 983 (983.01), 100 → 32767.
        let mut ramp: Vec<f32> = (0..32).map(|v| v as f32).collect();
        ramp[31] = 100.0;
        for simd in [true, false] {
            let mut q = [0i16; 32];
            assert_eq!(round_block_i16(&ramp, &mut q, simd), 100.0 / 32767.0);
            // Even values first: value 2 (655.34) sits at 1, value 1 at 16, 3 at 17, 31 at 31.
            assert_eq!((q[0], q[1], q[16], q[17], q[31]), (0, 655, 328, 983, 32767));
        }
        if !crate::avx2::available() {
            eprintln!("note: no AVX2 here, the SIMD int16 rounding is not exercised");
        }
    }

    /// Rows of blocks (the prompt GEMMs' and decoding's rounding) give each block's values,
    /// d and Σq as the single-block scalar loop, bit for bit: 37 blocks (odd, so no pairing
    /// hides a block), scales spread over three decades, a zero block and a block of -0.0s.
    #[test]
    fn rows_round_as_their_blocks_one_by_one() {
        let mut x: Vec<f32> = crate::test_data(37 * 32, 17)
            .iter()
            .enumerate()
            .map(|(i, v)| v * [0.01f32, 1.0, 30.0][i / 32 % 3])
            .collect();
        x[5 * 32..6 * 32].fill(0.0);
        x[9 * 32..10 * 32].fill(-0.0);
        let nb = x.len() / 32;
        for simd in [true, false] {
            let (mut q8, mut d8, mut s8) = (vec![0i8; x.len()], vec![0f32; nb], vec![0i32; nb]);
            round_row_i8(&x, &mut q8, &mut d8, &mut s8, simd);
            let (mut q16, mut d16) = (vec![0i16; x.len()], vec![0f32; nb]);
            round_row_i16(&x, &mut q16, &mut d16);
            for (b, blk) in x.chunks_exact(32).enumerate() {
                let (mut e8, mut e16) = ([0i8; 32], [0i16; 32]);
                let (d, sq) = round_block_i8(blk, &mut e8, false);
                assert_eq!(
                    (&q8[b * 32..b * 32 + 32], d8[b].to_bits(), s8[b]),
                    (&e8[..], d.to_bits(), sq)
                );
                let d = round_block_i16(blk, &mut e16, false);
                assert_eq!(
                    (&q16[b * 32..b * 32 + 32], d16[b].to_bits()),
                    (&e16[..], d.to_bits())
                );
            }
        }
    }

    /// Block sums are each block's values added in order from -0.0 (`Iterator::sum`'s
    /// start), bit for bit: 8-block groups and a remainder (19 blocks), values whose sum
    /// depends on the order (1e8 and 1s), and blocks of -0.0s in and after a group.
    #[test]
    fn block_sums_add_each_block_in_order() {
        let mut x = crate::test_data(19 * 32, 3);
        x[3 * 32] = 1e8;
        x[3 * 32 + 1..4 * 32].fill(1.0);
        x[6 * 32..7 * 32].fill(-0.0);
        x[17 * 32..18 * 32].fill(-0.0);
        let mut sums = vec![0f32; 19];
        block_sums(&x, &mut sums);
        for (b, blk) in x.chunks_exact(32).enumerate() {
            let mut e = -0.0f32;
            for v in blk {
                e += v;
            }
            assert_eq!(sums[b].to_bits(), e.to_bits(), "block {b}");
        }
        // 1e8 absorbs each 1 (the f32 spacing there is 8), so the in-order sum stays 1e8.
        assert_eq!(sums[3], 1e8);
        assert!(sums[6].is_sign_negative() && sums[17].is_sign_negative());
    }
}
