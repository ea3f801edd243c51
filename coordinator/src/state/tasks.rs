//! The task table and the lease lifecycle: Pending → Leased{worker, attempt, deadline} → Done | Failed.
//! Leasing pops the active stage's queue and expiry walks an ordered deadline index, so neither
//! touches more tasks than it changes.

use serde::{Deserialize, Serialize};

use super::command::{Fenced, Lease, LossCause, Output, Reply, WaitReason};
use super::ids::{TaskId, WorkerId};
use super::{Event, Held, RunState};
use crate::error::Result;
use crate::plan::Phase;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    #[default]
    Pending,
    Leased {
        worker: WorkerId,
        attempt: u32,
        deadline_ms: u64,
    },
    /// The train task while its gang forms or runs; the ranks live in `RunState::gang`.
    Gang {
        attempt: u32,
    },
    Done(Accepted),
    Failed {
        error: String,
    },
}

/// The one accepted attempt of a task: its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub worker: WorkerId,
    pub attempt: u32,
    pub output: Output,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub state: TaskState,
    /// The last attempt number handed out (0: never leased). Fencing compares against it.
    pub attempt: u32,
    /// Attempts that counted as failures (released leases do not).
    pub failures: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
    pub failed: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.done + self.failed
    }

    fn slot(&mut self, state: &TaskState) -> &mut u64 {
        match state {
            TaskState::Pending => &mut self.pending,
            TaskState::Leased { .. } | TaskState::Gang { .. } => &mut self.leased,
            TaskState::Done(_) => &mut self.done,
            TaskState::Failed { .. } => &mut self.failed,
        }
    }

    pub(crate) fn add(&mut self, other: &Counts) {
        self.pending += other.pending;
        self.leased += other.leased;
        self.done += other.done;
        self.failed += other.failed;
    }
}

impl RunState {
    /// Every state change of a task goes through here so the per-stage counts never drift.
    pub(super) fn set_state(&mut self, index: usize, state: TaskState) {
        let counts = &mut self.stage_counts[self.plan.stage_of_task(index)];
        *counts.slot(&self.tasks[index].state) -= 1;
        *counts.slot(&state) += 1;
        self.tasks[index].state = state;
    }

    pub(super) fn lease(&mut self, worker: &WorkerId, now_ms: u64) -> Result<Reply> {
        self.known(worker)?;
        self.tick(now_ms);
        self.touch(worker);
        match &self.status {
            super::RunStatus::Finished => return Ok(Reply::Lease(Lease::RunFinished)),
            super::RunStatus::Failed { reason } => {
                return Ok(Reply::Lease(Lease::RunFailed { reason: reason.clone() }));
            }
            super::RunStatus::Running => {}
        }
        if let Some(held) = self.workers[worker].current {
            return Ok(Reply::Lease(self.redeliver(worker, held)));
        }
        if self.plan.stage(self.stage).1 == Phase::Train {
            return Ok(Reply::Lease(self.lease_rank(worker)));
        }
        let Some(index) = self.queue.pop_front() else {
            return Ok(Reply::Lease(Lease::RetryAfter {
                ms: self.plan.retry_after_ms,
                reason: WaitReason::PhaseBarrier,
            }));
        };
        let attempt = self.tasks[index].attempt + 1;
        self.tasks[index].attempt = attempt;
        let deadline_ms = self.now_ms.saturating_add(self.plan.lease_ms);
        self.set_state(index, TaskState::Leased { worker: worker.clone(), attempt, deadline_ms });
        self.deadlines.insert((deadline_ms, index, 0));
        self.hold(worker, Held { task: index, attempt });
        let task_id = self.plan.task_id(index);
        self.events.push(Event::TaskLeased { task: task_id, attempt, worker: worker.clone() });
        Ok(Reply::Lease(Lease::Task { task_id, attempt, deadline_ms }))
    }

