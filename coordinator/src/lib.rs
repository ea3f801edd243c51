//! The iro control plane: turns a run config into iterations × phases × tasks, leases them to workers,
//! and reports progress. Never links libtorch: it runs on any small node.

pub mod driver;
pub mod error;
pub mod plan;
pub mod raft;
pub mod state;
pub mod status;
