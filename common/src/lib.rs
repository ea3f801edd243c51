//! What the coordinator and the workers share: the run config and its validation, the object-store
//! layout every phase derives its keys from, and the error type for both. Never depends on libtorch.

pub mod config;
pub mod data;
pub mod error;
pub mod layout;
pub mod memory;
pub mod records;
pub mod store;
pub mod values;

pub use config::RunConfig;
pub use error::{Error, Result};
