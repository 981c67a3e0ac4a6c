//! The inner kernels: one panel of B (NB columns, pair-interleaved bf16) against every 32-row
//! block of packed A, each block's 32×32 f32 result handed to `emit`.

use crate::gemm::{MB, NB};
use crate::isa::Isa;

pub(crate) fn panel(
    isa: Isa,
    ap: &[u16],
    mp: usize,
    kp: usize,
    panel: &[u16],
    tile: &mut [f32],
    mut emit: impl FnMut(usize, &[f32]),
) {
    debug_assert!(ap.len() >= mp * kp && panel.len() >= kp * NB && tile.len() >= MB * NB);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => unsafe {
            amx::configure();
            for i0 in (0..mp).step_by(MB) {
                amx::block(
                    ap.as_ptr().add(i0 * kp),
                    kp,
                    panel.as_ptr(),
                    tile.as_mut_ptr(),
                );
                emit(i0, tile);
            }
            amx::release();
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => {
            for i0 in (0..mp).step_by(MB) {
                // SAFETY: `selected()` only yields this ISA when the CPU has AVX512-BF16.
                unsafe {
                    avx512::block(
                        ap.as_ptr().add(i0 * kp),
                        kp,
                        panel.as_ptr(),
                        tile.as_mut_ptr(),
                    )
                };
                emit(i0, tile);
            }
        }
        _ => {
            for i0 in (0..mp).step_by(MB) {
                portable_block(&ap[i0 * kp..(i0 + MB) * kp], kp, panel, tile);
                emit(i0, tile);
            }
        }
    }
}

fn portable_block(a: &[u16], kp: usize, panel: &[u16], tile: &mut [f32]) {
    let f = crate::bf16::to_f32;
    for r in 0..MB {
        let row = &a[r * kp..(r + 1) * kp];
        let out = &mut tile[r * NB..(r + 1) * NB];
        out.fill(0.0);
        for p in 0..kp / 2 {
            let (a0, a1) = (f(row[2 * p]), f(row[2 * p + 1]));
            if a0 == 0.0 && a1 == 0.0 {
                continue;
            }
            for h in 0..2 {
                let b = &panel[h * kp * 16 + p * 32..h * kp * 16 + p * 32 + 32];
                for c in 0..16 {
                    out[h * 16 + c] += a0 * f(b[2 * c]) + a1 * f(b[2 * c + 1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MB, NB};
    use std::arch::x86_64::*;

    /// 32 rows × 32 columns, as 4 groups of 8 rows × 2 vectors (16 accumulators in registers).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn block(a: *const u16, kp: usize, panel: *const u16, tile: *mut f32) {
        let half = kp * 16;
        for g in 0..MB / 8 {
            let mut acc = [[_mm512_setzero_ps(); 2]; 8];
            let rows: [*const i32; 8] =
                std::array::from_fn(|r| a.add((g * 8 + r) * kp) as *const i32);
            for p in 0..kp / 2 {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(panel.add(p * 32) as *const __m512i));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    panel.add(half + p * 32) as *const __m512i,
                ));
                for r in 0..8 {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rows[r].add(p)));
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let o = tile.add((g * 8 + r) * NB);
                _mm512_storeu_ps(o, acc[0]);
                _mm512_storeu_ps(o.add(16), acc[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::NB;
    use std::arch::asm;

    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    /// Palette 1; tmm0–3 accumulate C (16 rows × 16 f32), tmm4–5 hold A (16 rows × 32 bf16),
    /// tmm6–7 hold B (16 pair-rows × 16 columns). Every thread loads it before its first tile
    /// instruction (tile state is per thread).
    pub unsafe fn configure() {
        let mut cfg = TileCfg([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
    }

    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// 32 rows of A (stride kp bf16) × one 32-column panel → tile [32][NB] f32.
    pub unsafe fn block(a: *const u16, kp: usize, panel: *const u16, tile: *mut f32) {
        let sa = kp * 2;
        let a1 = a.add(16 * kp);
        let b1 = panel.add(kp * 16);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for kb in 0..kp / 32 {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(kb * 32),
                a1 = in(reg) a1.add(kb * 32),
                b0 = in(reg) panel.add(kb * 512),
                b1 = in(reg) b1.add(kb * 512),
                sa = in(reg) sa,
                sb = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        let st = NB * 4;
        asm!(
            "tilestored [{c0} + {st}*1], tmm0",
            "tilestored [{c1} + {st}*1], tmm1",
            "tilestored [{c2} + {st}*1], tmm2",
            "tilestored [{c3} + {st}*1], tmm3",
            c0 = in(reg) tile,
            c1 = in(reg) tile.add(16),
            c2 = in(reg) tile.add(16 * NB),
            c3 = in(reg) tile.add(16 * NB + 16),
            st = in(reg) st,
            options(nostack),
        );
    }
}

/// The f32 block kernel of an f32 FMA path (`isa.f32_fma()`).
#[allow(clippy::type_complexity)]
pub(crate) fn f32_kernel(
    isa: Isa,
) -> unsafe fn(*const f32, usize, usize, *const f32, usize, *mut f32, usize, usize, bool, *const f32)
{
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        return f32_block_avx2;
    }
    debug_assert!(isa.f32_fma());
    f32_block
}

/// C[rows, cols] (= or +=) A[rows, kc] (stride lda) · B[kc, NR]; rows ≤ MR, cols ≤ NR.
/// 6 rows × 4 vectors = 24 accumulators; A values are broadcast straight from memory. Only
/// the 16-column vectors holding columns of C are computed (a causal attention block's last
/// key panel is often partly past its rows' keys), each element the same FMA chain.
///
/// # Safety
/// The CPU has AVX-512F; A holds `rows` rows of `kc` values at stride `lda`, B holds kc·NR
/// values, C holds `rows` rows of `cols` values at stride `ldc`; `next` (the next block's A,
/// only prefetched) holds MR rows of `kc` values at stride `lda`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn f32_block(
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
    next: *const f32,
) {
    let f = match cols.div_ceil(16) {
        0 => return,
        1 => f32_vectors::<1>,
        2 => f32_vectors::<2>,
        3 => f32_vectors::<3>,
        _ => f32_vectors::<4>,
    };
    f(a, lda, rows, b, kc, c, ldc, cols, accumulate, next)
}

/// [`f32_block`] on its first V vectors of 16 columns (cols ≤ 16·V).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn f32_vectors<const V: usize>(
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
    next: *const f32,
) {
    use crate::gemm::{MR, NR};
    use std::arch::x86_64::*;
    // Missing rows read row 0 again (valid memory) and are never stored.
    let ar: [*const f32; MR] = std::array::from_fn(|r| a.add(if r < rows { r * lda } else { 0 }));
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let live = cols.saturating_sub(v * 16).min(16);
        ((1u32 << live) - 1) as __mmask16
    });
    let mut acc = [[_mm512_setzero_ps(); V]; MR];
    if accumulate {
        for r in 0..rows {
            for v in 0..V {
                acc[r][v] = _mm512_maskz_loadu_ps(masks[v], c.add(r * ldc + v * 16));
            }
        }
    }
    for kk in 0..kc {
        if kk % 16 == 0 {
            // The next block's rows of A, one line per row ahead of its use: six short row
            // streams defeat the hardware prefetcher (~20% in L2-resident A).
            for r in 0..MR {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * lda + kk) as *const i8);
            }
        }
        let bk = b.add(kk * NR);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bk.add(v * 16)));
        for r in 0..MR {
            let av = _mm512_set1_ps(*ar[r].add(kk));
            for v in 0..V {
                acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
            }
        }
    }
    for r in 0..rows {
        for v in 0..V {
            _mm512_mask_storeu_ps(c.add(r * ldc + v * 16), masks[v], acc[r][v]);
        }
    }
}

