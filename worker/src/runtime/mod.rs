//! The worker side of the cluster: the task loop that registers with the coordinator, leases tasks,
//! heartbeats while a `TaskRunner` works, and reports outcomes.
//!
//! - `task`: the contract between the loop and the work (`TaskRunner`, `TaskRef`, `TaskControl`).
//! - `client`: the gRPC connection (bearer token, timeouts, retries of transient failures).
//! - `task_loop`: `run_worker`, from registration to the end of the run or a shutdown signal.
//! - `execute`: one leased task (gang rendezvous, heartbeats, cancellation, the report).
//! - `embedded`: `run_embedded`, a coordinator and N worker loops in one process.

pub mod client;
pub mod embedded;
mod execute;
pub mod task;
pub mod task_loop;

pub use client::Timeouts;
pub use embedded::{ProgressFn, SharedRunnerFactory, run_embedded, run_embedded_with_progress};
pub use task::{TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner};
pub use task_loop::{WorkerExit, WorkerOptions, run_worker};
pub use tokio_util::sync::CancellationToken;
