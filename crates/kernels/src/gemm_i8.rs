//! C [m, n] (+)= A [m, k] · Wᵀ for a frozen W [n, k] kept in Q4_1 or Q8_0 blocks and A rounded
//! to int8 per 32 values (llama.cpp's Q8 activations): the prompt rows of the Int8 decode path.
//!
//! Why: `vpdpbusd` multiplies 64 byte pairs per instruction, twice `vpdpwssd`'s 32 word pairs
//! at the same issue rate (measured ceilings on one Zen 4 core: 234 against 117 G
//! multiply-adds/s, `fedllm bench blocks`), and a prompt is all products. The price is the
//! 8-bit rounding: each activation moves by up to d/2 with d = max|x|/127 per block.
//!
//! Numbers: the [`crate::gemm_i16`] formula with 8-bit activations. Per output (row i, column
//! j), the same whatever m, n or thread count: each block's integer dot I_b = Σ q_x·q_w is
//! exact (int32; |I_b| ≤ 32·128·127 < 2²⁴, so its f32 conversion is exact too), then
//! `acc = fma(f32(I_b) · d_x[i][b], d_w[j][b], acc)` in block order and, for Q4_1,
//! `off = fma(m_w[j][b], d_x[i][b]·Σq_x[i][b], off)` in block order; y = acc + off (+ C when
//! accumulating). The offset's sum is that of the rounded values (llama.cpp's Q8_1 `s`), so a
//! Q4_1 output is the dot of the rounded row with the dequantized weights, rounded only in
//! f32: its error is Σ w·ε over the activations' rounding errors ε. Summing the unrounded x
//! there (int16's choice) left Σ d_w·q_w·ε, q_w ∈ 0..15 not centred — the larger error — and
//! cost an in-order f32 sum per block (~3% of a prompt).
//!
//! Layout: lanes are weight columns. A task widens its columns' blocks once into panels of 16
//! columns holding one 32-bit word (four consecutive values as bytes) per column and quad.
//! `vpdpbusd` multiplies unsigned bytes by signed ones: Q4_1's nibbles are unsigned already,
//! Q8_0's values are stored +128, and the 128·Σq_x this adds is subtracted from the integer
//! sum before anything rounds. A register block is 6 rows × two panels: 12 integer sums and
//! 12 f32 chains in the 32 registers.

use candle_core::quantized::GgmlDType;

use crate::gemm::SyncPtr;
use crate::gemm_i16::{check_input, check_product, round_tiles, Out, Tiles};

/// Columns per panel (one 512-bit register of int32 lanes).
const NP: usize = 16;
/// Rows per register block.
const MR: usize = 6;
/// Word slots per quad in the rounded rows: the 6 rows of a tile padded to 8 (8×8 transposes).
const SLOTS: usize = 8;
/// Panels per task: the register block's pair (32 columns; 576-column products split into 18
/// tasks, 192-column ones into 6).
const TASK: usize = 2;

/// Whether this CPU multiplies blocks of type `t` here (AVX-512 F, BW and VNNI; AVX2 for the
/// transposes).
pub fn supported(t: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0)
        && crate::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows x [m, k] rounded for [`matmul_rounded`]: quads of int8 values as words, 6 rows
/// interleaved — [m/6 (rounded up)][k/4][8] (`gemm_i16::Tiles`) — and per block d, the f32 Σx
/// and 128·Σq (Q8_0's correction).
pub struct Rounded(Tiles);

impl std::ops::Deref for Rounded {
    type Target = Tiles;
    fn deref(&self) -> &Tiles {
        &self.0
    }
}

