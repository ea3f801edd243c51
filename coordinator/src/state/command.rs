//! What goes into the run state (commands, the log entries the driver persists and Raft replicates)
//! and what comes out (a reply for the caller, events for logs and metrics). Time is always a field
//! of the command, never read from a clock, so replaying the log rebuilds the same state.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{TaskId, WorkerId};

/// What a worker brings, as it reports it at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// "cpu", "cuda:0", ...
    pub device: String,
    pub memory_bytes: u64,
    /// Model folders already loaded or on local disk.
    pub cached_models: Vec<String>,
}

/// Work done on the current task, in the task's own unit (prompts of a shard, optimizer steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// The attempt of a task a worker believes it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    pub task_id: TaskId,
    pub attempt: u32,
}

/// What a completed attempt wrote: the manifest entry the next phase reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Object-store key of the attempt-specific output.
    pub key: String,
    pub sha256: String,
    pub records: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A new worker, or a known one whose process restarted (it then loses any lease it held).
    RegisterWorker {
        worker_id: WorkerId,
        name: String,
        resources: Resources,
        now_ms: u64,
        /// The nonce of this registration, chosen by the driver (so a replay sets the same one): every
        /// later call of the process must present it, and a newer registration of the id replaces it,
        /// so two processes under one id cannot share a lease (review A6). Empty in logs written before
        /// sessions existed.
        #[serde(default)]
        session: String,
    },
    /// Liveness, and when `lease` is set, an extension of that lease.
    Heartbeat {
        worker_id: WorkerId,
        lease: Option<LeaseRef>,
        progress: Progress,
        now_ms: u64,
    },
    /// Ask for work. Idempotent while the worker holds a lease: the same lease comes back, so a lost
    /// reply does not strand a task until its lease expires.
    LeaseTask {
        worker_id: WorkerId,
        now_ms: u64,
    },
    CompleteTask {
        worker_id: WorkerId,
        task_id: TaskId,
        attempt: u32,
        output: Output,
        now_ms: u64,
    },
    /// `released`: the worker gives the lease back (SIGTERM, preemption); the task is retried without
    /// counting a failure. `retryable`: the error was the infrastructure's, not the task's (the object
    /// store unreachable); the task is retried after a backoff without counting a failure either.
    FailTask {
        worker_id: WorkerId,
        task_id: TaskId,
        attempt: u32,
        error: String,
        released: bool,
        #[serde(default)]
        retryable: bool,
        now_ms: u64,
    },
    /// The driver's timer tick: reap expired leases, dead workers and gangs that did not gather in time.
    ExpireLeases {
        now_ms: u64,
    },
    /// A gang rank publishes its endpoint (rank 0: the NCCL unique id; every rank: its ring address)
    /// and asks whether the gang is complete. Extends the rank's lease like a heartbeat.
    JoinGang {
        worker_id: WorkerId,
        task_id: TaskId,
        attempt: u32,
        endpoint: String,
        now_ms: u64,
    },
    /// A rank gives up on the gang (a peer stopped answering a collective, ...): the whole gang stops.
    AbortGang {
        worker_id: WorkerId,
        task_id: TaskId,
        attempt: u32,
        reason: String,
        now_ms: u64,
    },
    /// The manifest writer found the accepted output of a finished task missing from the store, or not
    /// what its worker reported (review A8). The task is re-opened as if its lease had been lost: Pending
    /// again, its stage active again, a new attempt for the next worker; it counts as a failure of the
    /// worker that reported the output, so an output that can never be read fails the run at the task's
    /// attempt limit instead of looping. Sent by the driver, never by a worker.
    RejectOutput {
        task_id: TaskId,
        attempt: u32,
        problem: OutputProblem,
        /// What was wrong, naming the object and the store.
        detail: String,
        now_ms: u64,
    },
}

