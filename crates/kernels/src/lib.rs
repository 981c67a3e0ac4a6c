//! The hot CPU paths of training. Raw kernels work on slices (so they can be tested against a
//! plain f32 reference on any machine); `model` wraps them as candle ops with backward.
//!
//! Which instruction set runs is decided once per process ([`isa::selected`]): the best the CPU
//! and kernel allow, capped by `FEDLLM_KERNELS=amx|avx512bf16|portable` so every path can be
//! forced (tests run all of them; a machine where AMX misbehaves can opt out).

pub mod attention;
pub mod bench;
pub mod bf16;
pub mod fused;
pub mod gemm;
pub mod isa;
mod micro;
pub mod strided;
pub mod vexp;

pub use gemm::{matmul_bf16, ASrc, BSrc};
pub use isa::Isa;
