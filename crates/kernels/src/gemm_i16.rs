//! C [m, n] (+)= A [m, k] · Wᵀ for a frozen W [n, k] kept in Q4_1 or Q8_0 blocks and A rounded
//! to int16 per 32 values: the prompt rows of inference on the Int16 decode path.
//!
//! Why: a prompt is a GEMM, and f32 FMA caps it at 16 multiply-adds per cycle per core.
//! `vpmaddwd` issues on two pipes of Zen 3, one of which the FMAs do not use: 32 int16
//! multiply-adds per cycle (measured on this project's 2-core EPYC: a 6×16 register block ran
//! 159.5 G products/s against 96.9 G for the same block in f32 FMA).
//!
//! Numbers, per output (row i, column j), the same whatever m, n or thread count:
//! each block b's integer dot I_b = Σ q_x·q_w is exact (int32), then
//! `acc = fma(f32(I_b) · d_x[i][b], d_w[j][b], acc)` in block order, and for Q4_1 the offset
//! `off = fma(m_w[j][b], Σx[i][b], off)` in block order (Σx: the block's f32 sum in order), so
//! y = acc + off (+ C when accumulating). |I_b| < 2²⁴ for Q4_1 (32·15·32767), so its f32
//! conversion is exact; a Q8_0 dot can reach 32·128·32767 and rounds once to f32 there.
//!
//! Kernels ([`Kernel`]): AVX2 `vpmaddwd` + `vpaddd` on 8 lanes, or, with AVX-512 VNNI,
//! `vpdpwssd` on 16 lanes (two panels per register block, the pair sums added in one
//! instruction). Both add the same pair products into the same int32 lanes without saturation
//! (no value is -32768, so no pair overflows) and take the same f32 steps lane by lane: the
//! same bits.
//!
//! Layout: lanes are weight columns. Each task widens its columns' blocks to int16 once, as
//! panels of 16 columns holding one 32-bit word (two values, the pair `vpmaddwd` multiplies)
//! per column and pair; a register block of 6 rows × 16 columns broadcasts each row's pair
//! against the panel's two registers. Blocks are stored even values first (0, 2, …, 30,
//! 1, 3, …, 31), the order the decode path rounds activations into; weights are widened into
//! the same order.

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::gemm::SyncPtr;

/// Whether [`matmul`] multiplies blocks of type `t` on this CPU.
pub fn supported(t: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0) && crate::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Columns per panel: two registers of 8 lanes.
const NP: usize = 16;
/// Rows per register block: 12 integer accumulators + 2 panel registers + the broadcast + a
/// product fill the 16 registers.
const MR: usize = 6;
/// Word slots per pair in the rounded rows: the 6 rows of a tile padded to 8, so rounding
/// writes them with 8×8 transposes.
const SLOTS: usize = 8;
/// Panels per task (their int16 values stay in L2 while every row passes).
const TASK: usize = 3;

/// The register kernel a product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx2,
    /// 512-bit `vpdpwssd` (AVX-512F, BW, VNNI).
    Avx512Vnni,
}

impl Kernel {
    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            Kernel::Avx2 => crate::avx2::available(),
            Kernel::Avx512Vnni => {
                crate::avx2::available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The widest this CPU runs, unless `FEDLLM_KERNELS` caps the kernels below AVX-512.
    pub fn best() -> Kernel {
        static B: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *B.get_or_init(|| {
            let wide = crate::isa::selected() >= crate::isa::Isa::Avx512;
            if wide && Kernel::Avx512Vnni.supported() {
                Kernel::Avx512Vnni
            } else {
                Kernel::Avx2
            }
        })
    }

    /// Every kernel this CPU runs (what the tests compare).
    pub fn available() -> Vec<Kernel> {
        [Kernel::Avx2, Kernel::Avx512Vnni]
            .into_iter()
            .filter(|k| k.supported())
            .collect()
    }

    /// The instruction that multiplies its pairs.
    pub fn instruction(self) -> &'static str {
        match self {
            Kernel::Avx2 => "vpmaddwd",
            Kernel::Avx512Vnni => "vpdpwssd",
        }
    }

    /// Panels per register block.
    fn panels(self) -> usize {
        match self {
            Kernel::Avx2 => 1,
            Kernel::Avx512Vnni => 2,
        }
    }
}

/// C [m, n] (row-major) = x · Wᵀ (or C += x · Wᵀ when `accumulate`) for x [m, k] in f32,
/// rounded here (`rounding::round_block_i16`), and W the raw blocks of an [n, k] matrix of
/// type `t` ([`supported`]).
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
    check_input("int16 product", t, x, m, k)?;
    let a = Rounded::new(&x[..m * k], k)?;
    matmul_rounded(Kernel::best(), t, w, n, &a, c, accumulate)
}

/// The checks before rounding x [m, k] for a product with `t` blocks.
pub(crate) fn check_input(
    what: &str,
    t: GgmlDType,
    x: &[f32],
    m: usize,
    k: usize,
) -> Result<(), String> {
    if !matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
        return Err(format!("{what}: unsupported weight type {t:?}"));
    }
    if x.len() < m * k {
        return Err(format!("{what}: x too short for [{m}, {k}]"));
    }
    Ok(())
}

