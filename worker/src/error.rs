//! The one error enum of `iro-worker`, grouped by meaning; every variant names the file, tensor or field
//! that was wrong.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device or dtype string that does not parse, or a device libtorch cannot use here.
    #[error("device: {0}")]
    Device(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A checkpoint folder is incomplete or its config is unusable.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A tensor the architecture needs is not in any weight file.
    #[error("checkpoint {path}: missing tensor `{name}` (searched {files})")]
    MissingTensor { path: PathBuf, name: String, files: String },
    /// A tensor exists but has the wrong shape for the config.
    #[error("{file}: tensor `{name}` has shape {actual:?}, the config implies {expected:?}")]
    TensorShape { file: PathBuf, name: String, expected: Vec<i64>, actual: Vec<i64> },
    /// `model_type` / `architectures` name something this engine does not implement.
    #[error("checkpoint {path}: unsupported architecture `{arch}` (supported: gpt_neox, llama)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// tokenizer.json is missing or malformed, or text could not be encoded/decoded.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A request that cannot be served as asked (empty batch, prompt longer than the context, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An input data file has a malformed row.
    #[error("{path}:{line}: {message}")]
    Data { path: PathBuf, line: usize, message: String },
    /// libtorch raised an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// The object store, a record, a manifest or a data file (common's errors name the key or file).
    #[error(transparent)]
    Common(#[from] iro_common::Error),
    /// The task was taken back (lease lost, gang aborted, shutdown) and stopped part-way; nothing was reported.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A collective call failed or passed its deadline; the message names the ranks that did not answer.
    #[error("collective: {0}")]
    Collective(String),
    /// The coordinator refused a call or could not be reached.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// The task runner could not be built (its factory failed) or was lost (it panicked).
    #[error("task runner: {0}")]
    Runner(String),
}

impl Error {
    /// A stable, low-cardinality label for metrics and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Device(_) => "device",
            Error::Io { .. } => "io",
            Error::Checkpoint { .. } => "checkpoint",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::TensorShape { .. } => "tensor_shape",
            Error::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Error::Tokenizer { .. } => "tokenizer",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Data { .. } => "data",
            Error::Torch(_) => "torch",
            Error::Common(e) => e.kind(),
            Error::Cancelled(_) => "cancelled",
            Error::Collective(_) => "collective",
            Error::Coordinator(_) => "coordinator",
            Error::Runner(_) => "runner",
        }
    }

    /// Whether the error is the infrastructure's rather than the task's: the object store did not answer
    /// within its retry window. The coordinator then retries the task without counting a failure, so an
    /// outage longer than that window does not fail the run (review A2).
    pub fn is_infrastructure(&self) -> bool {
        matches!(self, Error::Common(iro_common::Error::StoreUnreachable { .. }))
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
