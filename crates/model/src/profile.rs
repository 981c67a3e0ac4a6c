//! Where generation time goes: per-phase wall time, switched on by `fedllm bench generate`
//! only (off, a span costs one relaxed atomic load). Phases nest nowhere: each instrumented op
//! is a leaf, and what no span covers is "glue" (the bench's total minus the spans).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Products with the weights (quantized matvecs and dense GEMMs).
    Matvec,
    /// Softmax(QKᵀ)V over the cache, and appending to it.
    Attention,
    /// RMSNorm, rotary embeddings, SwiGLU.
    NormRope,
    /// Picking the next token from the logits.
    Sampling,
}

pub const PHASES: [Phase; 4] = [
    Phase::Matvec,
    Phase::Attention,
    Phase::NormRope,
    Phase::Sampling,
];

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Matvec => "matvec",
            Phase::Attention => "attention",
            Phase::NormRope => "norm/rope",
            Phase::Sampling => "sampling",
        }
    }
}

/// Starts counting (from zero) or stops.
pub fn enable(on: bool) {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ON.store(on, Ordering::Relaxed);
}

/// Seconds spent in `p` since `enable(true)`.
pub fn seconds(p: Phase) -> f64 {
    NANOS[p as usize].load(Ordering::Relaxed) as f64 / 1e9
}

/// Times `f` as phase `p` when profiling is on.
pub fn span<T>(p: Phase, f: impl FnOnce() -> T) -> T {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    NANOS[p as usize].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}