/// What was wrong with an accepted output (a closed set: it labels a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputProblem {
    /// The object is not in the store.
    Missing,
    /// Its bytes do not hash to the sha256 the worker reported.
    ChecksumMismatch,
    /// It hashes right but does not hold what was reported (record count, a listed file's size, JSON that
    /// does not parse).
    Malformed,
}

impl OutputProblem {
    pub const ALL: [OutputProblem; 3] =
        [OutputProblem::Missing, OutputProblem::ChecksumMismatch, OutputProblem::Malformed];

    pub fn kind(self) -> &'static str {
        match self {
            OutputProblem::Missing => "missing",
            OutputProblem::ChecksumMismatch => "checksum_mismatch",
            OutputProblem::Malformed => "malformed",
        }
    }
}

impl Command {
    /// The worker a worker's command is from; None for the driver's own commands.
    pub fn worker_id(&self) -> Option<&WorkerId> {
        match self {
            Command::RegisterWorker { worker_id, .. }
            | Command::Heartbeat { worker_id, .. }
            | Command::LeaseTask { worker_id, .. }
            | Command::CompleteTask { worker_id, .. }
            | Command::FailTask { worker_id, .. }
            | Command::JoinGang { worker_id, .. }
            | Command::AbortGang { worker_id, .. } => Some(worker_id),
            Command::ExpireLeases { .. } | Command::RejectOutput { .. } => None,
        }
    }

    /// Every `kind()`, so metrics can show a zero before the first of each.
    pub const KINDS: [&'static str; 9] = [
        "register_worker",
        "heartbeat",
        "lease_task",
        "complete_task",
        "fail_task",
        "expire_leases",
        "join_gang",
        "abort_gang",
        "reject_output",
    ];

    pub fn now_ms(&self) -> u64 {
        match self {
            Command::RegisterWorker { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::LeaseTask { now_ms, .. }
            | Command::CompleteTask { now_ms, .. }
            | Command::FailTask { now_ms, .. }
            | Command::ExpireLeases { now_ms }
            | Command::JoinGang { now_ms, .. }
            | Command::AbortGang { now_ms, .. }
            | Command::RejectOutput { now_ms, .. } => *now_ms,
        }
    }

    /// Sets the time the command carries (the driver stamps every command with its clock).
    pub fn set_now_ms(&mut self, now: u64) {
        match self {
            Command::RegisterWorker { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::LeaseTask { now_ms, .. }
            | Command::CompleteTask { now_ms, .. }
            | Command::FailTask { now_ms, .. }
            | Command::ExpireLeases { now_ms }
            | Command::JoinGang { now_ms, .. }
            | Command::AbortGang { now_ms, .. }
            | Command::RejectOutput { now_ms, .. } => *now_ms = now,
        }
    }

    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RegisterWorker { .. } => "register_worker",
            Command::Heartbeat { .. } => "heartbeat",
            Command::LeaseTask { .. } => "lease_task",
            Command::CompleteTask { .. } => "complete_task",
            Command::FailTask { .. } => "fail_task",
            Command::ExpireLeases { .. } => "expire_leases",
            Command::JoinGang { .. } => "join_gang",
            Command::AbortGang { .. } => "abort_gang",
            Command::RejectOutput { .. } => "reject_output",
        }
    }
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub reply: Reply,
    /// What changed, in order, for telemetry. Not part of the state.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Reply {
    Registered {
        worker_id: WorkerId,
        heartbeat_interval_ms: u64,
        /// The registration's session nonce, for the process to present on every later call.
        session: String,
    },
    /// A heartbeat without a lease was recorded.
    Alive,
    /// A heartbeat (or JoinGang) renewed the lease until `deadline_ms`.
    LeaseExtended {
        deadline_ms: u64,
    },
    Lease(Lease),
    /// The output of this attempt is the accepted one.
    Accepted {
        task_id: TaskId,
        attempt: u32,
    },
    /// A gang rank other than 0 finished; rank 0's completion carries the task's output.
    RankFinished {
        task_id: TaskId,
        rank: u32,
    },
    /// FailTask / AbortGang took the lease back; `will_retry` is false when the task has now failed.
    Returned {
        task_id: TaskId,
        will_retry: bool,
    },
    /// JoinGang: not all ranks have joined yet.
    GangWaiting {
        joined: u32,
        world: u32,
        retry_after_ms: u64,
    },
    /// JoinGang: the gang is complete; `endpoints[r]` is what rank r published.
    GangReady {
        rank: u32,
        world: u32,
        endpoints: Vec<String>,
    },
    Expired {
        requeued: Vec<TaskId>,
        failed: Vec<TaskId>,
        dead_workers: Vec<WorkerId>,
        /// Records of workers dead for the plan's retention, holding nothing, that are gone now.
        removed_workers: Vec<WorkerId>,
    },
    /// The command referred to a lease this worker does not hold (any more): nothing about tasks or the
    /// run changed. For a heartbeat it means "stop working on that task".
    Fenced(Fenced),
}

