//! When the driver snapshots the run state: the policy (every N entries, one write at a time), kept
//! apart from the IO, which the log's `SnapshotJob` does on the blocking pool, so the command path only
//! pays for a clone of the state.

use tokio::task::JoinHandle;

use super::log::CommandLog;
use crate::error::Result;
use crate::state::RunState;

/// At about 200 B an entry, a few MB of log between snapshots: replay after a restart stays short,
/// and snapshots (a few MB of state at 10^4 tasks) stay rare next to the entries.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;

pub(super) struct Snapshots {
    /// Entries between snapshots; 0: never.
    every: u64,
    /// The index of the last snapshot started (or recovered from).
    last: u64,
    in_flight: Option<JoinHandle<Result<u64>>>,
}

impl Snapshots {
    pub fn new(every: Option<u64>, last: u64) -> Self {
        Self { every: every.unwrap_or(DEFAULT_SNAPSHOT_EVERY), last, in_flight: None }
    }

    /// After a durable commit that brought the log to `index`: notes a finished snapshot write, and
    /// starts the next once `every` entries have gone by. Costs the hot path one clone of the state
    /// per snapshot; serializing and writing it happen on the blocking pool. A failed write is logged
    /// and retried `every` entries later: the log itself is intact, only not compacted.
    pub async fn after_commit(&mut self, log: Option<&mut Box<dyn CommandLog>>, state: &RunState, index: u64) {
        if self.in_flight.as_ref().is_some_and(JoinHandle::is_finished) {
            self.finish().await;
        }
        if self.every == 0 || self.in_flight.is_some() || index < self.last.saturating_add(self.every) {
            return;
        }
        let Some(log) = log else { return };
        match log.begin_snapshot(state.clone()) {
            Ok(job) => {
                self.last = job.index();
                self.in_flight = Some(tokio::task::spawn_blocking(move || job.run()));
            }
            Err(e) => {
                self.last = index;
                tracing::warn!(index, error = %e, kind = e.kind(), "could not start a run state snapshot");
            }
        }
    }

    /// Waits for the snapshot being written, if any (the driver stops only once it is on disk or failed).
    pub async fn finish(&mut self) {
        let Some(job) = self.in_flight.take() else { return };
        match job.await {
            Ok(Ok(index)) => tracing::debug!(index, "run state snapshot written"),
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                kind = e.kind(),
                "could not write a run state snapshot; the command log is intact and grows until the next one"
            ),
            Err(e) => tracing::warn!(error = %e, "the run state snapshot write panicked"),
        }
    }
}
