//! The one error enum of `iro-coordinator`, grouped by meaning. A command that fails with one of these
//! changed nothing, so the driver can answer the caller and move on without repairing state.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A command named a worker id the run state has never seen registered.
    #[error("unknown worker `{worker_id}`: it has not registered with this coordinator")]
    UnknownWorker { worker_id: String },
    /// A call presented a session nonce that is not the one of the worker id's current registration: another
    /// process registered under this id since (review A6). The caller must stop; it no longer owns the id.
    #[error(
        "worker `{worker_id}` is registered by another process now: this call's session is not its current \
         registration's, so this process must stop (two processes share one worker id?)"
    )]
    StaleSession { worker_id: String },
    /// A command named a task outside the run's plan (past the last iteration, shard out of range, ...).
    #[error("unknown task `{task_id}`: {why}")]
    UnknownTask { task_id: String, why: String },
    /// A task id string that does not parse as `iter-{t}/{phase}/{shard}`.
    #[error("invalid task id `{value}`: {message}")]
    InvalidTaskId { value: String, message: String },
    /// A worker id that would be unsafe as an object-key segment or a metric label.
    #[error("invalid worker id `{value}`: {message}")]
    InvalidWorkerId { value: String, message: String },
    /// A RegisterWorker of a new id while the state holds `Plan::max_workers` records, none of them of a
    /// worker dead long enough to drop (review A12).
    #[error(
        "cannot register worker `{worker_id}`: the coordinator holds its maximum of {max} worker records and \
         none is of a worker dead for over a worker timeout and holding nothing; retry once some have died, or \
         raise the plan's max_workers"
    )]
    TooManyWorkers { worker_id: String, max: u32 },
    /// JoinGang / AbortGang naming a task that is not gang-scheduled.
    #[error("task `{task_id}` is not a gang task: only the train phase is gang-scheduled")]
    NotAGangTask { task_id: String },
    /// RejectOutput naming an output that is not (or no longer) the accepted one, or a stage that cannot be
    /// re-opened any more because a later one has started.
    #[error("cannot reject the output of task `{task_id}` attempt {attempt}: {message}")]
    CannotReject { task_id: String, attempt: u32, message: String },
    /// The plan derived from a run config (or built by hand) cannot be run.
    #[error("invalid plan: `{field}` {message}")]
    InvalidPlan { field: &'static str, message: String },
    /// Reading or writing the command log (or its state folder) failed.
    #[error("coordinator state `{path}`: {message}")]
    Storage { path: String, message: String },
    /// A record of the command log fails its checksum or does not decode, and it is not a tail torn by
    /// a crash (a good record follows it, or later segments do), so the log is refused rather than
    /// silently cut short or replayed into a diverging state.
    #[error("command log `{path}` is corrupt at byte {offset}: {message}")]
    CorruptLog { path: String, offset: u64, message: String },
    /// Another coordinator holds the state folder's writer lock: two writers would interleave records
    /// and lease the same attempt twice.
    #[error("state folder `{path}` is in use: {message}")]
    StateLocked { path: String, message: String },
    /// Entries asked for that a snapshot has replaced (raft-rs's `StorageError::Compacted`).
    #[error("command log entry {index} is compacted into a snapshot: the log now starts at entry {first}")]
    LogCompacted { index: u64, first: u64 },
    /// The state folder belongs to another run or another plan than the config being started.
    #[error("state folder `{path}` does not match this run: {message}")]
    StateMismatch { path: String, message: String },
    /// A fresh state folder over an object store that already holds this run's manifests: starting over would
    /// overwrite the outputs they name (review A16).
    #[error(
        "refusing to start run `{run_id}` from an empty state folder: {found} exists, so the run was started \
         before and starting it over would overwrite its accepted outputs. Restart with the state folder it ran \
         with (it resumes), give the run a new run.id, or pass --force-fresh-state (CoordinatorConfig \
         force_fresh_state) to start over anyway"
    )]
    RunExists { run_id: String, found: String },
    /// The driver stopped, or refuses commands since its log could not be written.
    #[error("coordinator unavailable: {message}")]
    Unavailable { message: String },
    /// The coordinator's own settings (listen addresses, token, state folder) cannot be used.
    #[error("coordinator config: `{field}` {message}")]
    Config { field: &'static str, message: String },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: String, message: String },
    /// A Raft replica failed (an entry it cannot apply, a raft-rs error): it must stop, since going on
    /// could diverge from the others.
    #[error("raft: {message}")]
    Raft { message: String },
    /// A proposal reached a replica that does not lead; `leader` is the one it knows of, if any.
    #[error("not the leader{}", leader.map(|l| format!(": replica {l} leads")).unwrap_or_default())]
    NotLeader { leader: Option<u64> },
}

impl Error {
    /// The file or folder a storage error is about, for structured logs.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::Storage { path, .. } | Error::CorruptLog { path, .. } | Error::StateMismatch { path, .. } => {
                Some(path)
            }
            _ => None,
        }
    }

    /// A stable, low-cardinality label for metrics and structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::UnknownWorker { .. } => "unknown_worker",
            Error::StaleSession { .. } => "stale_session",
            Error::UnknownTask { .. } => "unknown_task",
            Error::InvalidTaskId { .. } => "invalid_task_id",
            Error::InvalidWorkerId { .. } => "invalid_worker_id",
            Error::NotAGangTask { .. } => "not_a_gang_task",
            Error::TooManyWorkers { .. } => "too_many_workers",
            Error::CannotReject { .. } => "cannot_reject",
            Error::InvalidPlan { .. } => "invalid_plan",
            Error::Storage { .. } => "storage",
            Error::CorruptLog { .. } => "corrupt_log",
            Error::StateLocked { .. } => "state_locked",
            Error::LogCompacted { .. } => "log_compacted",
            Error::StateMismatch { .. } => "state_mismatch",
            Error::RunExists { .. } => "run_exists",
            Error::Unavailable { .. } => "unavailable",
            Error::Config { .. } => "config",
            Error::Bind { .. } => "bind",
            Error::Raft { .. } => "raft",
            Error::NotLeader { .. } => "not_leader",
        }
    }
}
