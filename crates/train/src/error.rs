#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("train: {0}")]
    Config(String),
    #[error(transparent)]
    Peft(#[from] fedllm_peft::PeftError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;
