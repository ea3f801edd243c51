//! The task table and the lease lifecycle: Pending → Leased{worker, attempt, deadline} → Done | Failed.
//! Leasing pops the active stage's queue and expiry walks an ordered deadline index, so neither
//! touches more tasks than it changes.

use serde::{Deserialize, Serialize};

use super::command::{Fenced, Lease, LossCause, Output, OutputProblem, Reply, WaitReason};
use super::ids::{TaskId, WorkerId, phase_name};
use super::{Event, Held, RunState, RunStatus};
use crate::error::{Error, Result};
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
    /// Losses that counted as failures: one per distinct worker, a repeat only when no other worker
    /// could have taken the task (released leases, infrastructure errors and join timeouts never count).
    pub failures: u32,
    pub last_error: Option<String>,
    /// The workers whose failure of this task counted, in order; a re-lease prefers anyone else.
    #[serde(default)]
    pub failed_on: Vec<WorkerId>,
    /// Leases lost for any reason but a release: the exponent of the backoff.
    #[serde(default)]
    pub losses: u32,
    /// Losses that may be the task's fault, repeats included: at `3 · max_attempts` the task fails even
    /// when workers that have not failed it are registered but gone.
    #[serde(default)]
    pub faults: u32,
    /// The backoff: no new lease before this time.
    #[serde(default)]
    pub not_before_ms: u64,
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
        if self.quarantined(worker) {
            return Ok(Reply::Lease(Lease::RetryAfter {
                ms: self.plan.retry_after_ms,
                reason: WaitReason::Quarantined,
            }));
        }
        if self.plan.stage(self.stage).1 == Phase::Train {
            return Ok(Reply::Lease(self.lease_rank(worker)));
        }
        // A task lost earlier goes first (the barrier waits for it), once its backoff is over and unless it
        // should wait for a worker that has not failed it yet.
        let index = match self.take_retry(worker) {
            Some(index) => index,
            None => {
                let Some(index) = self.queue.pop_front() else {
                    let reason = if self.retry.is_empty() { WaitReason::PhaseBarrier } else { WaitReason::Backoff };
                    return Ok(Reply::Lease(Lease::RetryAfter { ms: self.plan.retry_after_ms, reason }));
                };
                index
            }
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
        let holder = self.workers.get_mut(worker).expect("fenced holder is registered");
        holder.completed += 1;
        holder.consecutive_failures = 0;
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
        cause: LossCause,
        now_ms: u64,
    ) -> Result<Reply> {
        self.known(worker)?;
        let index = self.plan.index(task_id)?;
        self.tick(now_ms);
        self.touch(worker);
        if let Err(fenced) = self.fence(worker, index, attempt) {
            return Ok(Reply::Fenced(fenced));
        }
        let message = match cause {
            LossCause::Released => format!("released by worker {worker}: {error}"),
            LossCause::Infrastructure => format!("worker {worker} hit an infrastructure error: {error}"),
            _ => format!("worker {worker} failed: {error}"),
        };
        let will_retry = self.drop_lease(index, worker, cause, &message);
        Ok(Reply::Returned { task_id, will_retry })
    }

    /// RejectOutput: the accepted output of a done task is missing or wrong, found by the manifest writer
    /// before any manifest named it. The task goes back to Pending like a lost lease of the worker that
    /// reported the output (counted, backed off, a new attempt and key next time), and its stage is the
    /// active one again, also when the run had finished.
    ///
    /// Refused once a later stage has leased anything: that stage may have read the output, and its work
    /// cannot be taken back. The driver never gets there, since it leases nothing of a stage before the
    /// manifests it reads are written; the rule still lives here so that a replay decides it alike.
    pub(super) fn reject_output(
        &mut self,
        task_id: TaskId,
        attempt: u32,
        problem: OutputProblem,
        detail: &str,
        now_ms: u64,
    ) -> Result<Reply> {
        let index = self.plan.index(task_id)?;
        let refuse = |message: String| Err(Error::CannotReject { task_id: task_id.to_string(), attempt, message });
        if let RunStatus::Failed { .. } = self.status {
            return refuse("the run has failed".into());
        }
        let worker = match &self.tasks[index].state {
            TaskState::Done(accepted) if accepted.attempt == attempt => accepted.worker.clone(),
            TaskState::Done(accepted) => return refuse(format!("attempt {} is the accepted one", accepted.attempt)),
            _ => return refuse("the task is not done".into()),
        };
        let stage = self.plan.stage_of_task(index);
        let last = self.stage.min(self.plan.stage_count() - 1);
        if let Some(started) = (stage + 1..=last).find(|&s| self.stage_started(s)) {
            let (iteration, phase) = self.plan.stage(started);
            return refuse(format!(
                "iteration {iteration} {} has leased tasks since, which may have read it",
                phase_name(phase)
            ));
        }
        self.tick(now_ms);
        let reopened = stage < self.stage;
        if reopened {
            // Only the never-leased queue of the stage that was active goes: nothing after `stage` started.
            debug_assert!(self.retry.is_empty() && self.gang.is_none(), "a later stage had started");
            self.queue.clear();
            self.stage = stage;
            self.status = RunStatus::Running;
        }
        let message = format!("the accepted output of attempt {attempt} (worker {worker}) was rejected: {detail}");
        self.events.push(Event::OutputRejected { task: task_id, attempt, problem, reopened, message: message.clone() });
        let will_retry = self.requeue_or_fail(index, LossCause::OutputRejected, &message, Some(&worker));
        Ok(Reply::Returned { task_id, will_retry })
    }

    /// Whether any task of `stage` was ever leased.
    fn stage_started(&self, stage: usize) -> bool {
        self.plan.stage_tasks(stage).any(|index| self.tasks[index].attempt > 0)
    }

    /// Ends `worker`'s lease on `index` without a completion. For the train task this aborts the
    /// whole gang: a collective cannot continue with a rank missing. Returns whether it will be retried.
    pub(super) fn drop_lease(&mut self, index: usize, worker: &WorkerId, cause: LossCause, message: &str) -> bool {
        match self.tasks[index].state {
            TaskState::Leased { deadline_ms, .. } => {
                self.deadlines.remove(&(deadline_ms, index, 0));
                self.release_hold(worker);
                self.requeue_or_fail(index, cause, message, Some(worker))
            }
            TaskState::Gang { attempt } => {
                let rank = self.gang.as_ref().and_then(|g| g.rank_of(worker)).unwrap_or(0);
                let task = self.plan.task_id(index);
                let message = format!("gang {task} attempt {attempt} aborted: rank {rank} ({message})");
                self.abort_gang(cause, &message, Some(worker))
            }
            TaskState::Pending | TaskState::Done(_) | TaskState::Failed { .. } => true,
        }
    }

    /// After a lost lease: back to Pending (first in line once its backoff is over: the barrier is
    /// waiting for it), or Failed once it has `max_attempts` counted failures, which fails the run.
    ///
    /// Why count this way (review A2): one bad GPU must not fail a task by losing it three times in a
    /// row, so a worker's failures of one task count once while another worker could still take it; a
    /// task that fails on every worker there is still fails after `max_attempts`, even on one worker.
    /// `culprit` is the worker whose lease was lost (None: a gang that never gathered).
    pub(super) fn requeue_or_fail(
        &mut self,
        index: usize,
        cause: LossCause,
        message: &str,
        culprit: Option<&WorkerId>,
    ) -> bool {
        let task_id = self.plan.task_id(index);
        let attempt = self.tasks[index].attempt;
        if cause != LossCause::Released {
            let task = &mut self.tasks[index];
            task.losses += 1;
            task.last_error = Some(message.to_owned());
            let shift = (task.losses - 1).min(20);
            let backoff = self.plan.retry_after_ms.saturating_mul(1 << shift).min(self.plan.retry_backoff_max_ms);
            task.not_before_ms = self.now_ms.saturating_add(backoff);
            self.record_error(task_id, cause, message);
        }
        if cause.counts_as_failure() {
            let repeat = culprit.is_some_and(|w| self.tasks[index].failed_on.contains(w));
            let counted = match culprit {
                Some(w) if repeat => !self.others_could_take(index, w, false),
                _ => true,
            };
            let task = &mut self.tasks[index];
            task.faults += 1;
            if counted {
                task.failures += 1;
            }
            if let Some(w) = culprit
                && !repeat
            {
                task.failed_on.push(w.clone());
            }
            if let Some(w) = culprit {
                self.note_worker_failure(w);
            }
        }
        let (failures, faults) = (self.tasks[index].failures, self.tasks[index].faults);
        if failures >= self.plan.max_attempts || faults >= self.plan.max_attempts.saturating_mul(3) {
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
            self.retry.push(index);
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
                gang.joined(),
                self.plan.train_ranks,
                self.plan.gang_join_timeout_ms
            );
            note(task, self.abort_gang(LossCause::GangJoinTimeout, &message, None));
        }
        // Last, so that a worker whose lease was just taken back is judged without it.
        let removed_workers = self.remove_dead_workers();
        Reply::Expired { requeued, failed, dead_workers, removed_workers }
    }

    /// The first lost task `worker` may take now: its backoff is over, and either `worker` has not failed
    /// it, or no idle worker that has not is there to take it instead, or none took it within a worker
    /// timeout (an idle worker asks every second; one that did not is gone).
    fn take_retry(&mut self, worker: &WorkerId) -> Option<usize> {
        let now = self.now_ms;
        let patience = self.plan.worker_timeout_ms;
        let position = self.retry.iter().position(|&index| {
            let task = &self.tasks[index];
            task.not_before_ms <= now
                && (!task.failed_on.contains(worker)
                    || now >= task.not_before_ms.saturating_add(patience)
                    || !self.others_could_take(index, worker, true))
        })?;
        Some(self.retry.remove(position))
    }

    /// Whether an unquarantined worker other than `worker` that has not failed task `index` is registered
    /// (with `idle_only`, one holding no lease, so it will ask for work shortly).
    ///
    /// Liveness is deliberately not read: idle workers' polls are not logged (`changes_only_liveness`),
    /// so whether an idle worker is alive can differ between the live state and its replay, and every
    /// rule here must come out the same in both. The `faults` cap and `take_retry`'s patience bound what
    /// a registered but vanished worker can cost instead.
    fn others_could_take(&self, index: usize, worker: &WorkerId, idle_only: bool) -> bool {
        let failed_on = &self.tasks[index].failed_on;
        self.workers.iter().any(|(id, w)| {
            id != worker && !self.quarantined(id) && !failed_on.contains(id) && (!idle_only || w.current.is_none())
        })
    }

    /// Counts a failure against `worker`, quarantining it after `quarantine_after` in a row, unless no
    /// other healthy worker is left (the run then fails on the task's own count instead of stalling).
    fn note_worker_failure(&mut self, worker: &WorkerId) {
        let now = self.now_ms;
        let (after, quarantine_ms) = (self.plan.quarantine_after, self.plan.quarantine_ms);
        // Registered, not alive: see `others_could_take` on why liveness is not read.
        let others_healthy = self.workers.iter().any(|(id, w)| id != worker && w.quarantined_until_ms <= now);
        let Some(w) = self.workers.get_mut(worker) else { return };
        w.failures += 1;
        w.consecutive_failures += 1;
        if after == 0 || w.consecutive_failures < after || !others_healthy {
            return;
        }
        let failures = w.consecutive_failures;
        w.quarantined_until_ms = now.saturating_add(quarantine_ms);
        // Probation: back from quarantine, one more failure in a row sends it back.
        w.consecutive_failures = after - 1;
        let until_ms = w.quarantined_until_ms;
        self.events.push(Event::WorkerQuarantined { worker: worker.clone(), failures, until_ms });
    }

    pub(super) fn quarantined(&self, worker: &WorkerId) -> bool {
        self.workers.get(worker).is_some_and(|w| w.quarantined_until_ms > self.now_ms)
    }
}
