//! The hot CPU paths of training. Raw kernels work on slices (so they can be tested against a
//! plain f32 reference on any machine); `model` wraps them as candle ops with backward.
//!
//! Which instruction set runs is decided once per process ([`isa::selected`]): the best the CPU
//! and kernel allow, capped by `FEDLLM_KERNELS=amx|avx512|avx512bf16|avx2|portable` so every path can be
//! forced (tests run all of them; a machine where AMX misbehaves can opt out).

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(feature = "bench")]
pub mod bench;
pub mod bf16;
pub mod fused;
pub mod gemm;
pub mod gemm_i16;
pub mod gemm_i8;
pub mod halves;
pub mod isa;
mod micro;
pub mod pool;
pub mod rounding;
pub mod strided;
pub mod vexp;

pub use gemm::{matmul_bf16, matmul_into, ASrc, BSrc};
pub use isa::Isa;

/// Deterministic values in [-1, 1) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104729) % 1999) as f32 / 1999.0 - 0.5) * 2.0)
        .collect()
}

/// Whether this CPU has AVX-512F (asked once; every kernel's dispatch asks here).
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *A.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A function whose body is compiled three times — for AVX-512F, for AVX2 and for the crate's
/// baseline (SSE2, 4 lanes) — and run in the widest form this CPU has: for plain element-wise
/// loops, which LLVM vectorizes at the width it is given. The bits stay: LLVM neither
/// reassociates nor contracts float operations (Rust gives it no fast-math flags), so each
/// element gets the same IEEE operations at any width.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,avx512f")]
                unsafe fn w512($($a: $t),*) $(-> $r)? $body
                #[target_feature(enable = "avx2")]
                unsafe fn w256($($a: $t),*) $(-> $r)? $body
                if $crate::has_avx512() {
                    // SAFETY: AVX-512F was detected.
                    return unsafe { w512($($a),*) };
                }
                if $crate::avx2::available() {
                    // SAFETY: AVX2 was detected.
                    return unsafe { w256($($a),*) };
                }
            }
            $body
        }
    };
}
pub(crate) use wide_fn;

/// `n` values (f32, or another plain number type) for the caller to fill completely before
/// reading any of them: the activations' hot path skips the zeroing pass of `vec![0.0; n]`
/// (candle's `alloc_uninit` does the same).
///
/// # Safety
/// Every element must be written before it is read.
#[allow(clippy::uninit_vec)]
pub unsafe fn uninit<T: Copy>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.set_len(n);
    v
}