/// The answer to LeaseTask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Lease {
    Task {
        task_id: TaskId,
        attempt: u32,
        deadline_ms: u64,
    },
    /// A rank of the train gang; call JoinGang until the reply is GangReady.
    GangRank {
        task_id: TaskId,
        attempt: u32,
        rank: u32,
        world: u32,
        deadline_ms: u64,
        join_deadline_ms: u64,
    },
    RetryAfter {
        ms: u64,
        reason: WaitReason,
    },
    RunFinished,
    RunFailed {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitReason {
    /// Every task of the current phase is leased or done; the next phase waits for all of them.
    PhaseBarrier,
    /// The train gang already has all its ranks.
    GangFull,
    /// No train gang forms until R idle workers are asking for a rank; this one is counted.
    GangGathering,
    /// The only pending tasks lost a lease lately and wait out their backoff (or for a worker that has not
    /// failed them).
    Backoff,
    /// This worker failed too many tasks in a row and gets none for a while.
    Quarantined,
}

/// Why a command about a lease was ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fenced {
    /// The run finished or failed; nothing more is accepted.
    RunOver,
    /// Another (or this) attempt's output was already accepted.
    AlreadyDone { accepted_attempt: u32 },
    /// The task has been leased again since; this attempt is stale.
    StaleAttempt { current_attempt: u32 },
    /// This attempt is not leased to this worker (it expired, was released, or the gang was aborted).
    NotHolder,
    /// The task failed for good.
    TaskFailed,
    /// A gang rank reported completion before all ranks had joined: no training can have happened.
    GangNotStarted,
}

impl Fenced {
    /// Every `kind()`, so metrics can show a zero before the first of each.
    pub const KINDS: [&'static str; 6] =
        ["run_over", "already_done", "stale_attempt", "not_holder", "task_failed", "gang_not_started"];

    pub fn kind(&self) -> &'static str {
        match self {
            Fenced::RunOver => "run_over",
            Fenced::AlreadyDone { .. } => "already_done",
            Fenced::StaleAttempt { .. } => "stale_attempt",
            Fenced::NotHolder => "not_holder",
            Fenced::TaskFailed => "task_failed",
            Fenced::GangNotStarted => "gang_not_started",
        }
    }
}

impl fmt::Display for Fenced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fenced::RunOver => f.write_str("the run is over"),
            Fenced::AlreadyDone { accepted_attempt } => {
                write!(f, "the task is already done (attempt {accepted_attempt} was accepted)")
            }
            Fenced::StaleAttempt { current_attempt } => {
                write!(f, "stale attempt: the task has been leased again as attempt {current_attempt}")
            }
            Fenced::NotHolder => f.write_str("this worker does not hold that attempt's lease"),
            Fenced::TaskFailed => f.write_str("the task has failed"),
            Fenced::GangNotStarted => f.write_str("the gang has not started: not all ranks have joined"),
        }
    }
}

