//! Generation throughput (workload W3): prefill tokens/s, decode tokens/s at batch 1 and 8,
//! load time and peak RSS. Timings live here, never in tests.

use std::time::Instant;

use candle_core::Tensor;

use crate::cache::KvCache;
use crate::error::Result;
use crate::generate::{sample, Sampling};
use crate::model::CausalLm;
use crate::profile::{Phase, PHASES};
use fedllm_rng::Rng;

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenBench {
    pub prompt_len: usize,
    pub prefill_tokens_per_s: f64,
    /// The fastest prefill's seconds in each phase, then the rest ("glue").
    pub prefill_phases: Vec<(&'static str, f64)>,
    /// (batch, decode tokens/s summed over the batch, context length at the start of decoding)
    pub decode: Vec<(usize, f64, usize)>,
    /// Per decode batch: seconds per step in each phase, then the rest ("glue").
    pub phases: Vec<(usize, Vec<(&'static str, f64)>)>,
}

/// Nanoseconds for one cache line to go to another thread and back, the mean of `trips`
/// (None with fewer than two CPUs). On a VM the two vCPUs may share a die (~60 ns here) or
/// not (~350 ns), which changes prefill speed (`kernels::halves`); the bench prints it so a
/// reading says which it got.
pub fn core_round_trip_ns(trips: usize) -> Option<f64> {
    use std::sync::atomic::{AtomicBool, Ordering::*};
    #[repr(align(64))]
    struct Line(AtomicBool);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 || trips == 0 {
        return None;
    }
    let ball = Line(AtomicBool::new(false));
    // Waits until the ball reads `want`; yields now and then, so a CPU shared with other
    // work (a test run) does not stall each trip for a whole time slice.
    let wait = |want: bool| {
        let mut spins = 0u32;
        while ball.0.load(Acquire) != want {
            spins += 1;
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    };
    let t0 = std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..trips {
                wait(true);
                ball.0.store(false, Release);
            }
        });
        let t0 = Instant::now();
        for _ in 0..trips {
            ball.0.store(true, Release);
            wait(false);
        }
        t0
    });
    Some(t0.elapsed().as_secs_f64() * 1e9 / trips as f64)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn prompt(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    // Ordinary token ids (skip the first 100, where special tokens usually live).
    (0..len)
        .map(|_| 100 + (rng.next_u64() % (vocab as u64 - 100)) as u32)
        .collect()
}

/// Prefill of `prompt_len` tokens (best of `reps`), then `decode_tokens` greedy steps at each
/// batch size, starting from a `decode_ctx`-token context.
pub fn bench_generate(
    model: &CausalLm,
    prompt_len: usize,
    decode_tokens: usize,
    decode_ctx: usize,
    batches: &[usize],
    reps: usize,
) -> Result<GenBench> {
    let vocab = model.config.vocab_size();
    let mut rng = Rng::new(7);
    let dev = &model.device;
    let p = prompt(&mut rng, prompt_len, vocab);
    let ids = Tensor::from_vec(p, (1, prompt_len), dev)?;
    let mut best = f64::INFINITY;
    let mut prefill_phases = Vec::new();
    for _ in 0..reps.max(1) {
        crate::profile::enable(true);
        let t0 = Instant::now();
        let mut cache = KvCache::new();
        let h = model.forward_hidden_last(&ids, None, &mut cache)?;
        let _ = model
            .logits(&h.narrow(1, h.dim(1)? - 1, 1)?)?
            .to_vec3::<f32>()?;
        let dt = t0.elapsed().as_secs_f64();
        if dt < best {
            best = dt;
            prefill_phases = split(dt, 1);
        }
        crate::profile::enable(false);
    }
    let mut decode = Vec::new();
    let mut phases = Vec::new();
    for &b in batches {
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|_| prompt(&mut rng, decode_ctx, vocab))
            .collect();
        let (mut cache, mut logits) = crate::generate::prefill(model, None, &rows, decode_tokens)?;
        crate::profile::enable(true);
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            let next: Vec<u32> = crate::profile::span(Phase::Sampling, || {
                logits
                    .iter()
                    .map(|l| sample(l, &Sampling::greedy(), &mut rng))
                    .collect()
            });
            let x = Tensor::from_vec(next, (b, 1), dev)?;
            let h = model.forward_hidden(&x, None, Some(&mut cache))?;
            logits = model.logits(&h)?.squeeze(1)?.to_vec2::<f32>()?;
        }
        let dt = t0.elapsed().as_secs_f64();
        phases.push((b, split(dt, decode_tokens)));
        crate::profile::enable(false);
        decode.push((b, (b * decode_tokens) as f64 / dt, decode_ctx));
    }
    Ok(GenBench {
        prompt_len,
        prefill_tokens_per_s: prompt_len as f64 / best,
        prefill_phases,
        decode,
        phases,
    })
}

