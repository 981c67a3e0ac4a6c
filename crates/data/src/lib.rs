//! Instruction data for federated fine-tuning: records from common formats, FS-LLM's prompt
//! templates, tokenised samples whose loss covers only the response, and padded batches.

pub mod batch;
pub mod error;
pub mod federated;
pub mod record;
pub mod split;
pub mod template;
pub mod tokenize;

pub use batch::{batches, BatchOptions};
pub use error::{DataError, Result};
pub use record::{load, Format, LoadReport, Record};
pub use template::Template;
pub use tokenize::{tokenize_all, Sample, TokenizeReport};