/// Why a lease ended without a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossCause {
    /// The worker gave it back (SIGTERM); not a failure of the task.
    Released,
    /// The worker reported an error.
    Failed,
    /// The worker reported an error of the infrastructure (the object store did not answer within its
    /// retry window): retried after a backoff, never counted.
    Infrastructure,
    LeaseExpired,
    WorkerDead,
    /// The worker registered again: its old process, and its work, are gone.
    WorkerRestarted,
    /// Not all ranks joined the gang in time.
    GangJoinTimeout,
    /// A rank called AbortGang.
    GangAborted,
    /// The task was done, but the manifest writer found its accepted output missing or wrong.
    OutputRejected,
}

impl LossCause {
    pub const ALL: [LossCause; 9] = [
        LossCause::Released,
        LossCause::Failed,
        LossCause::Infrastructure,
        LossCause::LeaseExpired,
        LossCause::WorkerDead,
        LossCause::WorkerRestarted,
        LossCause::GangJoinTimeout,
        LossCause::GangAborted,
        LossCause::OutputRejected,
    ];

    /// Whether the loss may be the task's (or its worker's) fault, and so counts toward `max_attempts`
    /// and the worker's quarantine: a poison task fails the run instead of looping forever. A release, an
    /// infrastructure error and a gang that could not gather say nothing about the task.
    pub fn counts_as_failure(self) -> bool {
        !matches!(self, LossCause::Released | LossCause::Infrastructure | LossCause::GangJoinTimeout)
    }

    pub fn kind(self) -> &'static str {
        match self {
            LossCause::Released => "released",
            LossCause::Failed => "failed",
            LossCause::Infrastructure => "infrastructure",
            LossCause::LeaseExpired => "lease_expired",
            LossCause::WorkerDead => "worker_dead",
            LossCause::WorkerRestarted => "worker_restarted",
            LossCause::GangJoinTimeout => "gang_join_timeout",
            LossCause::GangAborted => "gang_aborted",
            LossCause::OutputRejected => "output_rejected",
        }
    }
}

/// What changed while applying a command; the driver turns these into log lines and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    WorkerRegistered {
        worker: WorkerId,
    },
    WorkerDead {
        worker: WorkerId,
    },
    /// A worker marked dead spoke again.
    WorkerRevived {
        worker: WorkerId,
    },
    /// The record of a long-dead worker that held nothing was removed (its retention is over, or room was
    /// needed for a new worker); if it calls again it is an unknown worker and must register.
    WorkerRemoved {
        worker: WorkerId,
    },
    /// The worker failed `failures` tasks in a row and gets no new task until `until_ms`.
    WorkerQuarantined {
        worker: WorkerId,
        failures: u32,
        until_ms: u64,
    },
    PhaseStarted {
        iteration: u32,
        #[serde(with = "super::ids::phase_serde")]
        phase: crate::plan::Phase,
    },
    TaskLeased {
        task: TaskId,
        attempt: u32,
        worker: WorkerId,
    },
    TaskDone {
        task: TaskId,
        attempt: u32,
        worker: WorkerId,
    },
    /// A lease ended without completion and the task is pending again.
    TaskRequeued {
        task: TaskId,
        attempt: u32,
        cause: LossCause,
        message: String,
    },
    TaskFailed {
        task: TaskId,
        attempt: u32,
        cause: LossCause,
        message: String,
    },
    GangStarted {
        task: TaskId,
        attempt: u32,
        world: u32,
    },
    GangAborted {
        task: TaskId,
        attempt: u32,
        cause: LossCause,
        message: String,
    },
    /// A done task's accepted output was found missing or wrong; the task is pending again and its stage
    /// (`reopened`: the run had moved past it, or finished) active again.
    OutputRejected {
        task: TaskId,
        attempt: u32,
        problem: OutputProblem,
        reopened: bool,
        message: String,
    },
    RunFinished,
    RunFailed {
        reason: String,
    },
}
