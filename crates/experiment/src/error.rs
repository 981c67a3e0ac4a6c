use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    /// A cell that failed or is malformed, by its id (`fed-gsm8k-3/lora-fed`).
    #[error("cell {cell}: {msg}")]
    Cell { cell: String, msg: String },
    #[error("experiment: {0}")]
    Config(String),
    #[error(transparent)]
    Fl(#[from] fedllm_fl::FlError),
    #[error(transparent)]
    Eval(#[from] fedllm_eval::EvalError),
    #[error(transparent)]
    Model(#[from] fedllm_model::ModelError),
    #[error(transparent)]
    Peft(#[from] fedllm_peft::PeftError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ExperimentError>;

pub fn file_err(path: &Path, e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

pub fn cell_err(cell: &str, e: impl std::fmt::Display) -> ExperimentError {
    ExperimentError::Cell {
        cell: cell.into(),
        msg: e.to_string(),
    }
}
