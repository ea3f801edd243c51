//! Workers: registration, liveness and what each one holds. A worker holds at most one lease (its
//! task loop runs one task at a time), which makes LeaseTask idempotent and dead-worker cleanup O(1).

use serde::{Deserialize, Serialize};

use super::command::{LeaseRef, LossCause, Progress, Reply, Resources};
use super::ids::WorkerId;
use super::{Event, RunState};
use crate::error::Result;

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
        self.tick(now_ms);
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
                },
            );
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
        self.liveness.insert((now, worker.clone()));
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
