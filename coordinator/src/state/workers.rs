//! Workers: registration, liveness and what each one holds. A worker holds at most one lease (its
//! task loop runs one task at a time), which makes LeaseTask idempotent and dead-worker cleanup O(1).
//!
//! Records of dead workers do not stay forever (review A12): one that holds nothing (no lease, no gang
//! rank) is removed once it has been dead for the plan's retention, and the number of records is bounded
//! (`Plan::max_workers`). A removed worker that calls again is an unknown worker, like any other.
//!
//! Removal must be the same live and replayed, yet liveness is not durable: the driver does not log idle
//! polls (`RunState::changes_only_liveness`), so a replay can see an idle worker as silent since its last
//! logged command. Removal therefore reads only `Worker::durable_seen_ms`, which a replay rebuilds
//! exactly: it moves at registration and at a worker's first command at least one retention `R` after it,
//! and that command is always logged. So `durable_seen_ms > last contact - R`, and a worker removed at
//! `durable_seen_ms + T + 2R` (`T` the worker timeout) has been silent for more than `T + R`: dead for at
//! least `R`, at most `2R`. An idle worker that keeps polling costs one logged entry per `R`.
//! Removal happens only in ExpireLeases (logged whenever it removes anyone), which the driver holds back
//! for a grace after a restart, so workers that outlived a coordinator outage have polled again first;
//! and in a RegisterWorker at the bound (always logged), which drops records silent for over `T` already.

use serde::{Deserialize, Serialize};

use super::command::{LeaseRef, LossCause, Progress, Reply, Resources};
use super::ids::WorkerId;
use super::{Event, RunState};
use crate::error::{Error, Result};

/// The lease a worker holds: a task index and its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub task: usize,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub name: String,
    pub resources: Resources,
    pub registered_ms: u64,
    /// Last time any command from this worker arrived: every command proves it is alive.
    pub last_seen_ms: u64,
    pub alive: bool,
    pub current: Option<Held>,
    /// Progress on `current`, as last heartbeated.
    pub progress: Progress,
    pub completed: u64,
    /// Leases this worker lost in a way that may be its fault (errors, expiry, death).
    pub failures: u64,
    /// Such losses since its last completion: at `quarantine_after` it is quarantined.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// No new task before this time (0: never quarantined).
    #[serde(default)]
    pub quarantined_until_ms: u64,
    /// The nonce of the registration that owns this id now; calls presenting another are refused.
    #[serde(default)]
    pub session: String,
    /// When a command of this worker that the driver surely logs last arrived: set at registration, and by
    /// its first command at least one retention (`Plan::worker_retention`) later, which is then logged
    /// (`RunState::changes_only_liveness`). Unlike `last_seen_ms`, a replay of the log rebuilds it exactly,
    /// so removing dead records reads only this (see the module docs). 0 in states written before it.
    #[serde(default)]
    pub durable_seen_ms: u64,
}

impl RunState {
    pub(super) fn register(
        &mut self,
        worker: WorkerId,
        name: String,
        resources: Resources,
        now_ms: u64,
        session: String,
    ) -> Result<Reply> {
        worker.check()?;
        // A new record needs room, and making it is decided before anything changes: a refusal changes nothing.
        let evict = if self.workers.contains_key(&worker) {
            Vec::new()
        } else {
            self.room_for(&worker, self.now_ms.max(now_ms))?
        };
        self.tick(now_ms);
        for id in &evict {
            self.remove_worker(id);
        }
        if let Some(existing) = self.workers.get_mut(&worker) {
            existing.name = name;
            existing.resources = resources;
            // The new process owns the id from now on; the old one's calls are refused.
            existing.session = session.clone();
            let held = existing.current;
            self.touch(&worker);
            if let Some(held) = held
                && self.running()
            {
                let message = format!("worker {worker} registered again (restarted) while holding the lease");
                self.drop_lease(held.task, &worker, LossCause::WorkerRestarted, &message);
            }
        } else {
            let now = self.now_ms;
            self.workers.insert(
                worker.clone(),
                Worker {
                    name,
                    resources,
                    registered_ms: now,
                    last_seen_ms: now,
                    alive: true,
                    current: None,
                    progress: Progress::default(),
                    completed: 0,
                    failures: 0,
                    consecutive_failures: 0,
                    quarantined_until_ms: 0,
                    session: session.clone(),
                    durable_seen_ms: now,
                },
            );
            if let Some(n) = worker.as_str().strip_prefix("w-").and_then(|n| n.parse::<u64>().ok()) {
                self.highest_worker_number = self.highest_worker_number.max(n);
            }
            self.liveness.insert((now, worker.clone()));
            self.events.push(Event::WorkerRegistered { worker: worker.clone() });
        }
        Ok(Reply::Registered { worker_id: worker, heartbeat_interval_ms: self.plan.heartbeat_interval_ms, session })
    }

    /// The session nonce `worker`'s current registration holds; None for an unknown worker.
    pub fn session_of(&self, worker: &WorkerId) -> Option<&str> {
        self.workers.get(worker).map(|w| w.session.as_str())
    }

