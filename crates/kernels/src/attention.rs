//! Causal self-attention for training on the projections' own layout: q [B, T, H, D], k and v
//! [B, T, KV, D] (grouped-query heads read in place), RoPE applied inside, output [B, T, H, D].
//! Nothing is transposed, repeated or kept but each row's softmax max and 1/sum [B, H, T, 2] (not
//! a log-sum-exp: rows masked whole sit at −1e30, where max + ln(sum) loses the sum); the backward
//! recomputes the probabilities (flash-attention's trade). Products run on `gemm` with strides,
//! one (batch, head) or (batch, KV group) per task.

use crate::strided::mm;
use gemm::Parallelism;

/// Products inside attention run one per task: the tasks are the parallelism.
const SEQ: Parallelism = Parallelism::None;
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
    x.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(bt, row)| {
            let (c, s) = (&cos[bt * d..(bt + 1) * d], &sin[bt * d..(bt + 1) * d]);
            for v in row.chunks_exact_mut(d) {
                crate::fused::rotate(v, c, s, inverse);
            }
        });
}

/// A row of scores to probabilities in place: its (max, 1/sum), which the backward keeps.
fn softmax(row: &mut [f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / crate::vexp::exp_sub(row, max, 1.0);
    row.iter_mut().for_each(|x| *x *= inv);
    (max, inv)
}

crate::wide_fn! {
    /// Scores to logits in place, y·scale (+ bias where given): their maximum.
    /// (The maximum of a set is exact in any order, so the 16 lanes' folds give the scalar
    /// fold's value; f32::max ignores NaN either way. One fold ran as a chain of scalar
    /// maxima: 12% of a prompt's attention.)
    fn scale_max(row: &mut [f32], scale: f32, bias: Option<&[f32]>) -> f32 {
        match bias {
            Some(bias) => row.iter_mut().zip(bias).for_each(|(y, &b)| *y = *y * scale + b),
            None => row.iter_mut().for_each(|y| *y *= scale),
        }
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            lanes.iter_mut().zip(c).for_each(|(l, &y)| *l = l.max(y));
        }
        chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

crate::wide_fn! {
    /// y ·= a for each y of the row.
    fn times(row: &mut [f32], a: f32) {
        row.iter_mut().for_each(|y| *y *= a);
    }
}

struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// Query rows per block; under a causal mask block [r0, r1) needs key columns [0, r1) only.
const RB: usize = 64;

/// Per batch element, its row blocks (r0, r1, c1): rows r0..r1 read key columns 0..c1, up to
/// the last one any of them sees ([`row_end`]: under a causal mask c1 = r1; a row masked whole
/// keeps all T).
fn blocks(sh: Shape, bias: Option<&[f32]>) -> Vec<Vec<(usize, usize, usize)>> {
    let t = sh.t;
    (0..sh.b)
        .map(|bi| {
            (0..t)
                .step_by(RB)
                .map(|r0| {
                    let r1 = (r0 + RB).min(t);
                    let c1 = bias.map_or(t, |x| {
                        (r0..r1)
                            .map(|i| row_end(&x[(bi * t + i) * t..(bi * t + i + 1) * t]))
                            .max()
                            .unwrap_or(t)
                    });
                    (r0, r1, c1)
                })
                .collect()
        })
        .collect()
}

/// Rows r0..r1, columns 0..c1 of scale · Q_bh · K_bgᵀ + bias_b into `s` (row stride T).
#[allow(clippy::too_many_arguments)]
unsafe fn scores(
    sh: Shape,
    qr: &[f32],
    kr: &[f32],
    bias: Option<&[f32]>,
    scale: f32,
    (bi, hi): (usize, usize),
    (r0, r1, c1): (usize, usize, usize),
    s: &mut [f32],
) {
    let Shape { t, h, kv, d, .. } = sh;
    let g = hi / (h / kv);
    let q = qr.as_ptr().add(bi * t * h * d + r0 * h * d + hi * d);
    let k = kr.as_ptr().add(bi * t * kv * d + g * d);
    mm(
        (r1 - r0, c1, d),
        s.as_mut_ptr().add(r0 * t),
        (t, 1),
        false,
        q,
        (h * d, 1),
        k,
        (1, kv * d),
        scale,
        SEQ,
    );
    if let Some(bias) = bias {
        for i in r0..r1 {
            let at = (bi * t + i) * t;
            for (x, &b) in s[i * t..i * t + c1].iter_mut().zip(&bias[at..at + c1]) {
                *x += b;
            }
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
    let blk = blocks(sh, bias);
    let op = Ptr(out.as_mut_ptr());
    let op = &op;
    stats.par_chunks_mut(2 * t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |s, (bh, st)| {
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / (h / kv);
            for &(r0, r1, c1) in &blk[bi] {
                // SAFETY: each task writes only head hi of batch bi in `out`.
                unsafe {
                    scores(sh, &qr, &kr, bias, scale, (bi, hi), (r0, r1, c1), s);
                    for i in r0..r1 {
                        let row = &mut s[i * t..i * t + c1];
                        let (max, inv) = softmax(row);
                        st[2 * i] = max;
                        st[2 * i + 1] = inv;
                    }
                    let o = op.0.add(bi * t * h * d + r0 * h * d + hi * d);
                    let vp = v.as_ptr().add(bi * t * kv * d + g * d);
                    mm(
                        (r1 - r0, d, c1),
                        o,
                        (h * d, 1),
                        false,
                        s.as_ptr().add(r0 * t),
                        (t, 1),
                        vp,
                        (kv * d, 1),
                        1.0,
                        SEQ,
                    );
                }
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
    let blk = blocks(sh, bias);
    dk.fill(0.0);
    dv.fill(0.0);
    let (pq, pk, pv) = (
        Ptr(dq.as_mut_ptr()),
        Ptr(dk.as_mut_ptr()),
        Ptr(dv.as_mut_ptr()),
    );
    let (pq, pk, pv) = (&pq, &pk, &pv);
    (0..b * kv).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t]),
        |(p, dp), bg| {
            let (bi, g) = (bg / kv, bg % kv);
            let at_g = bi * t * kv * d + g * d;
            for hi in g * n_rep..(g + 1) * n_rep {
                let at_h = bi * t * h * d + hi * d;
                let st = &stats[2 * (bi * h + hi) * t..2 * (bi * h + hi + 1) * t];
                for &(r0, r1, c1) in &blk[bi] {
                    let rows = r1 - r0;
                    // SAFETY: this task owns group g of batch bi in dk/dv and its heads in dq.
                    unsafe {
                        scores(sh, &qr, &kr, bias, scale, (bi, hi), (r0, r1, c1), p);
                        for i in r0..r1 {
                            crate::vexp::exp_sub(
                                &mut p[i * t..i * t + c1],
                                st[2 * i],
                                st[2 * i + 1],
                            );
                        }
                        let go = dout.as_ptr().add(at_h + r0 * h * d);
                        let pr = p.as_ptr().add(r0 * t);
                        // dV_g[0..c1] += P[r0..r1, 0..c1]ᵀ · dO_h[r0..r1]
                        mm(
                            (c1, d, rows),
                            pv.0.add(at_g),
                            (kv * d, 1),
                            true,
                            pr,
                            (1, t),
                            go,
                            (h * d, 1),
                            1.0,
                            SEQ,
                        );
                        // dP = dO_h · V_gᵀ
                        mm(
                            (rows, c1, d),
                            dp.as_mut_ptr().add(r0 * t),
                            (t, 1),
                            false,
                            go,
                            (h * d, 1),
                            v.as_ptr().add(at_g),
                            (1, kv * d),
                            1.0,
                            SEQ,
                        );
                        for i in r0..r1 {
                            let r = at_h + i * h * d;
                            let di: f32 = (0..d).map(|j| dout[r + j] * o[r + j]).sum();
                            let (pp, ds) = (&p[i * t..i * t + c1], &mut dp[i * t..i * t + c1]);
                            for (ds, &pp) in ds.iter_mut().zip(pp) {
                                *ds = pp * (*ds - di) * scale;
                            }
                        }
                        let dpr = dp.as_ptr().add(r0 * t);
                        // dQr_h[r0..r1] = dS · K_g[0..c1] ; dKr_g[0..c1] += dSᵀ · Qr_h[r0..r1]
                        mm(
                            (rows, d, c1),
                            pq.0.add(at_h + r0 * h * d),
                            (h * d, 1),
                            false,
                            dpr,
                            (t, 1),
                            kr.as_ptr().add(at_g),
                            (kv * d, 1),
                            1.0,
                            SEQ,
                        );
                        mm(
                            (c1, d, rows),
                            pk.0.add(at_g),
                            (kv * d, 1),
                            true,
                            dpr,
                            (1, t),
                            qr.as_ptr().add(at_h + r0 * h * d),
                            (h * d, 1),
                            1.0,
                            SEQ,
                        );
                    }
                }
            }
        },
    );
    rope_bthd(dq, cos, sin, h, d, true);
    rope_bthd(dk, cos, sin, kv, d, true);
}

/// Shape of a prompt's attention after cached positions (inference).
#[derive(Clone, Copy, Debug)]
pub struct PromptShape {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    /// New (query) positions.
    pub t: usize,
    /// Key positions: the cached ones, then the T new ones.
    pub s: usize,
    pub d: usize,
}

/// Query rows per task of [`prompt`]: six of the f32 kernel's 6-row register blocks (32 left
/// a block of 2 rows computing 6 in every task), enough tasks to share among the threads.
const PB: usize = 6 * crate::gemm::MR;

/// Keys row `row` of a bias reads: up to its last entry the bias leaves visible (masked ones sit
/// at −1e30, whose weight underflows to an exact 0), or all of them when it masks the row whole
/// (its softmax is then uniform over every key, as the full product computes it).
fn row_end(row: &[f32]) -> usize {
    row.iter()
        .rposition(|&x| x > -1e29)
        .map_or(row.len(), |j| j + 1)
}

/// Inference attention of new positions (no gradient): q [B, H, T, D], k and v [B, KV, S, D]
/// (grouped-query heads read in place), bias [B, T, S] additive, out [B, T, H, D] (the layout
/// the output projection reads, so no transposing copy follows), all contiguous f32. Tasks are (batch, head, block of `PB` query rows); a block reads the keys up
/// to the last one any of its rows sees, so a causal prompt costs about half the products of
/// the full T × S square.
pub fn prompt(
    sh: PromptShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    bias: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
) {
    let PromptShape { b, h, kv, t, s, d } = sh;
    assert!(
        q.len() >= b * h * t * d
            && k.len() >= b * kv * s * d
            && v.len() >= b * kv * s * d
            && out.len() >= b * h * t * d
            && bias.is_none_or(|x| x.len() >= b * t * s)
            && kv > 0
            && h % kv == 0,
        "prompt attention: buffers too short for {sh:?}"
    );
    let ends: Vec<usize> = match bias {
        Some(x) => x[..b * t * s].chunks(s.max(1)).map(row_end).collect(),
        None => vec![s; b * t],
    };
    let f32_isa = [crate::isa::Isa::Avx512, crate::isa::Isa::Avx2]
        .into_iter()
        .find(|&i| i <= crate::isa::selected() && crate::isa::supports(i));
    match f32_isa {
        Some(isa) => prompt_panels(sh, (q, k, v), bias, scale, out, &ends, isa),
        None => prompt_strided(sh, (q, k, v), bias, scale, out, &ends),
    }
}

/// [`prompt`] on `gemm`'s strided products (CPUs without an f32 FMA path).
fn prompt_strided(
    sh: PromptShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    bias: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
    ends: &[usize],
) {
    let PromptShape { b, h, kv, t, s, d } = sh;
    let blocks = t.div_ceil(PB);
    let op = Ptr(out.as_mut_ptr());
    let op = &op;
    (0..b * h * blocks).into_par_iter().for_each_init(
        || vec![0f32; PB * s],
        |sc, task| {
            let (bh, r0) = (task / blocks, task % blocks * PB);
            let (bi, hi) = (bh / h, bh % h);
            let r1 = (r0 + PB).min(t);
            let rows = r1 - r0;
            let c1 = ends[bi * t + r0..bi * t + r1]
                .iter()
                .copied()
                .max()
                .unwrap_or(s);
            let g = hi / (h / kv);
            let at_q = (bh * t + r0) * d;
            let at_k = (bi * kv + g) * s * d;
            // SAFETY: the lengths were checked above; this task writes only rows r0..r1 of
            // head hi of batch bi in `out`.
            unsafe {
                mm(
                    (rows, c1, d),
                    sc.as_mut_ptr(),
                    (c1, 1),
                    false,
                    q.as_ptr().add(at_q),
                    (d, 1),
                    k.as_ptr().add(at_k),
                    (1, d),
                    scale,
                    SEQ,
                );
            }
            for (i, row) in sc[..rows * c1].chunks_exact_mut(c1.max(1)).enumerate() {
                if let Some(x) = bias {
                    let at = (bi * t + r0 + i) * s;
                    row.iter_mut()
                        .zip(&x[at..at + c1])
                        .for_each(|(y, &b)| *y += b);
                }
                softmax(row);
            }
            // SAFETY: as above.
            unsafe {
                mm(
                    (rows, d, c1),
                    op.0.add(((bi * t + r0) * h + hi) * d),
                    (h * d, 1),
                    false,
                    sc.as_ptr(),
                    (c1, 1),
                    v.as_ptr().add(at_k),
                    (d, 1),
                    1.0,
                    SEQ,
                );
            }
        },
    );
}

/// Keys as the B operand of Q·Kᵀ — [⌈s/64⌉][d][64], transposed, columns past s zero — and
/// values as that of P·V — [⌈d/64⌉][s][64], columns past d zero — for one (batch, KV group),
/// into zeroed buffers.
fn kv_panels(k: &[f32], v: &[f32], s: usize, d: usize, kt: &mut [f32], vp: &mut [f32]) {
    use crate::gemm::NR;
    assert!(k.len() >= s * d && kt.len() >= s.div_ceil(NR) * d * NR);
    // Whole 8×8 blocks of keys by 8×8 transposes (a value at a time wrote 64 floats apart:
    // 2.8 ms of a 256-token prefill's panels), the rest value by value.
    #[cfg(target_arch = "x86_64")]
    let (s8, d8) = if crate::avx2::available() {
        (s / 8 * 8, d / 8 * 8)
    } else {
        (0, 0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (s8, d8) = (0usize, 0usize);
    #[cfg(target_arch = "x86_64")]
    for j in (0..s8).step_by(8) {
        let at = j / NR * d * NR + j % NR;
        for c in (0..d8).step_by(8) {
            // SAFETY: AVX2 was detected (else s8 = 0); rows j..j+8 hold columns c..c+8 (s8 and
            // d8 bound them) and panel rows c..c+8 hold 8 columns from `at` (j % 8 == 0, so
            // j % NR + 8 <= NR).
            unsafe {
                crate::gemm::transpose8(
                    k.as_ptr().add(j * d + c),
                    d,
                    kt.as_mut_ptr().add(at + c * NR),
                    NR,
                )
            };
        }
    }
    for (j, row) in k[..s * d].chunks_exact(d).enumerate() {
        let at = j / NR * d * NR + j % NR;
        let from = if j < s8 { d8 } else { 0 };
        for (c, &x) in row.iter().enumerate().skip(from) {
            kt[at + c * NR] = x;
        }
    }
    for (j, row) in v[..s * d].chunks_exact(d).enumerate() {
        for (p, piece) in row.chunks(NR).enumerate() {
            let at = (p * s + j) * NR;
            vp[at..at + piece.len()].copy_from_slice(piece);
        }
    }
}

/// [`prompt`] on the f32 GEMM's register blocks (`micro::f32_kernel`, 6 rows × 64 columns):
/// each (batch, KV group)'s keys and values are laid out as B panels once, then every
/// (batch, head, block of `PB` rows) task runs S = Q·Kᵀ over its key panels up to its last
/// visible key, the softmax per row, and O = P·V. Each score and output is one FMA chain in
/// order (no per-call packing or allocation, as the strided products had).
#[allow(clippy::too_many_arguments)]
fn prompt_panels(
    sh: PromptShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    bias: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
    ends: &[usize],
    isa: crate::isa::Isa,
) {
    use crate::gemm::{MR, NR};
    let PromptShape { b, h, kv, t, s, d } = sh;
    let (ktl, vpl) = (s.div_ceil(NR) * d * NR, d.div_ceil(NR) * s * NR);
    // Panels pad columns past s (keys) and d (values) with zeros; without padding every
    // value is written by `kv_panels`.
    let zeroed = |n: usize| match s % NR == 0 && d % NR == 0 {
        // SAFETY: no padding, so `kv_panels` writes all n values.
        true => unsafe { crate::uninit(n) },
        false => vec![0f32; n],
    };
    let (mut kt, mut vp) = (zeroed(b * kv * ktl), zeroed(b * kv * vpl));
    kt.par_chunks_mut(ktl)
        .zip(vp.par_chunks_mut(vpl))
        .enumerate()
        .for_each(|(grp, (kt, vp))| {
            let at = grp * s * d;
            kv_panels(&k[at..at + s * d], &v[at..at + s * d], s, d, kt, vp)
        });
    let block = crate::micro::f32_kernel(isa);
    let blocks = t.div_ceil(PB);
    let op = Ptr(out.as_mut_ptr());
    let op = &op;
    let (kt, vp) = (&kt, &vp);
    // Tasks in row order, (batch, block, head), split where the products around split their
    // rows (`halves`): the first part's query rows, and the outputs the output projection
    // reads, stay on the calling core.
    let cut = crate::halves::split(b * t);
    let cut = (0..b * blocks)
        .position(|i| (i / blocks) * t + i % blocks * PB >= cut)
        .unwrap_or(b * blocks)
        * h;
    let task = |sc: &mut Vec<f32>, task: usize| {
        let (bi, r0, hi) = (task / (blocks * h), task / h % blocks * PB, task % h);
        let bh = bi * h + hi;
        let rows = PB.min(t - r0);
        let c1 = ends[bi * t + r0..bi * t + r0 + rows]
            .iter()
            .copied()
            .max()
            .unwrap_or(s);
        // S's row stride: the widest register block's logits, whole vectors.
        let ld = c1.next_multiple_of(16).min(s);
        let grp = bi * kv + hi / (h / kv);
        let (ktg, vpg) = (&kt[grp * ktl..], &vp[grp * vpl..]);
        let qb = &q[(bh * t + r0) * d..(bh * t + r0 + rows) * d];
        let o = op.0.wrapping_add(((bi * t + r0) * h + hi) * d);
        for i0 in (0..rows).step_by(MR) {
            let r = MR.min(rows - i0);
            // This register block's last visible key: a causal block stops at its own
            // last row, not at the task's (the keys past it would weigh exactly 0).
            let at = bi * t + r0 + i0;
            let e = ends[at..at + r].iter().copied().max().unwrap_or(s);
            // Its logits run to whole vectors of 16 (the product computes them anyway;
            // the extra keys are masked, weight 0): no scalar tails in the softmax.
            let e16 = e.next_multiple_of(16).min(s);
            let srow = &mut sc[i0 * ld..(i0 + r) * ld];
            // SAFETY: `prompt_panels` runs only on an f32 FMA path this CPU has; Q's rows
            // hold d values, each key panel d·64, S r rows of ld ≥ e16, each value panel
            // s·64 ≥ e·64 values; this task writes only rows r0..r0+rows of head hi of
            // batch bi in `out`.
            unsafe {
                let a = qb.as_ptr().add(i0 * d);
                for p in 0..e16.div_ceil(NR) {
                    let (c, cols) = (srow.as_mut_ptr().add(p * NR), NR.min(e16 - p * NR));
                    let kp = ktg.as_ptr().add(p * d * NR);
                    block(a, d, r, kp, d, c, ld, cols, false, a);
                }
            }
            for (i, row) in srow.chunks_exact_mut(ld).enumerate() {
                let row = &mut row[..e16];
                let at = (at + i) * s;
                let max = scale_max(row, scale, bias.map(|x| &x[at..at + e16]));
                let inv = 1.0 / crate::vexp::exp_sub(row, max, 1.0);
                times(row, inv);
            }
            // SAFETY: as above.
            unsafe {
                let a = srow.as_ptr();
                for p in 0..d.div_ceil(NR) {
                    let c = o.add(i0 * h * d + p * NR);
                    let vpp = vpg.as_ptr().add(p * s * NR);
                    block(a, ld, r, vpp, e, c, h * d, NR.min(d - p * NR), false, a);
                }
            }
        }
    };
    let part = |tasks: std::ops::Range<usize>| {
        tasks
            .into_par_iter()
            .for_each_init(|| vec![0f32; PB * s], task)
    };
    crate::halves::run_at(cut, b * blocks * h, part);
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_data as data;

    /// `prompt` (this CPU's path) and its strided fallback against softmax(scale·q·kᵀ + bias)·v
    /// in f64 over every key (nothing cut), on three row blocks (the last one partial, ending in
    /// a register block of one row) after 9 cached positions (S = 88: logits rounded up to
    /// whole vectors stop at S), at head sizes 24 and 72: batch 0 causal, batch
    /// 1 left-padded by 3 (its padded query rows masked whole: uniform over all S keys, as the
    /// full product gives them). Each output is a convex mix of ≤ 88 f32 values of size ~1 after
    /// an f32 softmax: f32 rounding (~1e-7 relative per term, summed) keeps errors near 1e-6;
    /// 1e-5 bounds them. A block that read too few keys (a cut ignoring the cached positions or a
    /// late row) would miss weights of order 1/S ≥ 0.01.
    #[test]
    fn prompt_blocks_match_the_full_product() {
        // d = 72 also spans two 64-column value panels (the second partial).
        for d in [24, 72] {
            prompt_blocks_match_at(PromptShape {
                b: 2,
                h: 6,
                kv: 2,
                t: 2 * PB + 7,
                s: 2 * PB + 16,
                d,
            });
        }
    }

    fn prompt_blocks_match_at(sh: PromptShape) {
        let PromptShape { b, h, kv, t, s, d } = sh;
        let past = s - t;
        let (q, k, v) = (
            data(b * h * t * d, 11),
            data(b * kv * s * d, 12),
            data(b * kv * s * d, 13),
        );
        let mut bias = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let padded = bi == 1 && (j < 3 || i < 3);
                    if j > past + i || padded {
                        bias[(bi * t + i) * s + j] = -1e30;
                    }
                }
            }
        }
        let scale = 0.35f32;
        let mut out = vec![f32::NAN; b * h * t * d];
        prompt(sh, (&q, &k, &v), Some(&bias), scale, &mut out);
        // The strided products (CPUs without f32 FMA) against the same reference.
        let ends: Vec<usize> = bias.chunks(s).map(row_end).collect();
        let mut strided = vec![f32::NAN; b * h * t * d];
        prompt_strided(sh, (&q, &k, &v), Some(&bias), scale, &mut strided, &ends);
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / kv);
                for i in 0..t {
                    let qi = &q[((bi * h + hi) * t + i) * d..][..d];
                    let key = |j: usize| ((bi * kv + g) * s + j) * d;
                    let x: Vec<f64> = (0..s)
                        .map(|j| {
                            let dot: f64 =
                                (0..d).map(|c| qi[c] as f64 * k[key(j) + c] as f64).sum();
                            dot * scale as f64 + bias[(bi * t + i) * s + j] as f64
                        })
                        .collect();
                    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = x.iter().map(|&y| (y - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..s).map(|j| e[j] / sum * v[key(j) + c] as f64).sum();
                        for (path, o) in [("prompt", &out), ("strided", &strided)] {
                            let got = o[((bi * t + i) * h + hi) * d + c] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "{path} d {d}: b {bi} h {hi} row {i} [{c}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The widened row loops (`wide_fn!`: 16 lanes here) give the scalar loops' bits: each
    /// logit y·scale + b (a multiply then an add, never fused), the same maximum, and y·a; at
    /// 37 values (two vectors and a tail) with masked entries at -1e30.
    #[test]
    fn widened_row_loops_give_the_scalar_bits() {
        let x: Vec<f32> = data(37, 21).iter().map(|v| v * 7.0).collect();
        let mut bias = data(37, 22);
        bias[30..].fill(-1e30);
        let (scale, a) = (0.125f32 * 1.1, 0.3f32);
        let want: Vec<f32> = x.iter().zip(&bias).map(|(&y, &b)| y * scale + b).collect();
        let want_max = want.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut row = x.clone();
        assert_eq!(
            scale_max(&mut row, scale, Some(&bias)).to_bits(),
            want_max.to_bits()
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&row), bits(&want));
        let mut plain = x.clone();
        scale_max(&mut plain, scale, None);
        assert_eq!(
            bits(&plain),
            bits(&x.iter().map(|&y| y * scale).collect::<Vec<_>>())
        );
        times(&mut row, a);
        assert_eq!(
            bits(&row),
            bits(&want.iter().map(|&y| y * a).collect::<Vec<_>>())
        );
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
