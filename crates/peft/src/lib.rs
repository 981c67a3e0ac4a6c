//! Adapters: the small sets of named tensors clients train and exchange. Names are PEFT's
//! (`base_model.model.<module>.lora_A.weight`, `prompt_encoder.embedding.weight`, ...) so files
//! load in PEFT unchanged; the base model stays frozen and shared.

pub mod adapter;
pub mod error;
pub mod full;
pub mod io;
pub mod lora;
pub mod merge;
pub mod prefix;
pub mod prompt;
pub mod ptuning;

pub use adapter::{Adapter, AdapterConfig, Batch};
pub use error::{PeftError, Result};
