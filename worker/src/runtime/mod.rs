//! The worker side of the cluster: the task loop that registers with the coordinator, leases tasks,
//! heartbeats while a `TaskRunner` works, and reports outcomes.

pub mod task;

pub use task::{TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner};