    /// LeaseTask from a worker that already holds a lease: its earlier reply was lost, so hand the
    /// same lease back (renewed) instead of stranding it.
    fn redeliver(&mut self, worker: &WorkerId, held: Held) -> Lease {
        let deadline_ms = self.extend(held.task, worker);
        let task_id = self.plan.task_id(held.task);
        match &self.gang {
            Some(gang) if gang.task == held.task => {
                let rank = gang.rank_of(worker).unwrap_or(0);
                Lease::GangRank {
                    task_id,
                    attempt: held.attempt,
                    rank,
                    world: self.plan.train_ranks,
                    deadline_ms,
                    join_deadline_ms: gang.join_deadline_ms,
                }
            }
            _ => Lease::Task { task_id, attempt: held.attempt, deadline_ms },
        }
    }

    /// Renews the holder's lease on `index` and returns the new deadline.
    pub(super) fn extend(&mut self, index: usize, worker: &WorkerId) -> u64 {
        let deadline = self.now_ms.saturating_add(self.plan.lease_ms);
        match &mut self.tasks[index].state {
            TaskState::Leased { deadline_ms, .. } => {
                self.deadlines.remove(&(*deadline_ms, index, 0));
                *deadline_ms = deadline;
                self.deadlines.insert((deadline, index, 0));
            }
            TaskState::Gang { .. } => {
                if let Some(member) =
                    self.gang.as_mut().and_then(|g| g.members.iter_mut().find(|m| &m.worker == worker))
                {
                    self.deadlines.remove(&(member.deadline_ms, index, member.rank));
                    member.deadline_ms = deadline;
                    self.deadlines.insert((deadline, index, member.rank));
                }
            }
            TaskState::Pending | TaskState::Done(_) | TaskState::Failed { .. } => {}
        }
        deadline
    }

