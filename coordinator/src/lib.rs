//! The iro control plane: turns a run config into iterations × phases × tasks, leases them to workers,
//! and reports progress. Never links libtorch: it runs on any small node. `raft` replicates the run
//! state over three replicas (its module docs hold the replication decisions: raft-rs codec, entry
//! encoding).

pub mod driver;
pub mod error;
pub mod plan;
pub mod raft;
pub mod state;
pub mod status;
