//! A prompt's rows split in two at the same row by every op of a layer: the first part runs on
//! the calling thread, the second is offered to the pool (`rayon::join`), so with two threads
//! each core reads the rows it wrote itself in the op before.
//!
//! Why: on a 2-vCPU VM the host places the two cores near each other (a cache line moves
//! between them in ~30 ns) or on different dies (~175 ns, `/proc/cpuinfo` cannot tell). Ops
//! split by columns (GEMM tasks) or heads (RoPE, attention) hand every row's data to the
//! other core between ops; on far cores that cost an int8 prefill of 256 tokens ~22% (2,180
//! → 1,690 tok/s, measured with the core-to-core round trip at 350 ns against 60 ns).
//! Inside each half an op still splits its work with rayon, so an idle thread takes work
//! from the other's half and the two stay balanced.

use std::ops::Range;

/// The split falls between GEMM register blocks (6 rows). Halves of equal work matter more
/// than other ops' boundaries: at 144 | 112 rows (attention's 36-row blocks) the products'
/// idle thread took the other's column tasks late and whole, and an int8 prefill's products
/// took 105 ms against 96 at 126 | 130.
const UNIT: usize = 6;

/// Fewer rows than this run unsplit (as one part): each half keeps a few register blocks.
const MIN_ROWS: usize = 72;

/// Where rows 0..m split: the multiple of [`UNIT`] nearest m/2 (lower on a tie), or m under
/// [`MIN_ROWS`].
pub fn split(m: usize) -> usize {
    if m < MIN_ROWS {
        return m;
    }
    (m + UNIT) / (2 * UNIT) * UNIT
}

/// f(0..s) on this thread and f(s..m) offered to the pool, s = [`split`]`(m)`.
pub fn run(m: usize, f: impl Fn(Range<usize>) + Sync) {
    run_at(split(m), m, f)
}

/// [`run`] cut at `s` instead (work counted in other units than rows, e.g. attention's
/// tasks); one part only when `s` is 0 or `m`.
pub fn run_at(s: usize, m: usize, f: impl Fn(Range<usize>) + Sync) {
    if s == 0 || s >= m {
        return f(0..m);
    }
    rayon::join(|| f(0..s), || f(s..m));
}

/// `f(task, rows)` for every task of `0..tasks` in each half of rows 0..m ([`run`]), the
/// tasks of a half on rayon's threads: a product's column tasks over its rows' halves.
pub fn for_each_task(m: usize, tasks: usize, f: impl Fn(usize, Range<usize>) + Sync) {
    use rayon::prelude::*;
    run(m, |rows| {
        (0..tasks)
            .into_par_iter()
            .for_each(|task| f(task, rows.clone()))
    });
}

/// [`run`] over the rows of y [m, n] (m = y.len() / n), each half getting its rows' range
/// and its part of y.
pub fn rows_mut<T: Send>(y: &mut [T], n: usize, f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let m = y.len() / n.max(1);
    let s = split(m);
    if s == m {
        return f(0..m, y);
    }
    let (a, b) = y.split_at_mut(s * n);
    rayon::join(|| f(0..s, a), || f(s..m, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split is a multiple of 6 within 3 rows of the middle (no split under 72 rows),
    /// and both parts together are every row once (also for `run_at`'s given cuts).
    #[test]
    fn halves_cover_the_rows_at_a_unit_boundary() {
        assert_eq!(split(256), 126);
        assert_eq!(split(71), 71);
        assert_eq!(split(72), 36);
        for m in 0..2000 {
            let s = split(m);
            assert!(s <= m);
            if m >= MIN_ROWS {
                assert_eq!(s % UNIT, 0, "m {m}");
                assert!(2 * s.abs_diff(m / 2) <= UNIT + 1, "m {m}: {s} / {}", m - s);
            } else {
                assert_eq!(s, m);
            }
            let seen = std::sync::Mutex::new(vec![0u8; m]);
            run(m, |r| r.for_each(|i| seen.lock().unwrap()[i] += 1));
            assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "m {m}");
        }
        // `run_at` at any cut, none (0) and past the end included.
        for s in [0, 1, 5, 10, 12] {
            let seen = std::sync::Mutex::new(vec![0u8; 10]);
            run_at(s, 10, |r| r.for_each(|i| seen.lock().unwrap()[i] += 1));
            assert!(
                seen.into_inner().unwrap().iter().all(|&c| c == 1),
                "cut {s}"
            );
        }
    }

    /// The first part runs on the calling thread (what keeps a product's first rows on the
    /// core that reads them next), for `run` and `rows_mut`. The second part waits until the
    /// first has run, so parts run in the other order would put the first on the other
    /// thread (it would have to steal it) and fail here, not pass by timing.
    #[test]
    fn the_first_half_stays_on_the_calling_thread() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let me = std::thread::current().id();
            let first = std::sync::Mutex::new(Vec::new());
            let ran = AtomicBool::new(false);
            let part = |r: Range<usize>| {
                if r.start == 0 {
                    first.lock().unwrap().push(std::thread::current().id());
                    ran.store(true, SeqCst);
                } else {
                    while !ran.load(SeqCst) {
                        std::hint::spin_loop();
                    }
                }
            };
            run(256, part);
            ran.store(false, SeqCst);
            let mut y = vec![0u8; 256 * 4];
            rows_mut(&mut y, 4, |r, _| part(r));
            assert_eq!(first.into_inner().unwrap(), vec![me, me]);
        });
    }

    /// Each half of `rows_mut` gets exactly its rows of y.
    #[test]
    fn rows_mut_hands_each_half_its_rows() {
        let (m, n) = (200, 3);
        let mut y = vec![0usize; m * n];
        rows_mut(&mut y, n, |rows, part| {
            assert_eq!(part.len(), rows.len() * n);
            for (i, v) in part.iter_mut().enumerate() {
                *v = rows.start * n + i;
            }
        });
        assert!(y.iter().enumerate().all(|(i, &v)| v == i));
    }
}
