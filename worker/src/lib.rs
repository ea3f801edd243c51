//! The iro engine: everything that touches tensors. Frozen-model architectures on libtorch, generation,
//! guided search, reward scoring, value training, collectives, and the task loop that talks to the coordinator.

pub mod collective;
pub mod device;
pub mod error;
pub mod generate;
pub mod jobs;
pub mod model;
pub mod pipeline;
pub mod reward;
pub mod runtime;
pub mod search;
pub mod text;
pub mod train;

pub use error::{Error, Result};
