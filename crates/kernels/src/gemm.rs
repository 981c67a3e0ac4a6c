//! C[m, n] = A[m, k] · B[k, n] with bf16 operands and f32 accumulation.
//!
//! A (activations or output gradients) is rounded to bf16 once, padded to whole 32×32 tiles.
//! B (a frozen weight) is never held in a packed copy: the driver walks 32-column panels, and
//! each thread writes the panel it needs into a small buffer in the pair-interleaved ("VNNI")
//! layout both `tdpbf16ps` and `vdpbf16ps` read, dequantizing GGUF blocks on the way. So a
//! quantized base model stays quantized in memory: the weight's bf16 form exists one panel
//! (≤ k·64 bytes) per thread at a time. Panels run in parallel (rayon), each over all rows of A.

use candle_core::quantized::{k_quants, GgmlDType, GgmlType};
use rayon::prelude::*;

use crate::bf16;
use crate::isa::Isa;
use crate::micro;

/// Panel width (columns of B per task) and row block of A: two 16×16 AMX tiles each way.
pub const NB: usize = 32;
pub const MB: usize = 32;
/// Reduction step of one AMX tile (32 bf16 = 64 bytes per row).
pub const KB: usize = 32;

pub fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// The left operand, row-major [m, k].
#[derive(Clone, Copy)]
pub enum ASrc<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

/// The right operand B [k, n], as stored by its owner.
#[derive(Clone, Copy)]
pub enum BSrc<'a> {
    /// Dense row-major matrix `data` [rows, cols]; `t` = B is its transpose (B = Mᵀ, so
    /// k = cols, n = rows: a Linear's forward, where M = W [out, in]).
    F32 {
        data: &'a [f32],
        rows: usize,
        cols: usize,
        t: bool,
    },
    Bf16 {
        data: &'a [u16],
        rows: usize,
        cols: usize,
        t: bool,
    },
    /// GGUF-quantized matrix [rows, cols], each row a run of blocks along `cols`.
    Quant {
        dtype: GgmlDType,
        data: &'a [u8],
        rows: usize,
        cols: usize,
        t: bool,
    },
}