/// `total` seconds over `steps` as seconds per step in each profiled phase, then the rest.
fn split(total: f64, steps: usize) -> Vec<(&'static str, f64)> {
    let per = |s: f64| s / steps.max(1) as f64;
    let mut p: Vec<(&'static str, f64)> = PHASES
        .iter()
        .map(|&ph| (ph.name(), per(crate::profile::seconds(ph))))
        .collect();
    let spans: f64 = p.iter().map(|x| x.1).sum();
    p.push(("glue", per(total) - spans));
    p
}

/// One decode block-product measurement (`qmatvec::matmul` on kept GGUF blocks).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockBench {
    pub what: &'static str,
    pub dtype: &'static str,
    /// Weight rows and reduction length; `m` activation rows.
    pub n: usize,
    pub k: usize,
    pub m: usize,
    /// (path, ns per weight block, weight GB/s) for every path this CPU runs.
    pub paths: Vec<(&'static str, f64, f64)>,
}

/// ns per weight block of the decode products on SmolLM2-135M's shapes, for 1 and 8 rows on
/// every `qmatvec` path: one layer's gate/up and down projections (in cache), the Q8_0 LM
/// head, and 240 gate/up matrices in a row (133 MB, past any L3: streamed from memory).
pub fn bench_blocks(reps: usize) -> Result<Vec<BlockBench>> {
    use crate::qmatvec;
    use candle_core::quantized::GgmlDType;
    let mut rng = Rng::new(7);
    let mut blocks = |t, n, k| random_blocks(&mut rng, t, n, k);
    let up = blocks(GgmlDType::Q4_1, 1536, 576)?;
    let down = blocks(GgmlDType::Q4_1, 576, 1536)?;
    let head = blocks(GgmlDType::Q8_0, 49152, 576)?;
    let streamed = up.repeat(240);
    let cases = [
        ("gate/up_proj", GgmlDType::Q4_1, &up, 1536, 576),
        ("down_proj", GgmlDType::Q4_1, &down, 576, 1536),
        ("lm_head", GgmlDType::Q8_0, &head, 49152, 576),
        (
            "240 x gate/up, streamed",
            GgmlDType::Q4_1,
            &streamed,
            1536 * 240,
            576,
        ),
    ];
    let mut out = Vec::new();
    for (what, t, w, n, k) in cases {
        for m in [1, 8] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let nb = (n * k / 32) as f64;
            // Calls per timing: about 20 ms of work at ~1.5 ns per block and row.
            let calls = (2e7 / (nb * 1.5 * m as f64)).ceil().max(1.0) as usize;
            let paths = qmatvec::available()
                .into_iter()
                .map(|p| {
                    let s = qmatvec::with_path(p, || {
                        fedllm_kernels::bench::best_of(reps.max(1), || {
                            for _ in 0..calls {
                                std::hint::black_box(qmatvec::matmul(t, w, n, k, &x, m));
                            }
                        })
                    }) / calls as f64;
                    (p.name(), s * 1e9 / nb, w.len() as f64 / s / 1e9)
                })
                .collect();
            out.push(BlockBench {
                what,
                dtype: if t == GgmlDType::Q4_1 { "Q4_1" } else { "Q8_0" },
                n,
                k,
                m,
                paths,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct PromptBench {
    pub what: &'static str,
    /// Weight rows, reduction length and activation rows.
    pub n: usize,
    pub k: usize,
    pub m: usize,
    /// (product, GFLOP/s counted as 2·m·n·k): the f32 GEMM over the dequantized panels, and
    /// the int16 GEMM (with its activation rounding) where the CPU runs it.
    pub products: Vec<(&'static str, f64)>,
}

/// GFLOP/s of the prompt products (256 rows) of SmolLM2-135M's gate/up and down projections on
/// kept Q4_1 blocks: the f32 GEMM other paths take, the Int16 path's int16 GEMM and the Int8
/// path's int8 GEMM.
pub fn bench_prompt(reps: usize) -> Result<Vec<PromptBench>> {
    use crate::qmatvec::Path;
    use candle_core::quantized::GgmlDType;
    use fedllm_kernels::{ASrc, BSrc};
    let mut rng = Rng::new(11);
    let m = 256;
    let mut out = Vec::new();
    for (what, n, k) in [("gate/up_proj", 1536, 576), ("down_proj", 576, 1536)] {
        let raw = random_blocks(&mut rng, GgmlDType::Q4_1, n, k)?;
        let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let gflops = |s: f64| 2.0 * (m * n * k) as f64 / s / 1e9;
        let mut products = Vec::new();
        if let Some(isa) = crate::ops::linear::f32_kernel_isa() {
            let b = BSrc::Quant {
                dtype: GgmlDType::Q4_1,
                data: &raw,
                rows: n,
                cols: k,
                t: true,
            };
            let mut c = vec![0f32; m * n];
            let s = timed(reps, || {
                fedllm_kernels::matmul_into(ASrc::F32(&x), m, b, &mut c, isa, false)
            })?;
            products.push(("f32", gflops(s)));
        }
        for path in [Path::Int16, Path::Int8]
            .into_iter()
            .filter(|p| p.supported())
        {
            let s = timed(reps, || {
                crate::qmatvec::prompt_matmul(path, GgmlDType::Q4_1, &raw, n, k, &x, m)
                    .map(|y| drop(std::hint::black_box(y)))
            })?;
            products.push((path.name(), gflops(s)));
        }
        out.push(PromptBench {
            what,
            n,
            k,
            m,
            products,
        });
    }
    Ok(out)
}

/// The best of `reps` runs of `f` in seconds (`kernels::bench::best_of`), or its first error.
fn timed(reps: usize, mut f: impl FnMut() -> std::result::Result<(), String>) -> Result<f64> {
    let mut err = None;
    let s = fedllm_kernels::bench::best_of(reps.max(1), || {
        if let Err(e) = f() {
            err.get_or_insert(e);
        }
    });
    match err {
        Some(e) => Err(candle_core::Error::Msg(e).into()),
        None => Ok(s),
    }
}

/// Standard-normal weights [n, k] quantized to `t`: the raw blocks.
fn random_blocks(
    rng: &mut Rng,
    t: candle_core::quantized::GgmlDType,
    n: usize,
    k: usize,
) -> Result<Vec<u8>> {
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
    let w = Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)?;
    Ok(candle_core::quantized::QTensor::quantize(&w, t)?
        .data()?
        .to_vec())
}

#[cfg(test)]
mod tests {
    /// The ping-pong ends: each of 200 trips is answered once (a lost or doubled answer
    /// would leave a thread spinning forever), and the mean is a positive, finite time.
    #[test]
    fn core_round_trip_ends_with_a_time() {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            assert_eq!(super::core_round_trip_ns(200), None);
            return;
        }
        let ns = super::core_round_trip_ns(200).expect("two CPUs");
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
        assert_eq!(super::core_round_trip_ns(0), None);
    }
}
