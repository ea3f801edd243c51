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

    /// The store URL is malformed, has an unsupported scheme, or its folder cannot be created.
    #[error("cannot open store {url}: {message}")]
    StoreOpen { url: String, message: String },
    /// The store did not answer (connection refused, DNS, timeout) after the configured retries.
    #[error("store {url} unreachable during {op} of `{key}`: {message}")]
    StoreUnreachable { url: String, op: &'static str, key: String, message: String },
    /// The store answered, but the operation failed (permissions, missing bucket, server error, ...).
    #[error("store {url}: {op} of `{key}` failed: {message}")]
    StoreIo { url: String, op: &'static str, key: String, message: String },
    /// A key that must exist does not.
    #[error("object `{key}` not found in store {url}")]
    ObjectMissing { url: String, key: String },
    /// JSON (a whole object, or one line of JSON Lines) that does not parse into the expected type.
    /// `location` names the store and key, or the file.
    #[error("malformed JSON in {location}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    MalformedJson { location: String, line: Option<usize>, message: String },
    /// A value could not be serialised (for example a record holding a non-finite number where JSON needs one).
    #[error("cannot encode {what}: {message}")]
    Encode { what: String, message: String },
    /// An object's bytes do not hash to the sha256 its manifest recorded: corrupted or overwritten.
    #[error("checksum mismatch for `{key}` in store {url}: manifest says sha256 {expected}, object has {actual}")]
    ChecksumMismatch { url: String, key: String, expected: String, actual: String },
    /// A manifest that is inconsistent with itself, with the run layout, or with the objects it points to.
    /// `location` names the manifest (and the store, once it is in one) or the shard object.
    #[error("invalid manifest: {location}: {message}")]
    ManifestInvalid { location: String, message: String },
    /// A data file could not be opened or read at all.
    #[error("cannot read data file {path}: {message}")]
    DataRead { path: PathBuf, message: String },
    /// One row of a data file is malformed or lacks a required field. `unit` is "line" (JSON Lines),
    /// "row" (parquet) or "item" (a JSON array), each counted from 1.
    #[error("{path}: {unit} {index}{}: {message}", field.as_ref().map(|f| format!(": field `{f}`")).unwrap_or_default())]
    DataRow { path: PathBuf, unit: &'static str, index: usize, field: Option<String>, message: String },
    /// The seeded prompt order has no prompts left for this iteration.
    #[error(
        "data exhausted: iteration {iteration} needs prompts {start}..{end} of the seeded order, but there are only {available}"
    )]
    DataExhausted { iteration: u32, start: usize, end: usize, available: usize },
}

impl Error {
    /// A stable, low-cardinality label for metrics and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ConfigRead { .. } => "config_read",
            Error::ConfigParse { .. } => "config_parse",
            Error::ConfigValue { .. } => "config_value",
            Error::InvalidId { .. } => "invalid_id",
            Error::StoreOpen { .. } => "store_open",
            Error::StoreUnreachable { .. } => "store_unreachable",
            Error::StoreIo { .. } => "store_io",
            Error::ObjectMissing { .. } => "object_missing",
            Error::MalformedJson { .. } => "malformed_json",
            Error::Encode { .. } => "encode",
            Error::ChecksumMismatch { .. } => "checksum_mismatch",
            Error::ManifestInvalid { .. } => "manifest_invalid",
            Error::DataRead { .. } => "data_read",
            Error::DataRow { .. } => "data_row",
            Error::DataExhausted { .. } => "data_exhausted",
        }
    }
}