impl BSrc<'_> {
    /// (k, n) of B.
    pub fn kn(&self) -> (usize, usize) {
        let (r, c, t) = match *self {
            BSrc::F32 { rows, cols, t, .. } => (rows, cols, t),
            BSrc::Bf16 { rows, cols, t, .. } => (rows, cols, t),
            BSrc::Quant { rows, cols, t, .. } => (rows, cols, t),
        };
        if t {
            (c, r)
        } else {
            (r, c)
        }
    }

    fn check(&self) -> Result<(), String> {
        let (len, r, c, what) = match *self {
            BSrc::F32 {
                data, rows, cols, ..
            } => (data.len(), rows, cols, rows * cols),
            BSrc::Bf16 {
                data, rows, cols, ..
            } => (data.len(), rows, cols, rows * cols),
            BSrc::Quant {
                dtype,
                data,
                rows,
                cols,
                ..
            } => {
                let bs = dtype.block_size();
                if !quant_supported(dtype) || cols % bs != 0 {
                    return Err(format!(
                        "unsupported quantized weight {dtype:?} [{rows}, {cols}]"
                    ));
                }
                (data.len(), rows, cols, rows * cols / bs * dtype.type_size())
            }
        };
        if len < what {
            return Err(format!(
                "weight [{r}, {c}] needs {what} elements/bytes, has {len}"
            ));
        }
        Ok(())
    }

    /// Calls `put(kk - k0, j - j0, B[kk][j])` for kk in k0..k0+kc, j in j0..j0+cols (all within
    /// B), dequantizing GGUF blocks on the way.
    fn visit(
        &self,
        (j0, cols): (usize, usize),
        (k0, kc): (usize, usize),
        scratch: &mut Vec<f32>,
        mut put: impl FnMut(usize, usize, f32),
    ) {
        // Rows of the stored matrix M hold B's columns when B = Mᵀ, else its rows: read each
        // wanted row's range [lo, lo + len) once, in order.
        let t = !self.row_major();
        let ((r0, rows), lo, len) = if t {
            ((j0, cols), k0, kc)
        } else {
            ((k0, kc), j0, cols)
        };
        let bs = self.block_len();
        scratch.resize(len + ((lo + len).div_ceil(bs) - lo / bs) * bs, 0.0);
        let (dst, tmp) = scratch.split_at_mut(len);
        for r in 0..rows {
            self.row_range(r0 + r, lo, tmp, dst);
            for (i, &v) in dst.iter().enumerate() {
                if t {
                    put(i, r, v)
                } else {
                    put(r, i, v)
                }
            }
        }
    }

    /// Columns j0..j0+NB of B as bf16 pairs: `out` [2][kp/2][16][2], zeros past n and k.
    fn fill_vnni(&self, j0: usize, kp: usize, scratch: &mut Vec<f32>, out: &mut [u16]) {
        let (k, n) = self.kn();
        out.fill(0);
        self.visit((j0, NB.min(n - j0)), (0, k), scratch, |kk, c, v| {
            out[(c / 16) * (kp * 16) + (kk / 2) * 32 + (c % 16) * 2 + (kk % 2)] = bf16::from_f32(v)
        });
    }

    /// Whether B's rows are stored contiguously (B is the stored matrix, not its transpose).
    fn row_major(&self) -> bool {
        match *self {
            BSrc::F32 { t, .. } | BSrc::Bf16 { t, .. } | BSrc::Quant { t, .. } => !t,
        }
    }

    /// Row `kk` of a row-major B (all n values) into `out`.
    fn row(&self, kk: usize, out: &mut [f32]) {
        match *self {
            BSrc::F32 { data, cols, .. } => out.copy_from_slice(&data[kk * cols..(kk + 1) * cols]),
            BSrc::Bf16 { data, cols, .. } => {
                for (o, &v) in out.iter_mut().zip(&data[kk * cols..(kk + 1) * cols]) {
                    *o = bf16::to_f32(v);
                }
            }
            BSrc::Quant {
                dtype, data, cols, ..
            } => {
                let rb = cols / dtype.block_size() * dtype.type_size();
                dequant(dtype, &data[kk * rb..(kk + 1) * rb], out);
            }
        }
    }

    /// Rows k0..k0+kc, columns j0..j0+NR of B as f32 [kc][NR], zeros past n.
    fn fill_f32(&self, j0: usize, k0: usize, kc: usize, scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (_, n) = self.kn();
        let cols = NR.min(n - j0);
        if self.row_major() {
            out[..kc * NR].fill(0.0);
            self.visit((j0, cols), (k0, kc), scratch, |kk, c, v| {
                out[kk * NR + c] = v
            });
            return;
        }
        // B's columns are M's rows: eight rows' ranges at a time are read whole, then
        // transposed in 8×8 tiles (storing single values 256 bytes apart cost as much as the
        // dequantization itself). Eight, not all 64: a scratch of 64 rows per task raised a
        // 256-token prefill's peak RSS by 20 MB.
        let bs = self.block_len();
        let (b0, b1) = (k0 / bs, (k0 + kc).div_ceil(bs));
        scratch.resize(8 * kc + (b1 - b0) * bs, 0.0);
        let (rows, tmp) = scratch.split_at_mut(8 * kc);
        for c0 in (0..cols).step_by(8) {
            let n = 8.min(cols - c0);
            for (c, dst) in rows[..n * kc].chunks_exact_mut(kc).enumerate() {
                self.row_range(j0 + c0 + c, k0, tmp, dst);
            }
            transpose_into_panel(&rows[..n * kc], n, kc, &mut out[c0..]);
        }
        for o in out[..kc * NR].chunks_exact_mut(NR) {
            o[cols..].fill(0.0);
        }
    }

    /// Values per stored block: 1 if dense.
    fn block_len(&self) -> usize {
        match *self {
            BSrc::F32 { .. } | BSrc::Bf16 { .. } => 1,
            BSrc::Quant { dtype, .. } => dtype.block_size(),
        }
    }

    /// Values lo..lo + dst.len() of row `r` of the stored matrix M into `dst`; `tmp` holds the
    /// blocks covering them.
    fn row_range(&self, r: usize, lo: usize, tmp: &mut [f32], dst: &mut [f32]) {
        let len = dst.len();
        match *self {
            BSrc::F32 { data, cols, .. } => dst.copy_from_slice(&data[r * cols + lo..][..len]),
            BSrc::Bf16 { data, cols, .. } => {
                for (o, &v) in dst.iter_mut().zip(&data[r * cols + lo..][..len]) {
                    *o = bf16::to_f32(v);
                }
            }
            BSrc::Quant {
                dtype, data, cols, ..
            } => {
                let (bs, ts) = (dtype.block_size(), dtype.type_size());
                let (b0, b1) = (lo / bs, (lo + len).div_ceil(bs));
                let at = r * (cols / bs * ts);
                let bytes = &data[at + b0 * ts..at + b1 * ts];
                if lo.is_multiple_of(bs) && len.is_multiple_of(bs) {
                    dequant(dtype, bytes, dst);
                } else {
                    dequant(dtype, bytes, tmp);
                    dst.copy_from_slice(&tmp[lo - b0 * bs..][..len]);
                }
            }
        }
    }
}

