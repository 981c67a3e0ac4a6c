//! fedllm's causal language models: LLaMA-family and GPT-2 architectures on candle, loading
//! from Hugging Face folders and GGUF files, tokenizers, chat templates and generation.
//! No network IO happens here: every model and tokenizer comes from a local path.

pub mod accuracy;
pub mod batch;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cache;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod llama;
pub mod model;
pub mod ops;
pub mod profile;
pub mod tokenizer;
pub mod weights;

pub use batch::Batch;
pub use cache::KvCache;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use generate::{
    generate, generate_after, generate_continuous, prefill, prefix_cache, prefix_cache_after,
    strip_prefix, Finish, GenerateConfig, Generation, Running, Sampling,
};
pub use ops::linear::MatmulPrecision;
// The op layer's layers and quantized products keep their short paths for other crates.
pub use model::{CausalLm, Loaded};
pub use ops::{linear, qmatvec};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::{LoadOptions, QuantMode, Weight};
