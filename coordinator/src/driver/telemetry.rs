//! What the driver counts for the status endpoint: each applied or refused command and each event of
//! the run state becomes a log line and a counter here (vector's typed-event pattern). Every label is
//! drawn from a closed set (command kinds, error kinds, fence kinds, loss causes, RPC methods and
//! codes), never a worker or task id, so `/metrics` stays bounded however large the cluster.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::wire::one_line;
use crate::error::{Error, Result};
use crate::state::{Applied, Command, Event, Fenced, LossCause, OutputProblem, Reply, phase_name};

/// Throughput is measured over this much recent time.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;
/// Refused requests kept for the status page.
pub const RECENT_REJECTIONS: usize = 16;

/// A command the run state refused (unknown worker, task outside the plan, ...): nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub at_ms: u64,
    pub command: String,
    pub kind: String,
    pub message: String,
}

/// Counters owned by the driver task (no locking: only it writes, readers go through the handle).
#[derive(Debug, Default)]
pub struct Telemetry {
    pub started_ms: u64,
    /// Commands replayed from the log at start.
    pub recovered: u64,
    pub applied: BTreeMap<&'static str, u64>,
    /// (command kind, error kind) of refused commands.
    pub rejected: BTreeMap<(&'static str, &'static str), u64>,
    pub fenced: BTreeMap<&'static str, u64>,
    /// Leases lost without a completion, by cause.
    pub losses: BTreeMap<&'static str, u64>,
    /// Accepted outputs the manifest writer found missing or wrong (and re-opened), by problem.
    pub outputs_rejected: BTreeMap<&'static str, u64>,
    pub tasks_accepted: u64,
    pub records: u64,
    pub tokens: u64,
    /// (accepted at, records) of completions within the last `WINDOW_MS`.
    window: VecDeque<(u64, u64)>,
    pub recent_rejections: VecDeque<Rejection>,
    pub log_batches: u64,
    pub log_entries: u64,
    /// Each batched write + fsync of the command log (its latency bounds every reply, and Raft's timing).
    pub log_sync: Histogram,
    /// Why the driver stopped taking commands, if it did.
    pub log_error: Option<String>,
}

impl Telemetry {
    /// Every labelled counter starts with all its known labels at zero: a series that appears only at its
    /// first event breaks `rate()` and alerts (Prometheus practice, review A17).
    pub fn new(started_ms: u64, recovered: u64) -> Self {
        let mut t = Self { started_ms, recovered, ..Self::default() };
        t.applied.extend(Command::KINDS.map(|k| (k, 0)));
        t.fenced.extend(Fenced::KINDS.map(|k| (k, 0)));
        t.losses.extend(LossCause::ALL.map(|c| (c.kind(), 0)));
        t.outputs_rejected.extend(OutputProblem::ALL.map(|p| (p.kind(), 0)));
        t
    }

    /// Records one command's outcome and emits its log lines.
    pub fn observe(&mut self, command: &Command, result: &Result<Applied>, now_ms: u64) {
        let kind = command.kind();
        let applied = match result {
            Ok(applied) => applied,
            Err(error) => {
                *self.rejected.entry((kind, error.kind())).or_default() += 1;
                tracing::info!(command = kind, error = error.kind(), "refused: {error}");
                if self.recent_rejections.len() == RECENT_REJECTIONS {
                    self.recent_rejections.pop_front();
                }
                self.recent_rejections.push_back(Rejection {
                    at_ms: now_ms,
                    command: kind.to_owned(),
                    kind: error.kind().to_owned(),
                    message: error.to_string(),
                });
                return;
            }
        };
        *self.applied.entry(kind).or_default() += 1;
        match (&applied.reply, command) {
            (Reply::Fenced(fenced), _) => {
                *self.fenced.entry(fenced.kind()).or_default() += 1;
                tracing::info!(command = kind, fence = fenced.kind(), "fenced: {fenced}");
            }
            (Reply::Accepted { .. }, Command::CompleteTask { output, .. }) => {
                // Saturating: a sum that overflowed would panic the driver in a debug build (review A13).
                self.tasks_accepted = self.tasks_accepted.saturating_add(1);
                self.records = self.records.saturating_add(output.records);
                self.tokens = self.tokens.saturating_add(output.tokens);
                self.window.push_back((now_ms, output.records));
            }
            _ => {}
        }
        for event in &applied.events {
            self.emit(event);
        }
        self.trim(now_ms);
    }

