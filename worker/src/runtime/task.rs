//! The contract between the task loop and the work itself: the loop (leasing, heartbeats, reports) hands a
//! `TaskRef` to a `TaskRunner`, which does the tensor work, writes its output to the object store at the
//! attempt-specific key and returns where it put it. The loop never looks inside a task; the runner never
//! talks to the coordinator. Runners are synchronous: libtorch work blocks a thread anyway.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::collective::AbortSignal;
use crate::error::Result;

/// The three phases of an iteration, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskPhase {
    Rollout,
    Train,
    Eval,
}

impl TaskPhase {
    /// The wire spelling (`TaskSpec.phase`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Rollout => "rollout",
            TaskPhase::Train => "train",
            TaskPhase::Eval => "eval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rollout" => Some(TaskPhase::Rollout),
            "train" => Some(TaskPhase::Train),
            "eval" => Some(TaskPhase::Eval),
            _ => None,
        }
    }
}

impl fmt::Display for TaskPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One leased unit of work. Iterations count from 1; shards from 0 (the train task is shard 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: String,
    pub attempt: u32,
    pub iteration: u32,
    pub phase: TaskPhase,
    pub shard: u32,
    /// Train-gang rank and world size (0 and 1 outside a gang).
    pub rank: u32,
    pub world: u32,
    /// What each rank published when the gang formed (ring addresses, rank 0's NCCL id); empty outside a gang.
    pub endpoints: Vec<String>,
}

/// What a finished task reports: the object it wrote, its checksum and its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutput {
    /// Object-store key of the attempt-specific output (a JSONL shard, or the value checkpoint's weights).
    pub key: String,
    pub sha256: String,
    /// Records written (rows of a shard; optimizer steps of a training).
    pub records: u64,
    /// Tokens generated to produce it.
    pub tokens: u64,
}

/// Shared between the loop and a running task: the loop cancels (lease lost, shutdown), the task reports
/// progress for heartbeats and checks for cancellation between batches; a gang's collective watches the
/// same flag (`abort_signal`), so a rank blocked on its peers stops too.
#[derive(Debug, Default)]
pub struct TaskControl {
    cancelled: AbortSignal,
    done: AtomicU64,
    total: AtomicU64,
}

impl TaskControl {
    pub fn cancel(&self) {
        self.cancelled.raise();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.is_raised()
    }

    /// The cancellation as a signal for code that blocks inside one unit of work (a collective call).
    pub fn abort_signal(&self) -> AbortSignal {
        self.cancelled.clone()
    }

    /// `Err(Cancelled)` once the loop has cancelled the task: call between units of work.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.is_cancelled() { Err(crate::Error::Cancelled(what.to_owned())) } else { Ok(()) }
    }

    pub fn set_progress(&self, done: u64, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(done, Ordering::Relaxed);
    }

    /// (done, total)
    pub fn progress(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}

/// Does the work of one task. Implementations keep loaded models across calls.
pub trait TaskRunner: Send {
    fn run(&mut self, task: &TaskRef, control: &TaskControl) -> Result<TaskOutput>;

    /// The seam for collectives: what this rank publishes to its train gang through the coordinator
    /// (its TCP ring listen address; rank 0 also its NCCL unique id). The task loop calls it once per
    /// gang attempt, before JoinGang, and `run` then receives every rank's answer in
    /// `TaskRef::endpoints` (`endpoints[r]` from rank r). A runner that binds a listener here keeps it
    /// for the `run` call that follows. The default publishes a placeholder, which is all a gang of
    /// one rank needs.
    fn gang_endpoint(&mut self, task: &TaskRef) -> Result<String> {
        Ok(format!("rank-{}-of-{}", task.rank, task.world))
    }
}