impl Rounded {
    /// x [m, k] (k a multiple of 32; m = x.len() / k), tiles of 6 rows on rayon's threads.
    pub fn new(x: &[f32], k: usize) -> Result<Rounded, String> {
        if !supported(GgmlDType::Q4_1) {
            return Err("int8 product: this CPU has no AVX-512 VNNI".into());
        }
        let tiles = round_tiles::<8>("int8 product", x, k, &|row, words, d, sums, extra| {
            // A word is its quad's four bytes as they lie in memory (little-endian).
            // SAFETY: k/32·8 i32 are k bytes, aligned for i8.
            let q = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut i8, 4 * words.len())
            };
            crate::rounding::round_row_i8(row, q, d, extra, true);
            for ((s, &d), e) in sums.iter_mut().zip(d.iter()).zip(extra.iter_mut()) {
                *s = d * *e as f32;
                *e *= 128;
            }
        })?;
        Ok(Rounded(tiles))
    }
}

/// C [m, n] (row-major) = x · Wᵀ (or C += x · Wᵀ when `accumulate`) for x [m, k] rounded
/// here and W the raw blocks of an [n, k] matrix of type `t` ([`supported`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    t: GgmlDType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    c: &mut [f32],
    accumulate: bool,
) -> Result<(), String> {
    check_input("int8 product", t, x, m, k)?;
    let a = Rounded::new(&x[..m * k], k)?;
    matmul_rounded(t, w, n, &a, c, accumulate)
}

/// [`matmul`] of rows rounded once ([`Rounded::new`]): products of the same rows (q, k and v
/// of one input; gate and up) share the rounding.
pub fn matmul_rounded(
    t: GgmlDType,
    w: &[u8],
    n: usize,
    a: &Rounded,
    c: &mut [f32],
    accumulate: bool,
) -> Result<(), String> {
    let (m, n) = (a.m, n);
    check_product("int8 product", t, supported(t), (w, n), a, c)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cp = SyncPtr(c.as_mut_ptr());
    crate::halves::for_each_task(m, n.div_ceil(NP * TASK), |task, rows| {
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: task `task` writes only its own columns of C, in these rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                run_task(t, w, n, a, &cp, accumulate, (task, rows), scratch)
            }
        })
    });
    Ok(())
}

/// A task's buffers, kept by its thread across products (fresh ones per rayon split cost a
/// zeroed allocation each): its panels' words, d and m.
#[derive(Default)]
struct Scratch {
    wp: Vec<i32>,
    scales: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Task `task`'s panels (its up to 32 columns of W) widened into `scratch`: how many, and
/// their blocks' words, d and m ([`Panel`]).
///
/// # Safety
/// `supported(t)`; W holds n rows of k/32 blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn widen_task<'s>(
    t: GgmlDType,
    w: &[u8],
    (n, k): (usize, usize),
    task: usize,
    Scratch { wp, scales }: &'s mut Scratch,
) -> (usize, Panel<'s>) {
    let nb = k / 32;
    let rb = nb * t.type_size();
    let j0 = task * NP * TASK;
    let panels = (n - j0).div_ceil(NP).min(TASK);
    let (pw, ps) = (k / 4 * NP, nb * NP);
    wp.resize(panels * pw, 0);
    scales.resize(2 * panels * ps, 0.0);
    let (wd, wm) = scales.split_at_mut(panels * ps);
    for pi in 0..panels {
        let (c0, cn) = (j0 + pi * NP, NP.min(n - j0 - pi * NP));
        widen_panel(
            t,
            &w[c0 * rb..(c0 + cn) * rb],
            k,
            &mut wp[pi * pw..(pi + 1) * pw],
            &mut wd[pi * ps..(pi + 1) * ps],
            &mut wm[pi * ps..(pi + 1) * ps],
        );
    }
    (panels, (&wp[..], &wd[..], &wm[..]))
}

/// The blocks of the task after `task` (a thread's tasks run mostly in order), for
/// [`all_rows`] to fetch while this one's rows run: widening otherwise waits on memory,
/// column by column.
fn next_task(t: GgmlDType, w: &[u8], (n, k): (usize, usize), task: usize) -> &[u8] {
    let rb = k / 32 * t.type_size();
    let j0 = (task + 1) * NP * TASK;
    &w[j0.min(n) * rb..(j0 + NP * TASK).min(n) * rb]
}

