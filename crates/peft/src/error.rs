use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("adapter: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] fedllm_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PeftError>;

pub(crate) fn cfg(msg: impl Into<String>) -> PeftError {
    PeftError::Config(msg.into())
}