    fn emit(&mut self, event: &Event) {
        match event {
            Event::WorkerRegistered { worker } => tracing::info!(%worker, "worker registered"),
            Event::WorkerDead { worker } => tracing::warn!(%worker, "worker stopped heartbeating: marked dead"),
            Event::WorkerRevived { worker } => tracing::info!(%worker, "dead worker spoke again"),
            Event::WorkerRemoved { worker } => {
                tracing::info!(%worker, "record of a long-dead worker removed; it must register again")
            }
            Event::WorkerQuarantined { worker, failures, until_ms } => {
                tracing::warn!(%worker, failures, until_ms, "worker failed {failures} tasks in a row: quarantined")
            }
            Event::PhaseStarted { iteration, phase } => {
                tracing::info!(iteration, phase = phase_name(*phase), "phase started")
            }
            Event::TaskLeased { task, attempt, worker } => tracing::debug!(%task, attempt, %worker, "task leased"),
            Event::TaskDone { task, attempt, worker } => tracing::info!(%task, attempt, %worker, "task done"),
            Event::TaskRequeued { task, attempt, cause, message } => {
                *self.losses.entry(cause.kind()).or_default() += 1;
                tracing::warn!(%task, attempt, cause = cause.kind(), "task requeued: {}", one_line(message));
            }
            Event::TaskFailed { task, attempt, cause, message } => {
                *self.losses.entry(cause.kind()).or_default() += 1;
                tracing::error!(%task, attempt, cause = cause.kind(), "task failed for good: {}", one_line(message));
            }
            Event::GangStarted { task, attempt, world } => tracing::info!(%task, attempt, world, "gang started"),
            Event::GangAborted { task, attempt, cause, message } => {
                tracing::warn!(%task, attempt, cause = cause.kind(), "gang aborted: {}", one_line(message))
            }
            Event::OutputRejected { task, attempt, problem, reopened, message } => {
                *self.outputs_rejected.entry(problem.kind()).or_default() += 1;
                if *reopened {
                    tracing::warn!(%task, attempt, problem = problem.kind(), "stage re-opened: {}", one_line(message));
                } else {
                    tracing::warn!(%task, attempt, problem = problem.kind(), "output rejected: {}", one_line(message));
                }
            }
            Event::RunFinished => tracing::info!("run finished"),
            Event::RunFailed { reason } => tracing::error!("run failed: {}", one_line(reason)),
        }
    }

    fn trim(&mut self, now_ms: u64) {
        while self.window.front().is_some_and(|(at, _)| at.saturating_add(WINDOW_MS) < now_ms) {
            self.window.pop_front();
        }
    }

    /// (tasks per minute, records per second) over the window, or over the time since start when the
    /// coordinator has run for less than a window (so a fresh start does not read as a slow one).
    pub fn throughput(&self, now_ms: u64) -> (f64, f64) {
        let recent: Vec<_> = self.window.iter().filter(|(at, _)| at.saturating_add(WINDOW_MS) >= now_ms).collect();
        let span_ms = now_ms.saturating_sub(self.started_ms).clamp(1_000, WINDOW_MS) as f64;
        let tasks = recent.len() as f64;
        let records: u64 = recent.iter().map(|(_, r)| r).sum();
        (tasks * 60_000.0 / span_ms, records as f64 * 1_000.0 / span_ms)
    }

    pub fn note_log_write(&mut self, entries: usize, seconds: f64) {
        self.log_batches += 1;
        self.log_entries += entries as u64;
        self.log_sync.observe(seconds);
    }

    pub fn note_log_error(&mut self, error: &Error) {
        tracing::error!(
            path = error.path().unwrap_or_default(),
            error = %error,
            "cannot persist the command log: refusing every command, failing /livez and /readyz, and exiting \
             shortly so that a restart replays the log"
        );
        self.log_error = Some(error.to_string());
    }
}

/// Upper bounds (seconds) of the RPC latency histogram.
/// They reach 30 s: a client's request timeout.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 30.0];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    pub counts: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let slot = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Counters the gRPC layer updates from many tasks at once.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    /// (method, status code) → calls.
    calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    pub auth_failures: AtomicU64,
}

impl RpcMetrics {
    pub fn record(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        if let Ok(mut calls) = self.calls.lock() {
            *calls.entry((method, code_name(code))).or_default() += 1;
        }
        if let Ok(mut latency) = self.latency.lock() {
            latency.entry(method).or_default().observe(seconds);
        }
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn calls(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn latency(&self) -> BTreeMap<&'static str, Histogram> {
        self.latency.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// gRPC status codes as snake_case metric labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