/// Task `task`: its (up to) 2 panels widened, then every row against them.
///
/// # Safety
/// `supported(t)`; `c` points at C [m, n]; no other task writes this task's columns.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    t: GgmlDType,
    w: &[u8],
    n: usize,
    a: &Rounded,
    c: &SyncPtr,
    accumulate: bool,
    (task, rows): (usize, std::ops::Range<usize>),
    scratch: &mut Scratch,
) {
    let (panels, panel) = widen_task(t, w, (n, a.k), task, scratch);
    let j0 = task * NP * TASK;
    let out = Out {
        c: c.0.add(j0),
        ld: n,
        cols: (n - j0).min(NP * panels),
        accumulate,
    };
    all_rows(
        t == GgmlDType::Q4_1,
        a,
        rows,
        panel,
        out,
        next_task(t, w, (n, a.k), task),
    );
}

/// Every row of `a`, 6 at a time, against a panel pair into `out`: one call, so the
/// per-block dispatch stays inside the vector code (a call per register block cost ~5% of
/// the product). The lines of `next` are prefetched (into L2) along the way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn all_rows(
    q4: bool,
    a: &Rounded,
    rows: std::ops::Range<usize>,
    panel: Panel,
    out: Out,
    next: &[u8],
) {
    for i0 in rows.clone().step_by(MR) {
        prefetch(next, &rows, i0);
        let to = Out {
            c: out.c.add(i0 * out.ld),
            ..out
        };
        row_block(q4, a, i0, panel, to);
    }
}

/// The register block at row i0 (of m)'s share of `bytes`' 64-byte lines, fetched toward L2:
/// spread evenly over the row loop, so the whole slice arrives by its end.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn prefetch(bytes: &[u8], rows: &std::ops::Range<usize>, i0: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let share = bytes.len().div_ceil(64).div_ceil(rows.len().div_ceil(MR));
    let b = (i0 - rows.start) / MR;
    for l in b * share..(b + 1) * share {
        if l * 64 < bytes.len() {
            _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(l * 64) as *const i8);
        }
    }
}

/// Rows i0..i0 + 6 (those `a` has) against a panel pair into `out` (row i0 first).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn row_block(q4: bool, a: &Rounded, i0: usize, panel: Panel, out: Out) {
    let (k, nb) = (a.k, a.k / 32);
    let x = (
        &a.xt[i0 / MR * k / 4 * SLOTS..],
        &a.d[i0 * nb..],
        &a.sums[i0 * nb..],
        &a.extra[i0 * nb..],
    );
    crate::gemm_i16::by_rows!(block, q4, MR.min(a.m - i0), (x, panel, k, out))
}

/// C [m, n] = silu(x·Gᵀ) · (x·Uᵀ) (LLaMA's SwiGLU of the gate and up products, combined by
/// `fused::swiglu_fwd` itself: the separate products' bits) for x rounded once and G, U the
/// raw blocks of two [n, k] matrices of type `t`, n a multiple of 32. Each task widens both
/// matrices' columns and combines a register block's two products while they are in L1, where
/// the separate products wrote two [m, n] results for a third pass to read.
pub fn swiglu_rounded(
    t: GgmlDType,
    (gate, up): (&[u8], &[u8]),
    n: usize,
    a: &Rounded,
    c: &mut [f32],
) -> Result<(), String> {
    check_product("int8 product", t, supported(t), (gate, n), a, c)?;
    check_product("int8 product", t, supported(t), (up, n), a, c)?;
    if !n.is_multiple_of(NP * TASK) {
        return Err(format!(
            "int8 SwiGLU product: {n} columns are not whole 32-column tasks"
        ));
    }
    if a.m == 0 || n == 0 {
        return Ok(());
    }
    let cp = SyncPtr(c.as_mut_ptr());
    crate::halves::for_each_task(a.m, n / (NP * TASK), |task, rows| {
        PAIR.with_borrow_mut(|(sg, su)| {
            // SAFETY: task `task` writes only its own columns of C, in these rows.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                swiglu_task(t, (gate, up), n, a, &cp, (task, rows), (sg, su))
            }
        })
    });
    Ok(())
}

