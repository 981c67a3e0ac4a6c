#[derive(Debug, thiserror::Error)]
pub enum FlError {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    /// Rounds in which no client succeeded, past `federate.max_failed_rounds`.
    #[error("{0}")]
    RoundsFailed(String),
    #[error(transparent)]
    Train(#[from] fedllm_train::TrainError),
    #[error(transparent)]
    Peft(#[from] fedllm_peft::PeftError),
    #[error(transparent)]
    Eval(#[from] fedllm_eval::EvalError),
    #[error(transparent)]
    Data(#[from] fedllm_data::DataError),
    #[error(transparent)]
    Model(#[from] fedllm_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, FlError>;
