use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model. Messages name the file,
/// key or tensor at fault so a user can act on a single line.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The io error is shown inline, not as a `source`, so an error chain prints it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: IoError },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gpt2)")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor `{tensor}` has unsupported quantization type {ty} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)")]
    UnsupportedQuant {
        path: PathBuf,
        tensor: String,
        ty: String,
    },
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    #[error("weight `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// An io::Error that is deliberately not a `std::error::Error` source (see `ModelError::Io`).
#[derive(Debug)]
pub struct IoError(pub std::io::Error);

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // "No such file or directory (os error 2)" → "no such file or directory"
        let s = match self.0.kind() {
            std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => self.0.to_string(),
        };
        f.write_str(&s)
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            err: IoError(source),
        }
    }
}