    pub(super) fn complete(
        &mut self,
        worker: &WorkerId,
        task_id: TaskId,
        attempt: u32,
        output: Output,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = self.plan.index(task_id)?;
        self.tick(now_ms);
        self.touch(worker);
        if let Err(fenced) = self.fence(worker, index, attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        if let TaskState::Leased { deadline_ms, .. } = self.tasks[index].state {
            self.deadlines.remove(&(deadline_ms, index, 0));
        } else {
            let gang = self.gang.as_ref().expect("a fenced holder of a gang task is a rank");
            if !gang.started {
                return Ok(Reply::Fenced(Fenced::GangNotStarted));
            }
            let rank = gang.rank_of(worker).unwrap_or(0);
            if rank != 0 {
                // Rank 0 writes the checkpoints, so its completion is the task's; the others just stop.
                self.finish_rank(worker, rank);
                return Ok(Reply::RankFinished { task_id, rank });
            }
            self.dissolve_gang();
        }
        self.workers.get_mut(worker).expect("fenced holder is registered").completed += 1;
        self.release_hold(worker);
        self.set_state(index, TaskState::Done(Accepted { worker: worker.clone(), attempt, output }));
        self.events.push(Event::TaskDone { task: task_id, attempt, worker: worker.clone() });
        self.advance();
        Ok(Reply::Accepted { task_id, attempt })
    }

    pub(super) fn fail(
        &mut self,
        worker: &WorkerId,
        task_id: TaskId,
        attempt: u32,
        error: &str,
        released: bool,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = self.plan.index(task_id)?;
        self.tick(now_ms);
        self.touch(worker);
        if let Err(fenced) = self.fence(worker, index, attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        let (cause, message) = if released {
            (LossCause::Released, format!("released by worker {worker}: {error}"))
        } else {
            (LossCause::Failed, format!("worker {worker} failed: {error}"))
        };
        let will_retry = self.drop_lease(index, worker, cause, &message);
        Ok(Reply::Returned { task_id, will_retry })
    }

    /// Ends `worker`'s lease on `index` without a completion. For the train task this aborts the
    /// whole gang: a collective cannot continue with a rank missing. Returns whether it will be retried.
    pub(super) fn drop_lease(&mut self, index: usize, worker: &WorkerId, cause: LossCause, message: &str) -> bool {
        if cause.counts_as_failure()
            && let Some(w) = self.workers.get_mut(worker)
        {
            w.failures += 1;
        }
        match self.tasks[index].state {
            TaskState::Leased { deadline_ms, .. } => {
                self.deadlines.remove(&(deadline_ms, index, 0));
                self.release_hold(worker);
                self.requeue_or_fail(index, cause, message)
            }
            TaskState::Gang { attempt } => {
                let rank = self.gang.as_ref().and_then(|g| g.rank_of(worker)).unwrap_or(0);
                let task = self.plan.task_id(index);
                let message = format!("gang {task} attempt {attempt} aborted: rank {rank} ({message})");
                self.abort_gang(cause, &message)
            }
            TaskState::Pending | TaskState::Done(_) | TaskState::Failed { .. } => true,
        }
    }

    /// After a lost lease: back to Pending (first in line: the barrier is waiting for it), or Failed
    /// once it has failed `max_attempts` times, which fails the run.
    pub(super) fn requeue_or_fail(&mut self, index: usize, cause: LossCause, message: &str) -> bool {
        let task_id = self.plan.task_id(index);
        let attempt = self.tasks[index].attempt;
        if cause.counts_as_failure() {
            let task = &mut self.tasks[index];
            task.failures += 1;
            task.last_error = Some(message.to_owned());
            self.record_error(task_id, cause, message);
        }
        let failures = self.tasks[index].failures;
        if failures >= self.plan.max_attempts {
            self.set_state(index, TaskState::Failed { error: message.to_owned() });
            self.events.push(Event::TaskFailed { task: task_id, attempt, cause, message: message.to_owned() });
            self.fail_run(format!(
                "task {task_id} failed {failures} time(s) (max_attempts {}); last error: {message}",
                self.plan.max_attempts
            ));
            return false;
        }
        self.set_state(index, TaskState::Pending);
        if task_id.phase != Phase::Train {
            self.queue.push_front(index);
        }
        self.events.push(Event::TaskRequeued { task: task_id, attempt, cause, message: message.to_owned() });
        true
    }

    /// The timer tick: silent workers die first (their cause is the more telling one), then expired
    /// leases, then a gang that did not gather in time.
    pub(super) fn expire(&mut self, now_ms: u64) -> Reply {
        self.tick(now_ms);
        let now = self.now_ms;
        let mut requeued = Vec::new();
        let mut failed = Vec::new();
        let mut note = |task: TaskId, will_retry: bool| {
            if will_retry { requeued.push(task) } else { failed.push(task) }
        };

        let mut dead_workers = Vec::new();
        while let Some((seen, worker)) = self.liveness.first().cloned() {
            if seen.saturating_add(self.plan.worker_timeout_ms) > now {
                break;
            }
            self.liveness.pop_first();
            let held = {
                let w = self.workers.get_mut(&worker).expect("liveness index names registered workers");
                w.alive = false;
                w.current
            };
            self.events.push(Event::WorkerDead { worker: worker.clone() });
            if let Some(held) = held
                && self.running()
            {
                let message = format!("worker {worker} stopped heartbeating (silent for {} ms)", now - seen);
                note(
                    self.plan.task_id(held.task),
                    self.drop_lease(held.task, &worker, LossCause::WorkerDead, &message),
                );
            }
            dead_workers.push(worker);
        }

        while self.running() {
            let Some(&(deadline, index, rank)) = self.deadlines.first() else {
                break;
            };
            if deadline > now {
                break;
            }
            let holder = match &self.tasks[index].state {
                TaskState::Leased { worker, .. } => Some(worker.clone()),
                _ => self.gang.as_ref().and_then(|g| g.members.get(rank as usize)).map(|m| m.worker.clone()),
            };
            let Some(holder) = holder else {
                // Unreachable while the index is kept in step with the leases; drop the stray entry.
                self.deadlines.pop_first();
                continue;
            };
            let message = format!("lease of worker {holder} expired: no heartbeat for {} ms", self.plan.lease_ms);
            note(self.plan.task_id(index), self.drop_lease(index, &holder, LossCause::LeaseExpired, &message));
        }

        if self.running()
            && let Some(gang) = &self.gang
            && !gang.started
            && gang.join_deadline_ms <= now
        {
            let task = self.plan.task_id(gang.task);
            let message = format!(
                "gang {task} attempt {}: only {} of {} ranks joined within {} ms",
                gang.attempt,
                gang.members.len(),
                self.plan.train_ranks,
                self.plan.gang_join_timeout_ms
            );
            note(task, self.abort_gang(LossCause::GangJoinTimeout, &message));
        }
        Reply::Expired { requeued, failed, dead_workers }
    }
}