thread_local! {
    static PAIR: std::cell::RefCell<(Scratch, Scratch)> = std::cell::RefCell::default();
}

/// Task `task` of [`swiglu_rounded`]: per register block, the gate and up products into two
/// tiles of 6 × 32, combined by `fused::swiglu_fwd` into C.
///
/// # Safety
/// As [`run_task`]; the task's 32 columns are whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn swiglu_task(
    t: GgmlDType,
    (gate, up): (&[u8], &[u8]),
    n: usize,
    a: &Rounded,
    c: &SyncPtr,
    (task, rows): (usize, std::ops::Range<usize>),
    (sg, su): (&mut Scratch, &mut Scratch),
) {
    const W: usize = NP * TASK;
    let (k, q4) = (a.k, t == GgmlDType::Q4_1);
    let (_, pg) = widen_task(t, gate, (n, k), task, sg);
    let (_, pu) = widen_task(t, up, (n, k), task, su);
    let (mut g, mut u, mut y) = ([0f32; MR * W], [0f32; MR * W], [0f32; MR * W]);
    let tile = |p: &mut [f32; MR * W]| Out {
        c: p.as_mut_ptr(),
        ld: W,
        cols: W,
        accumulate: false,
    };
    let (tg, tu) = (tile(&mut g), tile(&mut u));
    let cj = c.0.add(task * W);
    // Both matrices' next blocks.
    let next = [
        next_task(t, gate, (n, k), task),
        next_task(t, up, (n, k), task),
    ];
    for i0 in rows.clone().step_by(MR) {
        for nx in next {
            prefetch(nx, &rows, i0);
        }
        row_block(q4, a, i0, pg, tg);
        row_block(q4, a, i0, pu, tu);
        let vals = MR.min(a.m - i0) * W;
        crate::fused::swiglu_fwd(&g[..vals], &u[..vals], &mut y[..vals]);
        for (r, row) in y[..vals].chunks_exact(W).enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), cj.add((i0 + r) * n), W);
        }
    }
}

/// A register block's rows: quads [k/4][8 slots], then d, Σx and 128·Σq as [rows][k/32].
type Rows<'a> = (&'a [i32], &'a [f32], &'a [f32], &'a [i32]);
/// Panels: quads [k/4][16] as words, d and m [k/32][16], each panel after the previous.
type Panel<'a> = (&'a [i32], &'a [f32], &'a [f32]);

/// R rows (≤ 6) against one or two panels (`out.cols` ≤ 32 columns).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const R: usize, const Q4: bool>(x: Rows, panel: Panel, k: usize, out: Out) {
    if out.cols <= NP {
        return block_panels::<R, Q4, 1>(x, panel, k, out);
    }
    block_panels::<R, Q4, 2>(x, panel, k, out)
}

/// R rows (≤ 6) against P panels (1 or 2) of 16 columns.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_panels<const R: usize, const Q4: bool, const P: usize>(
    (xq, xd, xs, xc): Rows,
    (wp, wd, wm): Panel,
    k: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    let (pw, ps) = (k / 4 * NP, nb * NP);
    assert!(xq.len() >= k / 4 * SLOTS && xd.len() >= R * nb && xs.len() >= R * nb);
    assert!(xc.len() >= R * nb);
    assert!(wp.len() >= (P - 1) * pw + k / 4 * NP && wd.len() >= P * ps && wm.len() >= P * ps);
    let (xq, wp) = (xq.as_ptr(), wp.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for b in 0..nb {
        let mut s = [[_mm512_setzero_si512(); P]; R];
        for p in b * 8..b * 8 + 8 {
            let w: [__m512i; P] =
                std::array::from_fn(|h| _mm512_loadu_si512(wp.add(h * pw + p * NP) as *const _));
            for (r, s) in s.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32(*xq.add(p * SLOTS + r));
                for h in 0..P {
                    s[h] = _mm512_dpbusd_epi32(s[h], w[h], xv);
                }
            }
        }
        let dw: [__m512; P] =
            std::array::from_fn(|h| _mm512_loadu_ps(wd.as_ptr().add(h * ps + b * NP)));
        for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
            let dx = _mm512_set1_ps(*xd.get_unchecked(r * nb + b));
            let corr = _mm512_set1_epi32(if Q4 { 0 } else { *xc.get_unchecked(r * nb + b) });
            for h in 0..P {
                let dot = if Q4 {
                    s[h]
                } else {
                    _mm512_sub_epi32(s[h], corr)
                };
                acc[h] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), dx), dw[h], acc[h]);
            }
        }
    }
    crate::gemm_i16::finish_zmm::<R, Q4, P>(&acc, xs, wm, ps, nb, out);
}