    pub(super) fn heartbeat(
        &mut self,
        worker: &WorkerId,
        lease: Option<LeaseRef>,
        progress: Progress,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = lease.map(|l| self.plan.index(l.task_id)).transpose()?;
        self.tick(now_ms);
        self.touch(worker);
        let (Some(lease), Some(index)) = (lease, index) else {
            return Ok(Reply::Alive);
        };
        if let Err(fenced) = self.fence(worker, index, lease.attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        self.workers.get_mut(worker).expect("fenced holder is registered").progress = progress;
        Ok(Reply::LeaseExtended { deadline_ms: self.extend(index, worker) })
    }

    /// Records that `worker` spoke now; a worker marked dead comes back to life (its old lease is gone,
    /// and fencing tells it so).
    pub(super) fn touch(&mut self, worker: &WorkerId) {
        let now = self.now_ms;
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.alive {
            self.liveness.remove(&(w.last_seen_ms, worker.clone()));
        } else {
            w.alive = true;
            self.events.push(Event::WorkerRevived { worker: worker.clone() });
        }
        w.last_seen_ms = now;
        let every = self.plan.worker_retention();
        if every != 0 && now >= w.durable_seen_ms.saturating_add(every) {
            w.durable_seen_ms = now;
        }
        self.liveness.insert((now, worker.clone()));
    }

    /// Whether a command of `worker` at `now_ms` moved its durable last-seen time (or came in the same
    /// millisecond as one that did), so the driver must log it. Never at the registration's own time: the
    /// registration set it (and is logged), and a move needs a whole retention after it.
    pub(super) fn durably_seen_at(&self, worker: &WorkerId, now_ms: u64) -> bool {
        self.workers.get(worker).is_some_and(|w| w.durable_seen_ms == now_ms && w.registered_ms != now_ms)
    }

    /// Whether a record may be removed at all: it holds no lease, has no rank in the gang, and is not
    /// quarantined (a bad worker must not shed its quarantine by dying).
    fn removable(&self, id: &WorkerId, w: &Worker, now: u64) -> bool {
        w.current.is_none()
            && w.quarantined_until_ms <= now
            && self.gang.as_ref().is_none_or(|g| g.rank_of(id).is_none())
    }

    /// When the record of `w` is removed by ExpireLeases (see the module docs), or None: kept forever, or
    /// holding something now (it cannot be due before it lets go, which only a logged command does).
    fn removal_due_ms(&self, id: &WorkerId, w: &Worker) -> Option<u64> {
        let retention = self.plan.worker_retention();
        if retention == 0 || w.current.is_some() || self.gang.as_ref().is_some_and(|g| g.rank_of(id).is_some()) {
            return None;
        }
        let due =
            w.durable_seen_ms.saturating_add(self.plan.worker_timeout_ms).saturating_add(retention.saturating_mul(2));
        Some(due.max(w.quarantined_until_ms))
    }

    /// The earliest time a record is due for removal, for the driver's timer. Only dead-marked workers can
    /// be: a due one has been silent for over a worker timeout, so the tick that removes it marks it dead
    /// first, and until then the worker's own liveness deadline is the earlier one.
    pub(super) fn next_removal_ms(&self) -> Option<u64> {
        if self.liveness.len() == self.workers.len() {
            return None;
        }
        self.workers.iter().filter(|(_, w)| !w.alive).filter_map(|(id, w)| self.removal_due_ms(id, w)).min()
    }

    /// ExpireLeases: removes every record due by now, in id order. Reads only durable fields, so a replay
    /// removes the same ones; the tick is logged whenever it removes any.
    pub(super) fn remove_dead_workers(&mut self) -> Vec<WorkerId> {
        let now = self.now_ms;
        let due: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(id, w)| self.removal_due_ms(id, w).is_some_and(|due| due <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            self.remove_worker(id);
        }
        due
    }

    /// The records to drop so that `worker` can get one (none below the bound): the longest-silent
    /// removable ones that have surely been dead for a worker timeout. Refused when there are too few.
    fn room_for(&self, worker: &WorkerId, now: u64) -> Result<Vec<WorkerId>> {
        let max = self.plan.max_workers as usize;
        if max == 0 || self.workers.len() < max {
            return Ok(Vec::new());
        }
        let retention = self.plan.worker_retention();
        let mut dead: Vec<(u64, &WorkerId)> = if retention == 0 {
            // Kept forever: no record can be told dead from the log alone (idle polls are not logged).
            Vec::new()
        } else {
            let silent = self.plan.worker_timeout_ms.saturating_add(retention);
            self.workers
                .iter()
                .filter(|(id, w)| self.removable(id, w, now) && w.durable_seen_ms.saturating_add(silent) <= now)
                .map(|(id, w)| (w.durable_seen_ms, id))
                .collect()
        };
        let need = self.workers.len() + 1 - max;
        if dead.len() < need {
            return Err(Error::TooManyWorkers { worker_id: worker.to_string(), max: self.plan.max_workers });
        }
        dead.sort();
        Ok(dead.into_iter().take(need).map(|(_, id)| id.clone()).collect())
    }

    fn remove_worker(&mut self, id: &WorkerId) {
        let Some(w) = self.workers.remove(id) else { return };
        if w.alive {
            self.liveness.remove(&(w.last_seen_ms, id.clone()));
        }
        self.gang_candidates.remove(id);
        self.workers_removed = self.workers_removed.saturating_add(1);
        self.events.push(Event::WorkerRemoved { worker: id.clone() });
    }

    pub(super) fn hold(&mut self, worker: &WorkerId, held: Held) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.current = Some(held);
            w.progress = Progress::default();
        }
    }

    pub(super) fn release_hold(&mut self, worker: &WorkerId) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.current = None;
            w.progress = Progress::default();
        }
    }
}