/// out[kk·NR + c] = rows[c][kk] for c < cols ≤ 8, kk < kc.
fn transpose_into_panel(rows: &[f32], cols: usize, kc: usize, out: &mut [f32]) {
    let mut kk = 0;
    #[cfg(target_arch = "x86_64")]
    if cols == 8 && crate::avx2::available() {
        while kk + 8 <= kc {
            // SAFETY: AVX2 was detected; an 8×8 tile of `rows` [8][kc] and of `out` (row
            // stride NR, kk + 7 < kc rows).
            unsafe { transpose8(rows.as_ptr().add(kk), kc, out.as_mut_ptr().add(kk * NR), NR) };
            kk += 8;
        }
    }
    for k in kk..kc {
        for c in 0..cols {
            out[k * NR + c] = rows[c * kc + k];
        }
    }
}

/// dst[j][i] (row stride `ldd`) = src[i][j] (row stride `ld`) for an 8×8 tile (bits moved, not
/// computed: f32 or any 32-bit words).
///
/// # Safety
/// The CPU has AVX2; src holds 8 rows of 8 values at stride `ld`, dst 8 rows at stride `ldd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose8(src: *const f32, ld: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ld)));
    // Pairs, then quads within 128-bit lanes, then the lanes themselves.
    let t: [__m256; 8] = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let q: [__m256; 8] = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for j in 0..4 {
        _mm256_storeu_ps(
            dst.add(j * ldd),
            _mm256_permute2f128_ps::<0x20>(q[j], q[j + 4]),
        );
        _mm256_storeu_ps(
            dst.add((j + 4) * ldd),
            _mm256_permute2f128_ps::<0x31>(q[j], q[j + 4]),
        );
    }
}

pub fn quant_supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// [`dequant`] of a whole matrix: `rows` rows of blocks into `out` [rows, cols], row ranges
/// spread over rayon's threads — the ones the prompt's GEMM has just woken (on the decode
/// pool, whose workers sleep during a prompt, waking them cost more than the work: MMLU's
/// prompts ran 20% slower).
pub fn dequant_rows(t: GgmlDType, bytes: &[u8], rows: usize, cols: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    let rb = cols / t.block_size() * t.type_size();
    let chunk = 64;
    out[..rows * cols]
        .par_chunks_mut(chunk * cols)
        .zip(bytes[..rows * rb].par_chunks(chunk * rb))
        .for_each(|(o, b)| dequant(t, b, o));
}

fn dequant_as<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len() / std::mem::size_of::<T>();
    let out = &mut out[..n * T::BLCK_SIZE];
    if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        // SAFETY: the blocks are plain data (f16/u8 fields), the slice is aligned and holds n
        // whole blocks.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
        T::to_float(blocks, out);
    } else {
        let mut v = vec![T::zeros(); n];
        // SAFETY: as above; the destination is a fresh, aligned buffer of n blocks.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, bytes.len())
        };
        T::to_float(&v, out);
    }
}

/// Whole GGUF blocks `bytes` of type `t` (one of [`quant_supported`]) to f32 in `out`: the
/// values candle's `to_float` gives, bit for bit (tested), vectorized for Q4_1 and Q8_0.
pub fn dequant(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use k_quants::*;
    #[cfg(target_arch = "x86_64")]
    if matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_0) {
        if crate::has_avx512() {
            // SAFETY: AVX-512F was detected; `dequant_avx512` reads whole blocks only.
            return unsafe { dequant_avx512(t, bytes, out) };
        }
        if crate::avx2::available() {
            // SAFETY: AVX2, FMA and F16C were detected; whole blocks only.
            return unsafe { dequant_avx2(t, bytes, out) };
        }
    }
    match t {
        GgmlDType::Q4_0 => dequant_as::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => dequant_as::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => dequant_as::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => dequant_as::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => dequant_as::<BlockQ8_0>(bytes, out),
        GgmlDType::Q2K => dequant_as::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => dequant_as::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => dequant_as::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => dequant_as::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => dequant_as::<BlockQ6K>(bytes, out),
        _ => unreachable!("checked by quant_supported"),
    }
}