/// The checks of a product of rounded rows `a` with W [n, ·] of `t` blocks into `c` on a
/// kernel this CPU runs (`runs`): the bytes per weight row.
pub(crate) fn check_product(
    what: &str,
    t: GgmlDType,
    runs: bool,
    (w, n): (&[u8], usize),
    a: &Tiles,
    c: &[f32],
) -> Result<usize, String> {
    let (m, k) = (a.m, a.k);
    if !matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
        return Err(format!("{what}: unsupported weight type {t:?}"));
    }
    if !runs {
        return Err(format!(
            "{what}: {t:?} [{n}, {k}] not supported on this CPU"
        ));
    }
    let rb = k / 32 * t.type_size();
    if w.len() < n * rb || c.len() < m * n {
        return Err(format!(
            "{what}: operands too short for [{m}, {k}] · [{n}, {k}]ᵀ"
        ));
    }
    Ok(rb)
}

/// [`matmul`] of rows rounded once ([`Rounded::new`]) on `kernel` ([`Kernel::best`] but in
/// tests): products of the same rows (q, k and v of one input; gate and up) share the rounding.
pub fn matmul_rounded(
    kernel: Kernel,
    t: GgmlDType,
    w: &[u8],
    n: usize,
    a: &Rounded,
    c: &mut [f32],
    accumulate: bool,
) -> Result<(), String> {
    let (m, k) = (a.m, a.k);
    let runs = supported(t) && kernel.supported();
    let rb = check_product("int16 product", t, runs, (w, n), a, c)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cp = SyncPtr(c.as_mut_ptr());
    let shape = Shape {
        t,
        n,
        k,
        m,
        rb,
        kernel,
    };
    crate::halves::for_each_task(m, n.div_ceil(NP * TASK), |task, rows| {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.cols16.resize(NP * k, 0);
            // SAFETY: task `task` writes only its own columns of C, in these rows.
            unsafe { run_task(shape, w, a, &cp, accumulate, (task, rows), scratch) }
        })
    });
    Ok(())
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

#[derive(Clone, Copy)]
struct Shape {
    t: GgmlDType,
    n: usize,
    k: usize,
    m: usize,
    /// Bytes per weight row.
    rb: usize,
    kernel: Kernel,
}

/// A task's buffers, kept by its thread across products (fresh ones per rayon split cost a
/// zeroed allocation each): its panels' words and scales, and the widening's [16][k] scratch.
#[derive(Default)]
struct Scratch {
    wp: Vec<i32>,
    scales: Vec<f32>,
    cols16: Vec<i16>,
}