/// The AVX2 twin of [`f32_block`]: the same products in the same order (each element of C is
/// one chain of FMAs over kk, from C or from zero), so both paths give the same bits. The 64
/// columns go as four 16-column strips of 6 rows × 2 vectors: 12 accumulators, 2 B vectors and
/// a broadcast fill the 16 registers.
///
/// # Safety
/// As [`f32_block`], with AVX2 and FMA in place of AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(crate) unsafe fn f32_block_avx2(
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
    next: *const f32,
) {
    use crate::gemm::{MR, NR};
    use std::arch::x86_64::*;
    let ar: [*const f32; MR] = std::array::from_fn(|r| a.add(if r < rows { r * lda } else { 0 }));
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for s in (0..cols).step_by(16) {
        // Lanes of the strip's two vectors that hold columns of C.
        let masks: [__m256i; 2] = std::array::from_fn(|v| {
            let live = cols.saturating_sub(s + v * 8).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(live), lane)
        });
        // Zen's masked store is microcoded (~12 cycles each): whole strips take plain ones.
        let whole = cols - s >= 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if accumulate {
            for r in 0..rows {
                for v in 0..2 {
                    let at = c.add(r * ldc + s + v * 8);
                    acc[r][v] = if whole {
                        _mm256_loadu_ps(at)
                    } else {
                        _mm256_maskload_ps(at, masks[v])
                    };
                }
            }
        }
        for kk in 0..kc {
            if s == 0 && kk % 16 == 0 {
                for r in 0..MR {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * lda + kk) as *const i8);
                }
            }
            let bk = b.add(kk * NR + s);
            let bv = [_mm256_loadu_ps(bk), _mm256_loadu_ps(bk.add(8))];
            for r in 0..MR {
                let av = _mm256_broadcast_ss(&*ar[r].add(kk));
                for v in 0..2 {
                    acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
                }
            }
        }
        for r in 0..rows {
            for v in 0..2 {
                let at = c.add(r * ldc + s + v * 8);
                if whole {
                    _mm256_storeu_ps(at, acc[r][v]);
                } else {
                    _mm256_maskstore_ps(at, masks[v], acc[r][v]);
                }
            }
        }
    }
}

/// Portable twin of the AVX-512 block (never selected on CPUs without AVX-512F).
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn f32_block(
    a: *const f32,
    lda: usize,
    rows: usize,
    b: *const f32,
    kc: usize,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
    _next: *const f32,
) {
    use crate::gemm::NR;
    for r in 0..rows {
        for j in 0..cols {
            let mut s = if accumulate { *c.add(r * ldc + j) } else { 0.0 };
            for kk in 0..kc {
                s += *a.add(r * lda + kk) * *b.add(kk * NR + j);
            }
            *c.add(r * ldc + j) = s;
        }
    }
}