/// Q4_1 (f16 d, f16 m, 16 bytes: low nibbles are values 0–15, high nibbles 16–31) and Q8_0
/// (f16 d, 32 × i8) blocks to f32, 16 lanes at a time: what candle's scalar `to_float` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequant_avx512(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // The block scales in hardware (vcvtph2ps): `half`'s portable conversion cost as much as
    // the rest of the block.
    let f16 = |b: &[u8]| _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([b[0], b[1]])));
    match t {
        GgmlDType::Q4_1 => {
            for (blk, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16(&blk[0..2]), f16(&blk[2..4]));
                let q =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i));
                let lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0f));
                let hi = _mm512_srli_epi32::<4>(q);
                _mm512_storeu_ps(
                    o.as_mut_ptr(),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m),
                );
                _mm512_storeu_ps(
                    o.as_mut_ptr().add(16),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m),
                );
            }
        }
        _ => {
            for (blk, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[0..2]);
                for h in 0..2 {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.as_ptr().add(2 + 16 * h) as *const __m128i
                    ));
                    _mm512_storeu_ps(
                        o.as_mut_ptr().add(16 * h),
                        _mm512_mul_ps(_mm512_cvtepi32_ps(q), d),
                    );
                }
            }
        }
    }
}

/// [`dequant_avx512`] 8 lanes at a time (the same values: every step is exact or rounds once,
/// alike at either width).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_avx2(t: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let f16 = |b: &[u8]| _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[0], b[1]])));
    match t {
        GgmlDType::Q4_1 => {
            for (blk, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16(&blk[0..2]), f16(&blk[2..4]));
                for h in 0..2 {
                    let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        blk.as_ptr().add(4 + 8 * h) as *const __m128i
                    ));
                    let lo = _mm256_and_si256(q, _mm256_set1_epi32(0x0f));
                    let hi = _mm256_srli_epi32::<4>(q);
                    let at = o.as_mut_ptr().add(8 * h);
                    _mm256_storeu_ps(at, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), d, m));
                    _mm256_storeu_ps(at.add(16), _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), d, m));
                }
            }
        }
        _ => {
            for (blk, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[0..2]);
                for h in 0..4 {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        blk.as_ptr().add(2 + 8 * h) as *const __m128i
                    ));
                    _mm256_storeu_ps(
                        o.as_mut_ptr().add(8 * h),
                        _mm256_mul_ps(_mm256_cvtepi32_ps(q), d),
                    );
                }
            }
        }
    }
}

/// A rounded to bf16 and zero-padded to [round_up(m, MB), round_up(k, KB)].
fn pack_a(a: ASrc, m: usize, k: usize, mp: usize, kp: usize) -> Vec<u16> {
    let mut out = vec![0u16; mp * kp];
    out[..m * kp]
        .par_chunks_mut(kp)
        .enumerate()
        .for_each(|(i, row)| match a {
            ASrc::F32(x) => bf16::convert_slice(&x[i * k..(i + 1) * k], &mut row[..k]),
            ASrc::Bf16(x) => row[..k].copy_from_slice(&x[i * k..(i + 1) * k]),
        });
    out
}

/// `f` on a buffer of `len` values (contents unspecified: every user writes all it reads) kept
/// by the calling thread between products: a fresh zeroed allocation of the widened weight (up
/// to 16 MiB) per product was zeroed only to be overwritten (memset and page clearing: 5.8% →
/// 4.6% of a prefill's profile). A nested call on the same thread finds it taken and
/// allocates its own.
pub fn with_wide<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local!(static WIDE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) });
    let mut v = WIDE.with(|w| w.take());
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    WIDE.with(|w| w.set(v));
    r
}