/// Up to 16 weight rows (`rows`, raw blocks) to a panel: their values as bytes in words
/// [k/4][16] (Q8_0's +128; columns past the rows zero), d and m as [k/32][16].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_panel(
    t: GgmlDType,
    rows: &[u8],
    k: usize,
    wp: &mut [i32],
    wd: &mut [f32],
    wm: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (nb, bb) = (k / 32, t.type_size());
    let cn = rows.len() / (nb * bb);
    assert!(cn <= NP && wp.len() >= k / 4 * NP && wd.len() >= nb * NP && wm.len() >= nb * NP);
    if t == GgmlDType::Q4_1 && cn == NP {
        return widen_q4_1(rows, nb, wp, wd, wm);
    }
    wd.fill(0.0);
    wm.fill(0.0);
    let h2f = |p: *const u8| {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    };
    // A block's 32 values as bytes, 8 words per column: [16 columns][8 words], transposed
    // to [8 quads][16] in two 8×8 halves.
    let mut cols = [0i32; NP * 8];
    for b in 0..nb {
        for j in 0..NP {
            let dst = cols.as_mut_ptr().add(j * 8) as *mut __m256i;
            if j >= cn {
                _mm256_storeu_si256(dst, _mm256_setzero_si256());
                continue;
            }
            let p = rows.as_ptr().add(j * nb * bb + b * bb);
            let v = if t == GgmlDType::Q4_1 {
                // Byte i holds value i (low nibble) and value i + 16 (high nibble).
                let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
                wm[b * NP + j] = h2f(p.add(2));
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            } else {
                let v = _mm256_loadu_si256(p.add(2) as *const __m256i);
                _mm256_xor_si256(v, _mm256_set1_epi8(-128))
            };
            wd[b * NP + j] = h2f(p);
            _mm256_storeu_si256(dst, v);
        }
        let src = cols.as_ptr() as *const f32;
        let out = wp.as_mut_ptr().add(b * 8 * NP) as *mut f32;
        crate::gemm::transpose8(src, 8, out, NP);
        crate::gemm::transpose8(src.add(8 * 8), 8, out.add(8), NP);
    }
}

