//! The one error enum of `iro-common`, grouped by meaning so callers can tell bad input from broken IO.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read at all.
    #[error("cannot read config {path}: {source}")]
    ConfigRead { path: PathBuf, source: std::io::Error },
    /// The TOML is malformed or has an unknown/mistyped field; the message names the field and line.
    #[error("invalid config {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// The TOML parsed but a value is out of range or inconsistent with another.
    #[error("invalid config {path}: field `{field}`: {message}")]
    ConfigValue { path: PathBuf, field: String, message: String },
    /// An id (run id, shard, ...) that would produce an unsafe or ambiguous object key.
    #[error("invalid {what} `{value}`: {message}")]
    InvalidId { what: &'static str, value: String, message: String },
}

impl Error {
    /// A stable, low-cardinality label for metrics and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ConfigRead { .. } => "config_read",
            Error::ConfigParse { .. } => "config_parse",
            Error::ConfigValue { .. } => "config_value",
            Error::InvalidId { .. } => "invalid_id",
        }
    }
}
