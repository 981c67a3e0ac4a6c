#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    /// The server (or network) failed in a way retrying will not fix.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Net(String),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error(transparent)]
    Fl(#[from] fedllm_fl::FlError),
}

pub type Result<T> = std::result::Result<T, TransportError>;

pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| TransportError::File {
        path: path.into(),
        msg: e.to_string(),
    })
}