/// C's base pointer shared by tasks that each write their own part of C.
pub(crate) struct SyncPtr(pub(crate) *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Panel width, row block and reduction chunk of the f32 FMA path.
pub const NR: usize = 64;
pub const MR: usize = 6;
/// Reduction chunk: 128 keeps the widened B chunk (32 KiB) in L1 for the model's own shapes;
/// long reductions (the LM head's input gradient, k = vocabulary) take 512 so the C blocks are
/// reloaded less often.
fn kc_for(k: usize) -> usize {
    if k > 4096 {
        512
    } else {
        128
    }
}

/// C [m, n] (row-major, overwritten) = A [m, k] · B, on `isa` (or the best path below it that
/// this machine runs).
pub fn matmul_bf16(a: ASrc, m: usize, b: BSrc, c: &mut [f32], isa: Isa) -> Result<(), String> {
    matmul_into(a, m, b, c, isa, false)
}

/// C [m, n] (+)= A [m, k] · B: `matmul_bf16`, adding to C when `accumulate` (a backward summing
/// several products into one input gradient writes them in place).
pub fn matmul_into(
    a: ASrc,
    m: usize,
    b: BSrc,
    c: &mut [f32],
    isa: Isa,
    accumulate: bool,
) -> Result<(), String> {
    let (k, n) = b.kn();
    b.check()?;
    let alen = match a {
        ASrc::F32(x) => x.len(),
        ASrc::Bf16(x) => x.len(),
    };
    if alen < m * k || c.len() < m * n {
        return Err(format!(
            "matmul_bf16: A [{m}, {k}] or C [{m}, {n}] too short"
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return Ok(());
    }
    let isa = crate::isa::usable(isa);
    let cp = SyncPtr(c.as_mut_ptr());
    if isa.f32_fma() {
        let af;
        let a = match a {
            ASrc::F32(x) => x,
            ASrc::Bf16(x) => {
                af = x[..m * k]
                    .iter()
                    .map(|&v| bf16::to_f32(v))
                    .collect::<Vec<_>>();
                &af
            }
        };
        return f32_path(isa, a, m, k, n, b, &cp, accumulate);
    }
    let (mp, kp) = (round_up(m, MB), round_up(k, KB));
    let ap = pack_a(a, m, k, mp, kp);
    let panels = n.div_ceil(NB);
    let cp = &cp;
    (0..panels).into_par_iter().for_each_init(
        || (vec![0u16; kp * NB], Vec::new(), vec![0f32; MB * NB]),
        |(panel, scratch, tile), p| {
            let j0 = p * NB;
            b.fill_vnni(j0, kp, scratch, panel);
            let cols = NB.min(n - j0);
            micro::panel(isa, &ap, mp, kp, panel, tile, |i0, tile: &[f32]| {
                for r in 0..MB.min(m - i0) {
                    // SAFETY: each task writes only its own columns j0..j0+cols of C.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(cp.0.add((i0 + r) * n + j0), cols)
                    };
                    let src = &tile[r * NB..r * NB + cols];
                    if accumulate {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            });
        },
    );
    Ok(())
}

/// f32 FMA: tasks are (64-column panel, row chunk) pairs; each walks k in chunks with the
/// widened B chunk in cache and 6×64 blocks of C in registers. B is widened in one of three ways:
/// - whole, once, shared by all tasks (the model's own layers: ≤ 16 MiB widened);
/// - one k-slab of every panel at a time, shared, slab after slab (long reductions, the LM
///   head's input gradient: its whole widened form would be 113 MiB);
/// - per task, one k chunk at a time (wide B, the LM head's forward; widening a task's whole
///   panel up front measured 10% slower).
#[allow(clippy::too_many_arguments)]
fn f32_path(
    isa: Isa,
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b: BSrc,
    cp: &SyncPtr,
    accumulate: bool,
) -> Result<(), String> {
    let block = micro::f32_kernel(isa);
    let panels = n.div_ceil(NR);
    // Enough tasks (≥ 8 per thread) that an odd panel count cannot leave a thread idle for a
    // task's length (9 panels on 2 threads ran 5:4); each extra row chunk refills its panel,
    // which costs k·64 values against rows·k·64 products.
    let want = (8 * rayon::current_num_threads()).div_ceil(panels).max(1);
    let rows_per = round_up(m.div_ceil(want), MR).max(MR * 8);
    let chunks = m.div_ceil(rows_per);
    let kcb = kc_for(k);
    let widen = |k0: usize, kc: usize, dst: &mut [f32]| {
        // dst [panels][kc][NR] (zeroed): rows k0..k0+kc of every panel.
        if b.row_major() {
            // B's rows are stored whole: decode each once and deal it out to the panels,
            // instead of each panel decoding its 64 columns of every row.
            let dp = SyncPtr(dst.as_mut_ptr());
            let dp = &dp;
            (k0..k0 + kc)
                .into_par_iter()
                .with_min_len(16)
                .for_each_init(
                    || vec![0f32; n],
                    |row, kk| {
                        b.row(kk, row);
                        for (p, piece) in row.chunks(NR).enumerate() {
                            // SAFETY: row kk of panel p is this task's alone, inside dst.
                            unsafe {
                                let d = dp.0.add((p * kc + kk - k0) * NR);
                                std::ptr::copy_nonoverlapping(piece.as_ptr(), d, piece.len());
                                // The buffer is reused: columns past n are zeroed here.
                                std::ptr::write_bytes(d.add(piece.len()), 0, NR - piece.len());
                            }
                        }
                    },
                );
        } else {
            dst.par_chunks_mut(kc * NR)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (p, d)| {
                    b.fill_f32(p * NR, k0, kc, scratch, d)
                });
        }
    };
    // Rows k0..k0+span of the reduction into C (added to it when `acc`), B from `slab` (all
    // panels' rows k0..k0+span, or all rows when `whole`) or else widened per task.
    let run = |k0: usize, span: usize, slab: Option<&[f32]>, whole: bool, acc: bool| {
        (0..panels * chunks).into_par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::<f32>::new()),
            |(own, scratch), task| {
                // Neighbouring tasks share a row chunk, so each thread's slab of A stays in its
                // L2 across panels (chunk-major order measured 142 → 250 GFLOP/s on k/v_proj).
                let (p, ch) = (task % panels, task / panels);
                let j0 = p * NR;
                let cols = NR.min(n - j0);
                let (r0, r1) = (ch * rows_per, ((ch + 1) * rows_per).min(m));
                for kk0 in (k0..k0 + span).step_by(kcb) {
                    let kc = kcb.min(k0 + span - kk0);
                    let bp: &[f32] = match slab {
                        Some(s) => {
                            let at = if whole {
                                p * k + kk0
                            } else {
                                p * span + kk0 - k0
                            };
                            &s[at * NR..(at + kc) * NR]
                        }
                        None => {
                            own.resize(kcb * NR, 0.0);
                            b.fill_f32(j0, kk0, kc, scratch, own);
                            own
                        }
                    };
                    for i0 in (r0..r1).step_by(MR) {
                        let rows = MR.min(r1 - i0);
                        let next = if i0 + MR < r1 { i0 + MR } else { i0 };
                        // SAFETY: rows i0..i0+rows and columns j0..j0+cols of C belong to this
                        // task.
                        unsafe {
                            block(
                                a.as_ptr().add(i0 * k + kk0),
                                k,
                                rows,
                                bp.as_ptr(),
                                kc,
                                cp.0.add(i0 * n + j0),
                                n,
                                cols,
                                acc || kk0 > k0,
                                a.as_ptr().add(next * k + kk0),
                            )
                        }
                    }
                }
            },
        )
    };
    if chunks > 1 && k * panels * NR <= 4 << 20 {
        with_wide(panels * k * NR, |all| {
            widen(0, k, all);
            run(0, k, Some(all), true, accumulate);
        });
    } else if k > 4096 && kcb * panels * NR <= 1 << 20 {
        with_wide(panels * kcb * NR, |slab| {
            for k0 in (0..k).step_by(kcb) {
                let kc = kcb.min(k - k0);
                widen(k0, kc, &mut slab[..panels * kc * NR]);
                run(
                    k0,
                    kc,
                    Some(&slab[..panels * kc * NR]),
                    false,
                    accumulate || k0 > 0,
                );
            }
        });
    } else {
        run(0, k, None, false, accumulate);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use crate::test_data as data;

    /// `w` quantized to `dtype`, and its dequantized values as candle computes them.
    fn quantized(w: &Tensor, dtype: GgmlDType) -> (QTensor, Vec<f32>) {
        let q = QTensor::quantize(w, dtype).unwrap();
        let wd = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q, wd)
    }

    /// f64 reference over the operands as `isa` sees them (bf16-rounded on the bf16 paths, as
    /// given on the f32 one): only the summation order differs.
    fn reference(
        isa: Isa,
        a: &[f32],
        m: usize,
        k: usize,
        b: &dyn Fn(usize, usize) -> f32,
        n: usize,
    ) -> Vec<f32> {
        let r = |x: f32| {
            if isa.f32_fma() {
                x
            } else {
                bf16::round(x)
            }
        };
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += r(a[i * k + kk]) as f64 * r(b(kk, j)) as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn close(got: &[f32], want: &[f32], k: usize, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (k as f32).sqrt() * (1.0 + w.abs());
            assert!((g - w).abs() <= tol, "{what}: c[{i}] = {g}, want {w}");
        }
    }

    /// Dense f32 weights in both orientations, shapes off the tile grid, every ISA this machine
    /// has, run from several threads at once (AMX keeps per-thread tile state).
    #[test]
    fn dense_matches_reference_on_every_isa() {
        let shapes = [
            (1, 1, 1),
            (5, 33, 17),
            (37, 70, 45),
            (64, 64, 64),
            (33, 129, 100),
        ];
        for &(m, k, n) in &shapes {
            let a = data(m * k, 1);
            let w = data(n * k, 2); // W [n, k]: B = Wᵀ
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect(); // [k, n]
            for isa in crate::isa::available() {
                let want = reference(isa, &a, m, k, &|kk, j| w[j * k + kk], n);
                let runs: Vec<Vec<f32>> = (0..4)
                    .into_par_iter()
                    .map(|r| {
                        let mut c = vec![f32::NAN; m * n];
                        let b = if r % 2 == 0 {
                            BSrc::F32 {
                                data: &w,
                                rows: n,
                                cols: k,
                                t: true,
                            }
                        } else {
                            BSrc::F32 {
                                data: &wt,
                                rows: k,
                                cols: n,
                                t: false,
                            }
                        };
                        matmul_bf16(ASrc::F32(&a), m, b, &mut c, isa).unwrap();
                        c
                    })
                    .collect();
                for c in &runs {
                    close(c, &want, k, &format!("{isa:?} {m}x{k}x{n}"));
                }
            }
        }
    }

    /// Accumulating into C adds the product to what C holds, on every path.
    #[test]
    fn accumulate_adds_to_c() {
        let (m, k, n) = (37, 70, 45);
        let a = data(m * k, 4);
        let w = data(n * k, 5);
        let prior = data(m * n, 6);
        for isa in crate::isa::available() {
            let want = reference(isa, &a, m, k, &|kk, j| w[j * k + kk], n);
            let b = BSrc::F32 {
                data: &w,
                rows: n,
                cols: k,
                t: true,
            };
            let mut c = prior.clone();
            matmul_into(ASrc::F32(&a), m, b, &mut c, isa, true).unwrap();
            let got: Vec<f32> = c.iter().zip(&prior).map(|(c, p)| c - p).collect();
            close(&got, &want, k, &format!("{isa:?} accumulate"));
        }
    }

    /// A reduction longer than 4096 (the LM head's input gradient) widens B one k-slab of all
    /// panels at a time: still the reference product, overwriting or accumulating.
    #[test]
    fn long_reduction_by_slabs_matches_reference() {
        let (m, k, n) = (13, 4096 + 320, 70);
        let w = Tensor::from_vec(data(k * n, 7), (k, n), &Device::Cpu).unwrap();
        let n2 = 96; // a multiple of Q8_0's 32-value blocks
        let wq = Tensor::from_vec(data(k * n2, 8), (k, n2), &Device::Cpu).unwrap();
        let (q, wd) = quantized(&wq, GgmlDType::Q8_0);
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let a = data(m * k, 9);
        let qdata = q.data().unwrap();
        type Case<'a> = (BSrc<'a>, &'a dyn Fn(usize, usize) -> f32, usize);
        let cases: [Case; 2] = [
            (
                BSrc::F32 {
                    data: &wv,
                    rows: k,
                    cols: n,
                    t: false,
                },
                &|kk, j| wv[kk * n + j],
                n,
            ),
            (
                BSrc::Quant {
                    dtype: GgmlDType::Q8_0,
                    data: &qdata,
                    rows: k,
                    cols: n2,
                    t: false,
                },
                &|kk, j| wd[kk * n2 + j],
                n2,
            ),
        ];
        // The f32 path where this CPU has it (the slabs are its), else the best path it has.
        let isa = crate::isa::usable(Isa::Avx512);
        for (b, at, nn) in cases {
            let want = reference(isa, &a, m, k, at, nn);
            let mut c = vec![f32::NAN; m * nn];
            matmul_into(ASrc::F32(&a), m, b, &mut c, isa, false).unwrap();
            close(&c, &want, k, "slabs");
            let mut c2 = vec![1f32; m * nn];
            matmul_into(ASrc::F32(&a), m, b, &mut c2, isa, true).unwrap();
            let got: Vec<f32> = c2.iter().map(|v| v - 1.0).collect();
            close(&got, &want, k, "slabs, accumulating");
        }
    }

    /// Quantized weights: the GEMM equals the reference over the dequantized matrix, forward
    /// (B = Wᵀ) and backward (B = W) orientation, for 32- and 256-element blocks.
    #[test]
    fn quantized_matches_dequantized_reference() {
        let dev = Device::Cpu;
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q6K,
        ] {
            let (n, k, m) = (40, 256, 19);
            let w = Tensor::from_vec(data(n * k, 3), (n, k), &dev).unwrap();
            let (q, wd) = quantized(&w, dtype);
            let bytes = q.data().unwrap();
            let a = data(m * k, 4);
            for isa in crate::isa::available() {
                let mut c = vec![0f32; m * n];
                let b = BSrc::Quant {
                    dtype,
                    data: &bytes,
                    rows: n,
                    cols: k,
                    t: true,
                };
                matmul_bf16(ASrc::F32(&a), m, b, &mut c, isa).unwrap();
                let want = reference(isa, &a, m, k, &|kk, j| wd[j * k + kk], n);
                close(&c, &want, k, &format!("{isa:?} {dtype:?} fwd"));
                // Backward orientation: dX [m, k] = dY [m, n] · W [n, k].
                let g = data(m * n, 5);
                let mut dx = vec![0f32; m * k];
                let b = BSrc::Quant {
                    dtype,
                    data: &bytes,
                    rows: n,
                    cols: k,
                    t: false,
                };
                matmul_bf16(ASrc::F32(&g), m, b, &mut dx, isa).unwrap();
                let want = reference(isa, &g, m, n, &|kk, j| wd[kk * k + j], k);
                close(&dx, &want, n, &format!("{isa:?} {dtype:?} bwd"));
            }
        }
    }

    /// Our AVX-512 and AVX2 block decoding equal candle's `to_float`, value for value.
    #[test]
    fn block_decoding_is_exact() {
        type Decoder = fn(GgmlDType, &[u8], &mut [f32]);
        // The dispatch, and the AVX2 decoder too wherever the dispatch picks AVX-512.
        #[allow(unused_mut)]
        let mut decoders: Vec<(&str, Decoder)> = vec![("dispatch", dequant)];
        #[cfg(target_arch = "x86_64")]
        if crate::avx2::available() {
            // SAFETY: AVX2, FMA and F16C were detected.
            decoders.push(("avx2", |t, b, o| unsafe { dequant_avx2(t, b, o) }));
        }
        let dev = Device::Cpu;
        for (name, decode) in decoders {
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let w = Tensor::from_vec(data(8 * 64, 9), (8, 64), &dev).unwrap();
                let (q, want) = quantized(&w, dtype);
                let mut got = vec![0f32; want.len()];
                decode(dtype, &q.data().unwrap(), &mut got);
                assert_eq!(got, want, "{name} {dtype:?}");
            }
        }
    }

    /// The AVX2 f32 path gives the AVX-512 path's bits (each element one chain of FMAs over
    /// k in the same order), dense and quantized, accumulating or not, on every way B is
    /// widened (whole, by slabs for k > 4096, per task).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_path_gives_the_avx512_bits() {
        if !crate::avx2::twins_comparable("f32 GEMM") {
            return;
        }
        let dev = Device::Cpu;
        for &(m, k, n) in &[(5, 33, 17), (70, 96, 130), (200, 64, 64), (13, 4160, 70)] {
            let a = data(m * k, 11);
            let w = data(n * k, 12);
            // Q4_1 blocks need k in whole 32s; k = 33 checks the f32 tail alone.
            let raw = (k % 32 == 0).then(|| {
                let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
                quantized(&wt, GgmlDType::Q4_1)
                    .0
                    .data()
                    .unwrap()
                    .into_owned()
            });
            let mut bs = vec![BSrc::F32 {
                data: &w,
                rows: n,
                cols: k,
                t: true,
            }];
            if let Some(raw) = &raw {
                bs.push(BSrc::Quant {
                    dtype: GgmlDType::Q4_1,
                    data: raw,
                    rows: n,
                    cols: k,
                    t: true,
                });
            }
            for b in bs {
                for acc in [false, true] {
                    let prior = data(m * n, 13);
                    let run = |isa| {
                        let mut c = prior.clone();
                        matmul_into(ASrc::F32(&a), m, b, &mut c, isa, acc).unwrap();
                        c
                    };
                    assert_eq!(run(Isa::Avx2), run(Isa::Avx512), "{m}x{k}x{n} acc={acc}");
                }
            }
        }
    }

    #[test]
    fn bf16_operands_and_bad_shapes() {
        let (m, k, n) = (3, 40, 9);
        let a: Vec<u16> = data(m * k, 6).iter().map(|&x| bf16::from_f32(x)).collect();
        let af: Vec<f32> = a.iter().map(|&x| bf16::to_f32(x)).collect();
        let w: Vec<u16> = data(n * k, 7).iter().map(|&x| bf16::from_f32(x)).collect();
        let mut c = vec![0f32; m * n];
        let b = BSrc::Bf16 {
            data: &w,
            rows: n,
            cols: k,
            t: true,
        };
        for isa in crate::isa::available() {
            matmul_bf16(ASrc::Bf16(&a), m, b, &mut c, isa).unwrap();
            let want = reference(isa, &af, m, k, &|kk, j| bf16::to_f32(w[j * k + kk]), n);
            close(&c, &want, k, "bf16");
        }
        let short = BSrc::F32 {
            data: &[0.0; 10],
            rows: n,
            cols: k,
            t: true,
        };
        assert!(matmul_bf16(ASrc::F32(&af), m, short, &mut c, Isa::Portable).is_err());
    }
}
