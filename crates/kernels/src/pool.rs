//! A spinning thread pool for decode-sized work. One decode step runs a few hundred products
//! of tens of microseconds each; rayon parks idle workers and waking one costs about as much
//! as the product itself (measured: a 192×576 Q4_1 matvec took 32 µs on two threads, 12 µs on
//! one). Here the workers spin for a short while after each job, so the next job of the same
//! step starts at once, and sleep on a condvar once the step is over (no CPU burnt while idle).
//!
//! One job at a time: a caller that finds the pool busy (another thread decoding) runs its job
//! on its own thread instead of waiting.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the gaps between one decode
/// step's products (norms, attention: tens of µs), far shorter than a human-visible wait.
const SPIN: Duration = Duration::from_micros(500);

/// How long it spins without yielding the core.
const PAUSE: Duration = Duration::from_micros(50);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicU64,
    job: UnsafeCell<Option<Job>>,
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `Pool::busy`, before the epoch is
// published (Release) and after every worker has reported done (Acquire).
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: &'static Shared,
    workers: usize,
    busy: Mutex<()>,
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let workers = threads.saturating_sub(1);
        for w in 0..workers {
            std::thread::Builder::new()
                .name(format!("fedllm-decode-{w}"))
                .spawn(move || worker(shared, w + 1))
                .expect("spawn decode worker");
        }
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Threads a job runs on (the caller included).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` once for each participant `i` in `0..threads()`, the caller being 0, and
    /// returns when all have returned. Runs `f(0)` alone when the pool is busy.
    pub fn broadcast(&self, f: &(dyn Fn(usize) + Sync)) -> usize {
        let guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 => g,
            _ => {
                f(0);
                return 1;
            }
        };
        let s = self.shared;
        // SAFETY: the lifetime is erased only for the span of this call: every worker
        // reports done before we return, and no worker reads `job` after reporting.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Relaxed);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
        while s.done.load(Acquire) < self.workers {
            std::hint::spin_loop();
        }
        unsafe { *s.job.get() = None };
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Relaxed) {
            panic!("a decode worker panicked");
        }
        self.threads()
    }

    /// Calls `f(range)` over `0..n` in chunks of `chunk`, the chunks handed out in order to
    /// whichever thread is free (so a slow core takes fewer).
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if n <= chunk {
            f(0..n);
            return;
        }
        let next = AtomicUsize::new(0);
        self.broadcast(&|_| loop {
            let a = next.fetch_add(chunk, Relaxed);
            if a >= n {
                break;
            }
            f(a..(a + chunk).min(n));
        });
    }
}

fn worker(s: &'static Shared, _index: usize) {
    let mut seen = 0u64;
    loop {
        let t0 = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let waited = t0.elapsed();
            if waited > SPIN {
                s.sleepers.fetch_add(1, SeqCst);
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                while s.epoch.load(SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                drop(l);
                s.sleepers.fetch_sub(1, SeqCst);
            } else if waited > PAUSE {
                // Past the gaps inside a step: let other runnable threads (rayon's GEMM
                // workers during a prefill) have this core.
                std::thread::yield_now();
            }
        };
        seen = epoch;
        // SAFETY: published before the epoch (Release/Acquire), valid until we report done.
        if let Some(job) = unsafe { *s.job.get() } {
            let f = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(_index))).is_err() {
                s.panicked.store(true, Relaxed);
            }
        }
        s.done.fetch_add(1, Release);
    }
}

/// The process's decode pool, as many threads as rayon's (so `--threads` and
/// `RAYON_NUM_THREADS` govern both).
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
}

/// Runs `f` — prompt-sized work on a rayon worker — with rayon's other workers kept awake:
/// each spins, taking whatever parallel work the loops inside `f` put up, until `f` returns.
/// Left alone, a worker finding no work between two loops sleeps within tens of µs, and the
/// next loop waits for it to be woken (a futex call, then the scheduler's latency); a prompt
/// runs a few hundred loops (context switches per 256-token prefill 162 → 54). A spinner that
/// finds no work for [`SPIN`] leaves all the same: a worker waiting inside a stolen part of
/// `f` runs whatever it finds, this spinner included, and that part — so `f` — cannot finish
/// until the spinner above it returns. Off a rayon worker, or with one thread, `f` just runs.
pub fn rayon_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    rayon::spawn_broadcast(move |ctx| {
        // The caller's own share returns at once: spinning there would wait on `f`, which
        // sits below it on the same stack.
        if ctx.index() == me {
            return;
        }
        let mut idle_since = None;
        while !flag.load(Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                idle_since = None;
            } else if idle_since.get_or_insert_with(Instant::now).elapsed() > SPIN {
                return;
            } else {
                std::hint::spin_loop();
            }
        }
    });
    struct Done(std::sync::Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(true, Release);
        }
    }
    let _done = Done(done);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 7, 100, 1001] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_chunks(n, 16, &|r| {
                for i in r {
                    hits[i].fetch_add(1, Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn every_participant_runs_once_even_after_workers_sleep() {
        let pool = Pool::new(3);
        for round in 0..3 {
            let seen: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            assert_eq!(
                pool.broadcast(&|i| {
                    seen[i].fetch_add(1, Relaxed);
                }),
                3
            );
            assert!(seen.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
            // Wait until every worker has stopped spinning and sleeps: the next job must
            // still wake them (a lost wake-up hangs this test).
            while pool.shared.sleepers.load(SeqCst) < pool.workers {
                std::thread::yield_now();
            }
        }
    }

    #[test]
    fn a_busy_pool_runs_the_job_on_the_caller() {
        let pool = Pool::new(2);
        let inner = AtomicUsize::new(0);
        pool.broadcast(&|i| {
            if i == 0 {
                assert_eq!(
                    pool.broadcast(&|_| {
                        inner.fetch_add(1, Relaxed);
                    }),
                    1
                );
            }
        });
        assert_eq!(inner.load(Relaxed), 1);
    }

    /// `rayon_awake` from four threads at once into one 2-thread pool, each job two levels of
    /// parallel loops (stolen parts that wait inside, where a spinner of another job may land
    /// on top of them): every job returns its exact sum, (Σi)·(Σj), and all of them finish.
    #[test]
    fn concurrent_nested_prompts_all_finish_with_their_sums() {
        use rayon::prelude::*;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let job = || -> u64 {
            (0..64u64)
                .into_par_iter()
                .map(|i| (0..64u64).into_par_iter().map(|j| i * j).sum::<u64>())
                .sum()
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        assert_eq!(pool.install(|| rayon_awake(job)), 2016 * 2016);
                    }
                });
            }
        });
        // Off a pool thread it just runs.
        assert_eq!(rayon_awake(|| 7), 7);
    }

    /// The case the spinner's time limit exists for: worker B, inside a part of the work that
    /// `f` waits on, yields to rayon and so runs B's spinner on top of that part; `f` cannot
    /// return until the part finishes, which needs the spinner gone. It leaves after `SPIN`
    /// without work and all finishes (without the limit this test never returns).
    #[test]
    fn a_spinner_on_top_of_what_f_waits_for_leaves() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (b_running, f_started, part_done) = (
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        );
        pool.install(|| {
            rayon::join(
                || {
                    while !b_running.load(SeqCst) {
                        std::hint::spin_loop();
                    }
                    rayon_awake(|| {
                        f_started.store(true, SeqCst);
                        while !part_done.load(SeqCst) {
                            std::hint::spin_loop();
                        }
                    })
                },
                || {
                    b_running.store(true, SeqCst);
                    while !f_started.load(SeqCst) {
                        std::hint::spin_loop();
                    }
                    // Runs this worker's spinner (the only job there is) on top of this part.
                    assert_eq!(rayon::yield_now(), Some(rayon::Yield::Executed));
                    part_done.store(true, SeqCst);
                },
            )
        });
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.broadcast(&|i| assert!(i == 0, "worker fails"))
        }));
        assert!(r.is_err());
        assert_eq!(
            pool.broadcast(&|_| {}),
            2,
            "the pool still works after a panic"
        );
    }
}
