//! Evaluation as FS-LLM judges federated fine-tuning: HumanEval (code, pass@k with sandboxed
//! execution), GSM8K (8-shot chain of thought), MMLU (k-shot multiple choice), and loss /
//! perplexity. Results are appended per sample as JSON lines so an interrupted run resumes.

pub mod error;
pub mod gsm8k;
pub mod humaneval;
pub mod mmlu;
pub mod passk;
pub mod results;
pub mod sandbox;
pub mod stats;

pub use error::{EvalError, Result};