/// Task `task`: its (up to) 3 panels widened, then the rows `rows` against each.
///
/// # Safety
/// `c` points at C [m, n]; no other task writes this task's columns in these rows.
unsafe fn run_task(
    Shape {
        t,
        n,
        k,
        m,
        rb,
        kernel,
    }: Shape,
    w: &[u8],
    a: &Rounded,
    c: &SyncPtr,
    accumulate: bool,
    (task, rows): (usize, std::ops::Range<usize>),
    Scratch { wp, scales, cols16 }: &mut Scratch,
) {
    let nb = k / 32;
    let j0 = task * NP * TASK;
    let panels = (n - j0).div_ceil(NP).min(TASK);
    wp.resize(panels * k / 2 * NP, 0);
    scales.resize(2 * panels * nb * NP, 0.0);
    let (wd, wm) = scales.split_at_mut(panels * nb * NP);
    let cols = |pi: usize| (j0 + pi * NP, NP.min(n - j0 - pi * NP));
    for pi in 0..panels {
        let (c0, cn) = cols(pi);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported` detected AVX2 and F16C; the rows hold nb whole blocks, the
        // panel buffers k/2·16 words and nb·16 scales.
        widen_panel(
            t,
            &w[c0 * rb..(c0 + cn) * rb],
            k,
            cols16,
            &mut wp[pi * k / 2 * NP..(pi + 1) * k / 2 * NP],
            &mut wd[pi * nb * NP..(pi + 1) * nb * NP],
            &mut wm[pi * nb * NP..(pi + 1) * nb * NP],
        );
    }
    for pi in (0..panels).step_by(kernel.panels()) {
        let (c0, _) = cols(pi);
        let cn: usize = (pi..panels.min(pi + kernel.panels()))
            .map(|p| cols(p).1)
            .sum();
        let panel = (
            &wp[pi * k / 2 * NP..],
            &wd[pi * nb * NP..],
            &wm[pi * nb * NP..],
        );
        for i0 in rows.clone().step_by(MR) {
            let x = (
                &a.xt[i0 / MR * k / 2 * SLOTS..],
                &a.d[i0 * nb..],
                &a.sums[i0 * nb..],
            );
            let out = Out {
                c: c.0.add(i0 * n + c0),
                ld: n,
                cols: cn,
                accumulate,
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the kernel's features were detected; the rows hold k values and nb
            // scales each, the panels k/2·16 words and nb·16 scales; `out` is this task's
            // part of C.
            dispatch(
                kernel,
                t == GgmlDType::Q4_1,
                MR.min(m - i0),
                x,
                panel,
                k,
                out,
            );
        }
    }
}

#[derive(Clone, Copy)]
/// Where a register block's results go: `cols` columns of rows at stride `ld`.
pub(crate) struct Out {
    pub(crate) c: *mut f32,
    pub(crate) ld: usize,
    pub(crate) cols: usize,
    pub(crate) accumulate: bool,
}

/// Rows x [m, k] rounded for [`matmul_rounded`]: pairs of int16 values as words, 6 rows
/// interleaved — [m/6 (rounded up)][k/2][8] ([`Tiles`]) — and each block's d and f32 Σx.
pub struct Rounded(Tiles);

impl std::ops::Deref for Rounded {
    type Target = Tiles;
    fn deref(&self) -> &Tiles {
        &self.0
    }
}

impl Rounded {
    /// x [m, k] (k a multiple of 32; m = x.len() / k), rows of 6 on rayon's threads.
    pub fn new(x: &[f32], k: usize) -> Result<Rounded, String> {
        #[cfg(target_arch = "x86_64")]
        if !crate::avx2::available() {
            return Err("int16 product: this CPU has no AVX2".into());
        }
        let tiles = round_tiles::<16>("int16 product", x, k, &|row, words, d, sums, extra| {
            // Two int16 values per word as `vpmaddwd` reads them (the first in the low half):
            // the values' memory order, little-endian.
            // SAFETY: k/32·16 i32 are k i16, aligned for i16.
            let q = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut i16, 2 * words.len())
            };
            crate::rounding::round_row_i16(row, q, d);
            crate::rounding::block_sums(row, sums);
            extra.fill(0);
        })?;
        Ok(Rounded(tiles))
    }
}

/// Rows of an integer GEMM's activations, rounded: each 32-value block as W words, a tile's
/// 6 rows interleaved — `xt` [m/6 (rounded up)][k/32·W][8], slots 6, 7 and past m unused (one
/// row's words sit at a constant distance from the next row's, so a register block addresses
/// its 6 rows from one pointer) — and per block [m][k/32]: d, the f32 Σx (summed in order) and
/// an integer of the rounding's own (`gemm_i8`: 128·Σq).
pub struct Tiles {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) xt: Vec<i32>,
    pub(crate) d: Vec<f32>,
    pub(crate) sums: Vec<f32>,
    pub(crate) extra: Vec<i32>,
}

/// A row rounder: a row's k values to its blocks' W words each ([k/32][W]), each block's d,
/// the sum its Q4_1 offsets multiply, and the rounding's own integer.
pub(crate) type RoundRow<'a> =
    &'a (dyn Fn(&[f32], &mut [i32], &mut [f32], &mut [f32], &mut [i32]) + Sync);

/// x [m, k] rounded by `round` tile by tile (6 rows) on rayon's threads, each block's words
/// [8 rows][W] transposed into [W][8 slots]. `what` names the product in errors.
pub(crate) fn round_tiles<const W: usize>(
    what: &str,
    x: &[f32],
    k: usize,
    round: RoundRow,
) -> Result<Tiles, String> {
    if k == 0 || !k.is_multiple_of(32) || !x.len().is_multiple_of(k) {
        return Err(format!(
            "{what}: {} values are not rows of k = {k} (a multiple of 32)",
            x.len()
        ));
    }
    let (m, nb) = (x.len() / k, k / 32);
    // SAFETY: every row's blocks are written below; slots 6 and 7 (and the last tile's past
    // m) are never read (a register block runs only its m's rows).
    let mut r = unsafe {
        Tiles {
            m,
            k,
            xt: crate::uninit(m.div_ceil(MR) * nb * W * SLOTS),
            d: crate::uninit(m * nb),
            sums: crate::uninit(m * nb),
            extra: crate::uninit(m * nb),
        }
    };
    // Split where the products that read the tiles split their rows (`halves`, a multiple
    // of 6), so each core rounds the rows it then multiplies.
    let s = crate::halves::split(m);
    let (xt0, xt1) = r.xt.split_at_mut(s.div_ceil(MR) * nb * W * SLOTS);
    let (d0, d1) = r.d.split_at_mut(s * nb);
    let (s0, s1) = r.sums.split_at_mut(s * nb);
    let (e0, e1) = r.extra.split_at_mut(s * nb);
    let (x0, x1) = x.split_at(s * k);
    if s == m {
        tiles::<W>((xt0, d0, s0, e0), x0, k, round);
    } else {
        rayon::join(
            || tiles::<W>((xt0, d0, s0, e0), x0, k, round),
            || tiles::<W>((xt1, d1, s1, e1), x1, k, round),
        );
    }
    Ok(r)
}

/// Part of a [`Tiles`]' buffers: words, d, sums and the rounding's integers.
type TilePart<'a> = (&'a mut [i32], &'a mut [f32], &'a mut [f32], &'a mut [i32]);

/// Part of [`round_tiles`]: rows x (whole tiles but the last) into their tiles' buffers.
fn tiles<const W: usize>((xt, d, sums, extra): TilePart, x: &[f32], k: usize, round: RoundRow) {
    let nb = k / 32;
    xt.par_chunks_mut(nb * W * SLOTS)
        .zip(d.par_chunks_mut(MR * nb).zip(sums.par_chunks_mut(MR * nb)))
        .zip(extra.par_chunks_mut(MR * nb).zip(x.par_chunks(MR * k)))
        .for_each(|((xt, (d, sums)), (extra, x))| {
            // The tile's rows as words [8 rows][k/32][W] (rows past the tile's stay unset:
            // they fill slots never read), then each block's [8][W] transposed.
            // SAFETY: as above, unset words land only in unread slots.
            let mut words: Vec<i32> = unsafe { crate::uninit(SLOTS * nb * W) };
            for (r, row) in x.chunks_exact(k).enumerate() {
                let at = r * nb;
                let wr = &mut words[r * nb * W..(r + 1) * nb * W];
                let (d, sums) = (&mut d[at..at + nb], &mut sums[at..at + nb]);
                round(row, wr, d, sums, &mut extra[at..at + nb]);
            }
            for b in 0..nb {
                let dst = &mut xt[b * W * SLOTS..(b + 1) * W * SLOTS];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the callers run only where AVX2 was detected; `words` holds 8 rows
                // of nb·W words and `dst` W × 8.
                unsafe {
                    let src = words.as_ptr().add(b * W) as *const f32;
                    let out = dst.as_mut_ptr() as *mut f32;
                    for h in 0..W / 8 {
                        let (s, o) = (src.add(8 * h), out.add(8 * h * SLOTS));
                        crate::gemm::transpose8(s, nb * W, o, SLOTS);
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                for (i, w) in dst.iter_mut().enumerate() {
                    *w = words[(i % SLOTS) * nb * W + b * W + i / SLOTS];
                }
            }
        });
}

/// A register block's rows: pairs [k/2][8 slots] (interleaved), d and Σx [rows][k/32].
type Rows<'a> = (&'a [i32], &'a [f32], &'a [f32]);
/// A panel: pairs [k/2][16] as words, d and m [k/32][16].
type Panel<'a> = (&'a [i32], &'a [f32], &'a [f32]);

#[cfg(target_arch = "x86_64")]
unsafe fn dispatch(
    kernel: Kernel,
    q4: bool,
    rows: usize,
    x: Rows,
    panel: Panel,
    k: usize,
    out: Out,
) {
    if kernel == Kernel::Avx512Vnni {
        return dispatch_vnni(q4, rows, x, panel, k, out);
    }
    dispatch_avx2(q4, rows, x, panel, k, out)
}

/// `$kernel::<R, Q4>$args` for the block's row count (1–6) and weight type.
macro_rules! by_rows {
    ($kernel:ident, $q4:expr, $rows:expr, $args:tt) => {
        $crate::gemm_i16::by_rows!(@ $kernel, $q4, $rows, $args, 1 2 3 4 5 6)
    };
    (@ $kernel:ident, $q4:expr, $rows:expr, $args:tt, $($r:literal)*) => {
        match ($rows, $q4) {
            $(($r, true) => $kernel::<$r, true> $args,
              ($r, false) => $kernel::<$r, false> $args,)*
            _ => unreachable!("at most {MR} rows"),
        }
    };
}
pub(crate) use by_rows;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dispatch_avx2(q4: bool, rows: usize, x: Rows, panel: Panel, k: usize, out: Out) {
    by_rows!(block, q4, rows, (x, panel, k, out))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dispatch_vnni(q4: bool, rows: usize, x: Rows, panel: Panel, k: usize, out: Out) {
    by_rows!(block_vnni, q4, rows, (x, panel, k, out))
}

/// R rows (≤ 6) against one panel of 16 columns.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const R: usize, const Q4: bool>(
    (xq, xd, xs): Rows,
    (wp, wd, wm): Panel,
    k: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    assert!(xq.len() >= k / 2 * SLOTS && xd.len() >= R * nb && xs.len() >= R * nb);
    assert!(wp.len() >= k / 2 * NP && wd.len() >= nb * NP && wm.len() >= nb * NP);
    let (xq, wp) = (xq.as_ptr(), wp.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        let mut s = [[_mm256_setzero_si256(); 2]; R];
        for p in b * 16..b * 16 + 16 {
            let w0 = _mm256_loadu_si256(wp.add(p * NP) as *const __m256i);
            let w1 = _mm256_loadu_si256(wp.add(p * NP + 8) as *const __m256i);
            for (r, s) in s.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(*xq.add(p * SLOTS + r));
                s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(w0, xv));
                s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(w1, xv));
            }
        }
        let dw = [
            _mm256_loadu_ps(wd.as_ptr().add(b * NP)),
            _mm256_loadu_ps(wd.as_ptr().add(b * NP + 8)),
        ];
        for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
            let dx = _mm256_set1_ps(*xd.get_unchecked(r * nb + b));
            for h in 0..2 {
                acc[h] =
                    _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[h]), dx), dw[h], acc[h]);
            }
        }
    }
    // Q4_1's offsets, all rows' chains side by side (each still in block order).
    let mut off = [[_mm256_setzero_ps(); 2]; R];
    if Q4 {
        for b in 0..nb {
            let m = [
                _mm256_loadu_ps(wm.as_ptr().add(b * NP)),
                _mm256_loadu_ps(wm.as_ptr().add(b * NP + 8)),
            ];
            for (r, off) in off.iter_mut().enumerate() {
                let sx = _mm256_set1_ps(*xs.get_unchecked(r * nb + b));
                for h in 0..2 {
                    off[h] = _mm256_fmadd_ps(m[h], sx, off[h]);
                }
            }
        }
    }
    for (r, (acc, off)) in acc.iter().zip(&off).enumerate() {
        let y = if Q4 {
            [_mm256_add_ps(acc[0], off[0]), _mm256_add_ps(acc[1], off[1])]
        } else {
            *acc
        };
        let dst = out.c.add(r * out.ld);
        if out.cols == NP {
            for (h, y) in y.iter().enumerate() {
                let d = dst.add(8 * h);
                let v = if out.accumulate {
                    _mm256_add_ps(_mm256_loadu_ps(d), *y)
                } else {
                    *y
                };
                _mm256_storeu_ps(d, v);
            }
        } else {
            let mut tmp = [0f32; NP];
            _mm256_storeu_ps(tmp.as_mut_ptr(), y[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), y[1]);
            for (j, v) in tmp.iter().take(out.cols).enumerate() {
                let d = dst.add(j);
                *d = if out.accumulate { *d + v } else { *v };
            }
        }
    }
}

/// R rows (≤ 6) against two consecutive panels (`out.cols` ≤ 32 columns; a second panel
/// with no columns is skipped), 16 lanes each: [`block`]'s integers and f32 steps per lane.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_vnni<const R: usize, const Q4: bool>(x: Rows, panel: Panel, k: usize, out: Out) {
    if out.cols <= NP {
        return block_vnni_panels::<R, Q4, 1>(x, panel, k, out);
    }
    block_vnni_panels::<R, Q4, 2>(x, panel, k, out)
}

/// [`block_vnni`] over P panels (1 or 2): 12 int32 sums + 12 f32 chains + 2 panel registers
/// in the 32 registers at P = 2 and 6 rows.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_vnni_panels<const R: usize, const Q4: bool, const P: usize>(
    (xq, xd, xs): Rows,
    (wp, wd, wm): Panel,
    k: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let nb = k / 32;
    // Distances between consecutive panels: words, scales.
    let (pw, ps) = (k / 2 * NP, nb * NP);
    assert!(xq.len() >= k / 2 * SLOTS && xd.len() >= R * nb && xs.len() >= R * nb);
    assert!(wp.len() >= P * pw && wd.len() >= P * ps && wm.len() >= P * ps);
    let (xq, wp) = (xq.as_ptr(), wp.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for b in 0..nb {
        let mut s = [[_mm512_setzero_si512(); P]; R];
        for p in b * 16..b * 16 + 16 {
            let w: [__m512i; P] =
                std::array::from_fn(|h| _mm512_loadu_si512(wp.add(h * pw + p * NP) as *const _));
            for (r, s) in s.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32(*xq.add(p * SLOTS + r));
                for h in 0..P {
                    s[h] = _mm512_dpwssd_epi32(s[h], w[h], xv);
                }
            }
        }
        let dw: [__m512; P] =
            std::array::from_fn(|h| _mm512_loadu_ps(wd.as_ptr().add(h * ps + b * NP)));
        for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
            let dx = _mm512_set1_ps(*xd.get_unchecked(r * nb + b));
            for h in 0..P {
                acc[h] =
                    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[h]), dx), dw[h], acc[h]);
            }
        }
    }
    finish_zmm::<R, Q4, P>(&acc, xs, wm, ps, nb, out);
}

/// A 512-bit register block's end: Q4_1's offsets fma(m_w, Σx, off) (each row's chain in
/// block order, all side by side) added to `acc`, then R rows × P panels of 16 columns to
/// `out` (masked past `out.cols`). `wm` holds the panels' m at distance `ps`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn finish_zmm<const R: usize, const Q4: bool, const P: usize>(
    acc: &[[std::arch::x86_64::__m512; P]; R],
    xs: &[f32],
    wm: &[f32],
    ps: usize,
    nb: usize,
    out: Out,
) {
    use std::arch::x86_64::*;
    let mut off = [[_mm512_setzero_ps(); P]; R];
    if Q4 {
        for b in 0..nb {
            let m: [__m512; P] =
                std::array::from_fn(|h| _mm512_loadu_ps(wm.as_ptr().add(h * ps + b * NP)));
            for (r, off) in off.iter_mut().enumerate() {
                let sx = _mm512_set1_ps(*xs.get_unchecked(r * nb + b));
                for h in 0..P {
                    off[h] = _mm512_fmadd_ps(m[h], sx, off[h]);
                }
            }
        }
    }
    for (r, (acc, off)) in acc.iter().zip(&off).enumerate() {
        for h in 0..P {
            let y = if Q4 {
                _mm512_add_ps(acc[h], off[h])
            } else {
                acc[h]
            };
            let cols = out.cols.saturating_sub(h * NP).min(NP);
            let mask: __mmask16 = if cols == NP { !0 } else { (1u16 << cols) - 1 };
            let d = out.c.add(r * out.ld + h * NP);
            let v = if out.accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, d), y)
            } else {
                y
            };
            _mm512_mask_storeu_ps(d, mask, v);
        }
    }
}

/// The blocks of 16 whole Q4_1 columns (`rows`, nb blocks each) in order: `put(b, words)`
/// stores block b's values, where register q of `words` holds each column's q-th word of
/// nibble bytes (bytes 4q to 4q + 3: values 4q.. in the low nibbles, 4q + 16.. in the high),
/// column j in lane j; d and m go to `wd` and `wm` as [k/32][16]. Each column's four words
/// sit in one 128-bit lane (column 4L + i in lane L of register i), and a 4×4 word transpose
/// per lane puts word q of the 16 columns in order in one register; d and m come by one
/// gather. The int8 and int16 GEMMs' panels differ only in `put`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(crate) unsafe fn q4_1_panel(
    rows: &[u8],
    nb: usize,
    (wd, wm): (&mut [f32], &mut [f32]),
    mut put: impl FnMut(usize, [std::arch::x86_64::__m512i; 4]),
) {
    use std::arch::x86_64::*;
    const BB: usize = 20;
    let rb = nb * BB;
    assert!(rows.len() >= NP * rb && wd.len() >= nb * NP && wm.len() >= nb * NP);
    let at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let at = _mm512_mullo_epi32(at, _mm512_set1_epi32(rb as i32));
    for b in 0..nb {
        let base = rows.as_ptr().add(b * BB);
        let col = |j: usize| _mm_loadu_si128(base.add(j * rb + 4) as *const __m128i);
        let lanes: [__m512i; 4] = std::array::from_fn(|i| {
            let v = _mm512_castsi128_si512(col(i));
            let v = _mm512_inserti32x4::<1>(v, col(4 + i));
            let v = _mm512_inserti32x4::<2>(v, col(8 + i));
            _mm512_inserti32x4::<3>(v, col(12 + i))
        });
        let t0 = _mm512_unpacklo_epi32(lanes[0], lanes[1]);
        let t1 = _mm512_unpackhi_epi32(lanes[0], lanes[1]);
        let t2 = _mm512_unpacklo_epi32(lanes[2], lanes[3]);
        let t3 = _mm512_unpackhi_epi32(lanes[2], lanes[3]);
        let words = [
            _mm512_unpacklo_epi64(t0, t2),
            _mm512_unpackhi_epi64(t0, t2),
            _mm512_unpacklo_epi64(t1, t3),
            _mm512_unpackhi_epi64(t1, t3),
        ];
        put(b, words);
        // d (low half) and m (high half) of each column's first word.
        let dm = _mm512_i32gather_epi32::<1>(at, base as *const i32);
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
        _mm512_storeu_ps(wd.as_mut_ptr().add(b * NP), d);
        _mm512_storeu_ps(wm.as_mut_ptr().add(b * NP), m);
    }
}

/// [`widen_panel`] of 16 whole Q4_1 columns on 512-bit registers, the same words: per block,
/// word p of a column pairs values (4p, 4p + 2) for p < 4, (4p, 4p + 2) of the high nibbles
/// for p in 4..8 (values 16..31), then (4p' + 1, 4p' + 3) the same way for p = 8 + p' — the
/// even-then-odd order `widen_block` gives — each from one nibble word ([`q4_1_panel`]) by
/// a shift and a mask. The scalar path took 7.6% of an int16 prefill once each core widened
/// every panel for its own half of the rows (`halves`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn widen_q4_1(rows: &[u8], nb: usize, wp: &mut [i32], wd: &mut [f32], wm: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(wp.len() >= nb * 16 * NP);
    let pair = _mm512_set1_epi32(0x000F_000F);
    q4_1_panel(rows, nb, (wd, wm), |b, words| {
        let out = wp.as_mut_ptr().add(b * 16 * NP);
        for (q, w) in words.into_iter().enumerate() {
            let put = |p: usize, v: __m512i| {
                _mm512_storeu_si512(out.add(p * NP) as *mut _, _mm512_and_si512(v, pair))
            };
            put(q, w);
            put(4 + q, _mm512_srli_epi32::<4>(w));
            put(8 + q, _mm512_srli_epi32::<8>(w));
            put(12 + q, _mm512_srli_epi32::<12>(w));
        }
    });
}

/// Up to 16 weight rows (`rows`, raw blocks) to a panel: their values as words [k/2][16]
/// (columns past the rows zero), d and m as [k/32][16]. `cols16` is scratch for [16][k].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_panel(
    t: GgmlDType,
    rows: &[u8],
    k: usize,
    cols16: &mut [i16],
    wp: &mut [i32],
    wd: &mut [f32],
    wm: &mut [f32],
) {
    let (nb, bb) = (k / 32, t.type_size());
    let cn = rows.len() / (nb * bb);
    assert!(cn <= NP && cols16.len() >= NP * k && wp.len() >= k / 2 * NP);
    assert!(wd.len() >= nb * NP && wm.len() >= nb * NP);
    if t == GgmlDType::Q4_1
        && cn == NP
        && crate::has_avx512()
        && is_x86_feature_detected!("avx512bw")
    {
        return widen_q4_1(rows, nb, wp, wd, wm);
    }
    cols16[cn * k..NP * k].fill(0);
    wd.fill(0.0);
    wm.fill(0.0);
    for (j, row) in rows.chunks_exact(nb * bb).enumerate() {
        for (b, blk) in row.chunks_exact(bb).enumerate() {
            let (d, m) = widen_block(t, blk, &mut cols16[j * k + b * 32..j * k + b * 32 + 32]);
            wd[b * NP + j] = d;
            wm[b * NP + j] = m;
        }
    }
    // [16 columns][k/2 words] → [k/2][16], 8×8 words at a time.
    let src = cols16.as_ptr() as *const f32;
    let dst = wp.as_mut_ptr() as *mut f32;
    for g in 0..2 {
        for p0 in (0..k / 2).step_by(8) {
            crate::gemm::transpose8(
                src.add(g * 8 * (k / 2) + p0),
                k / 2,
                dst.add(p0 * NP + 8 * g),
                NP,
            );
        }
    }
}

/// One weight block to 32 int16 values (even values first): its (d, m) (m = 0 for Q8_0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_block(t: GgmlDType, blk: &[u8], q: &mut [i16]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let q4 = t == GgmlDType::Q4_1;
    assert!(blk.len() >= t.type_size() && q.len() >= 32);
    // Within 16 bytes: the even ones, then the odd ones.
    let split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let h2f = |p: *const u8| {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    };
    let p = blk.as_ptr();
    // Values 0–15 and 16–31 as bytes.
    let (lo, hi, m) = if q4 {
        let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
        let nib = _mm_set1_epi8(0x0F);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), nib);
        (_mm_and_si128(qs, nib), hi, h2f(p.add(2)))
    } else {
        let lo = _mm_loadu_si128(p.add(2) as *const __m128i);
        (lo, _mm_loadu_si128(p.add(18) as *const __m128i), 0.0)
    };
    let (lo, hi) = (_mm_shuffle_epi8(lo, split), _mm_shuffle_epi8(hi, split));
    let (even, odd) = (_mm_unpacklo_epi64(lo, hi), _mm_unpackhi_epi64(lo, hi));
    let widen = |v: __m128i| {
        if q4 {
            _mm256_cvtepu8_epi16(v)
        } else {
            _mm256_cvtepi8_epi16(v)
        }
    };
    let dst = q.as_mut_ptr() as *mut __m256i;
    _mm256_storeu_si256(dst, widen(even));
    _mm256_storeu_si256(dst.add(1), widen(odd));
    (h2f(p), m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use half::f16;

    /// Deterministic pseudo-random u64s (SplitMix64).
    fn stream(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Raw blocks of an [n, k] matrix and its values as (d, m, q) per block, q in natural
    /// order. Q8_0's first row holds only 127s: with activations all at one magnitude its
    /// block dots reach 32·127·32767 > 2²⁴, where the f32 conversion rounds.
    #[allow(clippy::type_complexity)]
    pub(crate) fn weights(
        t: GgmlDType,
        n: usize,
        k: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<(f32, f32, [i32; 32])>) {
        let mut r = stream(seed);
        let (mut raw, mut vals) = (Vec::new(), Vec::new());
        for blk in 0..n * k / 32 {
            let d = f16::from_f32((r() % 1000) as f32 / 37_000.0 + 1e-4);
            let m = f16::from_f32(-((r() % 1000) as f32) / 9_000.0);
            let mut q = [0i32; 32];
            raw.extend_from_slice(&d.to_bits().to_le_bytes());
            if t == GgmlDType::Q4_1 {
                raw.extend_from_slice(&m.to_bits().to_le_bytes());
                let mut bytes = [0u8; 16];
                for (j, b) in bytes.iter_mut().enumerate() {
                    *b = (r() & 0xFF) as u8;
                    q[j] = (*b & 15) as i32;
                    q[j + 16] = (*b >> 4) as i32;
                }
                raw.extend_from_slice(&bytes);
                vals.push((d.to_f32(), m.to_f32(), q));
            } else {
                for v in q.iter_mut() {
                    let b = if blk < k / 32 {
                        127
                    } else {
                        (r() & 0xFF) as u8
                    };
                    raw.push(b);
                    *v = b as i8 as i32;
                }
                vals.push((d.to_f32(), 0.0, q));
            }
        }
        (raw, vals)
    }

    /// How the reference rounds activations: this module's int16 (stored even values first)
    /// or `gemm_i8`'s int8 (natural order).
    #[derive(Clone, Copy)]
    pub(crate) enum Rounding {
        I16,
        I8,
    }

    /// The formula of the module doc, one output at a time: x rounded by the scalar rounding
    /// (its layout undone: natural order), integer dots in i64, then the f32 steps in order.
    fn reference(
        rounding: Rounding,
        t: GgmlDType,
        w: &[(f32, f32, [i32; 32])],
        x: &[f32],
        (m, n, k): (usize, usize, usize),
    ) -> Vec<f32> {
        let nb = k / 32;
        let (mut xq, mut xd) = (vec![0i32; m * k], vec![0f32; m * nb]);
        for (b, blk) in x.chunks_exact(32).enumerate() {
            let q = &mut xq[b * 32..b * 32 + 32];
            xd[b] = match rounding {
                Rounding::I16 => {
                    let mut q16 = [0i16; 32];
                    let d = crate::rounding::round_block_i16(blk, &mut q16, false);
                    for (pos, v) in q16.iter().enumerate() {
                        let orig = if pos < 16 {
                            2 * pos
                        } else {
                            2 * (pos - 16) + 1
                        };
                        q[orig] = *v as i32;
                    }
                    d
                }
                Rounding::I8 => crate::rounding::round_levels(blk, 127.0, |i, r| q[i] = r),
            };
        }
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut acc, mut off) = (0f32, 0f32);
                for b in 0..nb {
                    let (dw, mw, q) = &w[j * nb + b];
                    let xs = &xq[i * k + b * 32..i * k + b * 32 + 32];
                    let dot: i64 = q.iter().zip(xs).map(|(a, b)| *a as i64 * *b as i64).sum();
                    acc = ((dot as i32 as f32) * xd[i * nb + b]).mul_add(*dw, acc);
                    // Q4_1's offsets multiply the block's sum: Σx in order (int16), or the
                    // rounded values' d·Σq (int8: the exact sum of what the dots multiply).
                    let sum: f32 = match rounding {
                        Rounding::I16 => x[i * k + b * 32..i * k + b * 32 + 32].iter().sum(),
                        Rounding::I8 => xd[i * nb + b] * xs.iter().sum::<i32>() as f32,
                    };
                    off = mw.mul_add(sum, off);
                }
                y[i * n + j] = if t == GgmlDType::Q4_1 { acc + off } else { acc };
            }
        }
        y
    }

    /// A product under test: (t, raw, n, x, k, c, accumulate).
    pub(crate) type Product<'a> =
        &'a dyn Fn(GgmlDType, &[u8], usize, &[f32], usize, &mut [f32], bool);

    /// `product` is the blockwise integer formula bit for bit, for Q4_1 and Q8_0, row counts
    /// around the 6-row register block, column counts around the 16-column panel, the
    /// 32-column pair of panels (a partial second one) and the 48-column task, and a count
    /// split in two halves of rows, with and without accumulation; every fourth row is all
    /// 1s (every value at the top level).
    pub(crate) fn check_formula(rounding: Rounding, product: Product) {
        for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (m, n, k) in [
                (1, 1, 32),
                (5, 7, 96),
                (3, 20, 64),
                (6, 48, 64),
                (7, 30, 32),
                (13, 50, 32),
                (40, 97, 160),
                // Past 72 rows: two halves of rows (`halves`), the second ending mid-block.
                (77, 50, 64),
            ] {
                let (raw, w) = weights(t, n, k, (m * 131 + n * 7 + k) as u64);
                let x: Vec<f32> = crate::test_data(m * k, m + n)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match (i / k) % 4 {
                        3 => 1.0,
                        r => v * (1 + r * 40) as f32,
                    })
                    .collect();
                let want = reference(rounding, t, &w, &x, (m, n, k));
                let mut got = vec![f32::NAN; m * n];
                product(t, &raw, n, &x, k, &mut got, false);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{t:?} m={m} n={n} k={k}");
                let base: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.25 - 3.0).collect();
                let mut acc = base.clone();
                product(t, &raw, n, &x, k, &mut acc, true);
                let sum: Vec<f32> = base.iter().zip(&want).map(|(b, w)| b + w).collect();
                assert_eq!(
                    bits(&acc),
                    bits(&sum),
                    "{t:?} m={m} n={n} k={k} accumulating"
                );
            }
        }
    }

    /// Every output is the blockwise integer formula bit for bit on every kernel this CPU
    /// runs ([`check_formula`]'s shapes).
    #[test]
    fn products_are_the_blockwise_integer_formula() {
        if !supported(GgmlDType::Q4_1) {
            eprintln!("no AVX2: the int16 product does not run here");
            return;
        }
        let kernels = Kernel::available();
        if !kernels.contains(&Kernel::Avx512Vnni) {
            eprintln!("no AVX-512 VNNI: only the AVX2 kernel runs here");
        }
        for kernel in kernels {
            eprintln!("kernel {kernel:?}");
            check_formula(Rounding::I16, &|t, raw, n, x, k, c, acc| {
                let a = Rounded::new(x, k).unwrap();
                matmul_rounded(kernel, t, raw, n, &a, c, acc).unwrap()
            });
        }
    }

    /// Types other than Q4_1/Q8_0 and operands shorter than their shapes are refused.
    #[test]
    fn bad_operands_are_refused() {
        let x = vec![0f32; 64];
        let mut c = vec![0f32; 2];
        let err = matmul(GgmlDType::Q4_0, &[0u8; 36], 1, 32, &x, 2, &mut c, false).unwrap_err();
        assert!(err.contains("unsupported weight type"), "{err}");
        if supported(GgmlDType::Q4_1) {
            let err = matmul(GgmlDType::Q4_1, &[0u8; 19], 1, 32, &x, 2, &mut c, false).unwrap_err();
            assert!(err.contains("too short"), "{err}");
            let err = matmul(GgmlDType::Q4_1, &[0u8; 40], 2, 32, &x, 3, &mut c, false).unwrap_err();
            assert!(err.contains("too short"), "{err}");
        }
    }
}