/// [`widen_panel`] of 16 whole Q4_1 columns on 512-bit registers: per block, each column's
/// nibble words ([`crate::gemm_i16::q4_1_panel`]) split into quads p (low nibbles) and p + 4
/// (high).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn widen_q4_1(rows: &[u8], nb: usize, wp: &mut [i32], wd: &mut [f32], wm: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(wp.len() >= nb * 8 * NP);
    let lo = _mm512_set1_epi8(0x0F);
    crate::gemm_i16::q4_1_panel(rows, nb, (wd, wm), |b, words| {
        let out = wp.as_mut_ptr().add(b * 8 * NP);
        for (p, w) in words.into_iter().enumerate() {
            _mm512_storeu_si512(out.add(p * NP) as *mut _, _mm512_and_si512(w, lo));
            let hi = _mm512_and_si512(_mm512_srli_epi32::<4>(w), lo);
            _mm512_storeu_si512(out.add((p + 4) * NP) as *mut _, hi);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm_i16::tests::{check_formula, Rounding};

    /// Every output is the blockwise integer formula bit for bit (the int16 module's
    /// reference with 8-bit rounding) at the shapes that test runs.
    #[test]
    fn products_are_the_blockwise_integer_formula() {
        if !supported(GgmlDType::Q4_1) {
            eprintln!("note: no AVX-512 VNNI here, the int8 product does not run");
            return;
        }
        check_formula(Rounding::I8, &|t, raw, n, x, k, c, acc| {
            let a = Rounded::new(x, k).unwrap();
            matmul_rounded(t, raw, n, &a, c, acc).unwrap()
        });
    }

    /// The fused SwiGLU product is silu(gate)·up of the two separate products as
    /// `fused::swiglu_fwd` combines them, bit for bit (the same products, the same sigmoid on
    /// 16-lane vectors, the same multiplies): row counts around the 6-row block and one split
    /// in halves, 1–3 tasks of 32 columns, Q4_1 and Q8_0. Columns that are not whole tasks
    /// are refused.
    #[test]
    fn swiglu_products_are_the_separate_products_combined() {
        if !supported(GgmlDType::Q4_1) {
            eprintln!("note: no AVX-512 VNNI here, the int8 product does not run");
            return;
        }
        use crate::gemm_i16::tests::weights;
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, n, k) in [
                (1, 32, 64),
                (5, 64, 32),
                (6, 96, 96),
                (13, 32, 128),
                (20, 64, 64),
                (80, 64, 64),
            ] {
                let (gate, _) = weights(t, n, k, (m * 7 + n) as u64);
                let (up, _) = weights(t, n, k, (m * 11 + k) as u64 + 1);
                let x: Vec<f32> = crate::test_data(m * k, m + n)
                    .iter()
                    .map(|v| v * 3.0)
                    .collect();
                let a = Rounded::new(&x, k).unwrap();
                let (mut g, mut u) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_rounded(t, &gate, n, &a, &mut g, false).unwrap();
                matmul_rounded(t, &up, n, &a, &mut u, false).unwrap();
                let mut want = vec![0f32; m * n];
                crate::fused::swiglu_fwd(&g, &u, &mut want);
                let mut got = vec![f32::NAN; m * n];
                swiglu_rounded(t, (&gate, &up), n, &a, &mut got).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{t:?} m {m} n {n} k {k}");
                assert!(
                    want.iter().any(|&v| v.abs() > 0.1),
                    "{t:?}: products near 0"
                );
            }
        }
        let (w, _) = weights(GgmlDType::Q4_1, 48, 32, 1);
        let a = Rounded::new(&[0.5f32; 64], 32).unwrap();
        let err = swiglu_rounded(GgmlDType::Q4_1, (&w, &w), 48, &a, &mut [0f32; 96]).unwrap_err();
        assert!(err.contains("whole 32-column tasks"), "{err}");
    }

    /// Types other than Q4_1/Q8_0, rows that are not whole blocks and operands shorter than
    /// their shapes are refused.
    #[test]
    fn bad_operands_are_refused() {
        let x = vec![0f32; 64];
        let mut c = vec![0f32; 2];
        let err = matmul(GgmlDType::Q4_0, &[0u8; 36], 1, 32, &x, 2, &mut c, false).unwrap_err();
        assert!(err.contains("unsupported weight type"), "{err}");
        assert!(Rounded::new(&x[..48], 48).is_err());
        if supported(GgmlDType::Q4_1) {
            let err = matmul(GgmlDType::Q4_1, &[0u8; 19], 1, 32, &x, 2, &mut c, false).unwrap_err();
            assert!(err.contains("too short"), "{err}");
            let err = matmul(GgmlDType::Q4_1, &[0u8; 40], 2, 32, &x, 3, &mut c, false).unwrap_err();
            assert!(err.contains("too short"), "{err}");
        }
    }
}
