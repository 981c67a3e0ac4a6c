#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {msg}")]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("{path}:{line}: {msg}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        msg: String,
    },
    #[error("eval: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] fedllm_model::ModelError),
    #[error(transparent)]
    Peft(#[from] fedllm_peft::PeftError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EvalError>;
