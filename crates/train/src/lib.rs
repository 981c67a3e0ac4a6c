//! The local trainer every client runs each round: causal-LM loss on response tokens, AdamW or
//! SGD on fp32 master weights, LR schedules, exact gradient accumulation, global-norm clipping,
//! bf16 mixed precision, and NaN-loss skipping that is counted and reported.

#[cfg(feature = "bench")]
pub mod bench;
pub mod error;
pub mod finetune;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
pub use optim::{Optimizer, OptimizerConfig};
pub use progress::Progress;
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{StepStats, TrainConfig, Trainer};
