//! The run state machine: commands in, a reply and events out, no IO and no clock (time is a field of
//! every command), like raft-rs's `RawNode`. The driver appends each command to a log before applying
//! it, so replaying the log, or replicating it through Raft, rebuilds exactly this state.
//!
//! The rules, in one place:
//! - **Barriers.** Stages run strictly in order: iteration t's rollout shards, then its train gang,
//!   then its eval shards, then iteration t+1's rollout. Only the current stage's tasks are leased; the
//!   next stage opens when every task of the current one is Done. Simple, deterministic, and exactly
//!   what the data needs (training reads all of t's rollouts, eval and t+1's rollouts read V_t).
//! - **Attempts and fencing.** Each lease gets a new attempt number; a completion, failure or heartbeat
//!   is honoured only from the worker holding the current attempt. Anything else gets `Reply::Fenced`
//!   and changes no task, so a late or duplicate completion is never counted twice.
//! - **Failures.** A failed attempt (error, expired lease, dead or restarted worker, gang abort) counts
//!   toward `max_attempts` once per distinct worker (a repeat on the same worker only when no other
//!   could take the task); at the limit the task fails and so does the run, naming the task and its
//!   last error. A *released* lease (SIGTERM), an infrastructure error (the store unreachable) and a
//!   gang that did not gather go back to Pending without counting: the task did nothing wrong. A lost
//!   task waits out an exponential backoff and prefers a worker that has not failed it; a worker that
//!   fails `quarantine_after` tasks in a row gets no new work for `quarantine_ms`. Either way the next
//!   lease is a new attempt, writing to a new object key.
//! - **Rejected outputs.** Done is final for workers, but not for the driver's manifest writer: when it
//!   finds an accepted output missing or wrong before the stage's manifest names it, `RejectOutput` puts
//!   the task back to Pending (a lost lease of the worker that reported it) and makes its stage the active
//!   one again. Allowed only while no later stage has leased anything, which the driver guarantees by
//!   leasing nothing of a stage before the manifests it reads are written.
//! - **Expiry.** A lease past its deadline stays valid until an `ExpireLeases` tick reaps it, so a
//!   completion racing the timer is accepted rather than wasted.
//! - **Errors.** Unknown workers or tasks are refused with an `Error` before anything is touched.

mod command;
mod gang;
mod ids;
mod plan;
mod snapshot;
mod tasks;
mod workers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use command::{
    Applied, Command, Event, Fenced, Lease, LeaseRef, LossCause, Output, OutputProblem, Progress, Reply, Resources,
    WaitReason,
};
pub use gang::{Gang, Member};
pub use ids::{TaskId, WorkerId, parse_phase, phase_name};
pub use plan::{PHASES, Plan};
pub use snapshot::{GangView, RankView, ShardOutput, Snapshot, StageManifest, StageView, WorkerView};
pub use tasks::{Accepted, Counts, Task, TaskState};
pub use workers::{Held, Worker};

use crate::error::{Error, Result};
use crate::plan::Phase;

/// How many recent errors the snapshot keeps: enough to diagnose, bounded so a flapping worker cannot
/// grow the state.
pub const RECENT_ERRORS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Finished,
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    pub at_ms: u64,
    pub task: TaskId,
    pub cause: LossCause,
    pub message: String,
}

/// The whole state of a run. Serializable so the driver (and Raft) can snapshot it instead of
/// replaying a long log; every collection is ordered so two equal states serialize identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    plan: Plan,
    /// The latest time any command carried. Time never runs backwards here even if the driver's clock
    /// does (a new leader, a clock step), so deadlines only ever move forward.
    now_ms: u64,
    status: RunStatus,
    /// Index of the active stage (see `Plan::stage`); `stage_count()` once the run finished.
    stage: usize,
    tasks: Vec<Task>,
    stage_counts: Vec<Counts>,
    /// Pending tasks of the active (sharded) stage never leased yet: leasing is a pop, not a scan.
    queue: VecDeque<usize>,
    /// Pending tasks of the active stage that lost a lease, in the order they lost it; leased before the
    /// queue once their backoff is over. Few: it holds only tasks that went wrong.
    #[serde(default)]
    retry: Vec<usize>,
    /// (deadline, task index, rank) of every live lease; rank is 0 for shards.
    deadlines: BTreeSet<(u64, usize, u32)>,
    workers: BTreeMap<WorkerId, Worker>,
    /// (last seen, id) of every live worker, so finding the silent ones is a walk from the front.
    liveness: BTreeSet<(u64, WorkerId)>,
    /// The train gang of the active stage, while it forms or runs.
    gang: Option<Gang>,
    /// Idle workers that asked for a train rank while no gang was forming, and when (see `lease_rank`).
    #[serde(default)]
    gang_candidates: BTreeMap<WorkerId, u64>,
    recent_errors: VecDeque<RecentError>,
    /// Worker records removed so far (dead for the retention, or dropped to make room): the status page
    /// shows them, since the dead workers it counts no longer include them.
    #[serde(default)]
    workers_removed: u64,
    /// The highest n of any `w-{n}` id ever registered, so a fresh id never reuses a removed worker's.
    #[serde(default)]
    highest_worker_number: u64,
    /// Filled while one command applies, handed out in `Applied`; always empty between commands.
    #[serde(skip)]
    events: Vec<Event>,
}

impl RunState {
    pub fn new(plan: Plan) -> Result<Self> {
        plan.validate()?;
        let stage_counts = (0..plan.stage_count())
            .map(|s| Counts { pending: plan.stage_tasks(s).len() as u64, ..Counts::default() })
            .collect();
        let mut state = Self {
            tasks: vec![Task::default(); plan.total_tasks()],
            plan,
            now_ms: 0,
            status: RunStatus::Running,
            stage: 0,
            stage_counts,
            queue: VecDeque::new(),
            retry: Vec::new(),
            deadlines: BTreeSet::new(),
            workers: BTreeMap::new(),
            liveness: BTreeSet::new(),
            gang: None,
            gang_candidates: BTreeMap::new(),
            recent_errors: VecDeque::new(),
            workers_removed: 0,
            highest_worker_number: 0,
            events: Vec::new(),
        };
        if state.stage_complete(0) {
            state.advance();
        } else {
            state.queue.extend(state.plan.stage_tasks(0));
        }
        state.events.clear();
        Ok(state)
    }

    /// Rebuilds a state from its command log. Commands that were refused when first applied are
    /// refused again and, having changed nothing then, change nothing now.
    pub fn replay(plan: Plan, log: impl IntoIterator<Item = Command>) -> Result<Self> {
        let mut state = Self::new(plan)?;
        for command in log {
            let _ = state.apply(command);
        }
        Ok(state)
    }

    /// Applies one command. On `Err` nothing changed.
    pub fn apply(&mut self, command: Command) -> Result<Applied> {
        let result = match command {
            Command::RegisterWorker { worker_id, name, resources, now_ms, session } => {
                self.register(worker_id, name, resources, now_ms, session)
            }
            Command::Heartbeat { worker_id, lease, progress, now_ms } => {
                self.heartbeat(&worker_id, lease, progress, now_ms)
            }
            Command::LeaseTask { worker_id, now_ms } => self.lease(&worker_id, now_ms),
            Command::CompleteTask { worker_id, task_id, attempt, output, now_ms } => {
                self.complete(&worker_id, task_id, attempt, output, now_ms)
            }
            Command::FailTask { worker_id, task_id, attempt, error, released, retryable, now_ms } => {
                // A release wins: the worker is going away whatever the error was.
                let cause = match (released, retryable) {
                    (true, _) => LossCause::Released,
                    (false, true) => LossCause::Infrastructure,
                    (false, false) => LossCause::Failed,
                };
                self.fail(&worker_id, task_id, attempt, &error, cause, now_ms)
            }
            Command::ExpireLeases { now_ms } => Ok(self.expire(now_ms)),
            Command::JoinGang { worker_id, task_id, attempt, endpoint, now_ms } => {
                self.join_gang(&worker_id, task_id, attempt, endpoint, now_ms)
            }
            Command::AbortGang { worker_id, task_id, attempt, reason, now_ms } => {
                self.abort_gang_command(&worker_id, task_id, attempt, &reason, now_ms)
            }
            Command::RejectOutput { task_id, attempt, problem, detail, now_ms } => {
                self.reject_output(task_id, attempt, problem, &detail, now_ms)
            }
        };
        debug_assert!(result.is_ok() || self.events.is_empty(), "a refused command emitted events");
        Ok(Applied { reply: result?, events: std::mem::take(&mut self.events) })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn status(&self) -> &RunStatus {
        &self.status
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The active (iteration, phase), or None once the run finished.
    pub fn current_stage(&self) -> Option<(u32, Phase)> {
        (self.stage < self.plan.stage_count()).then(|| self.plan.stage(self.stage))
    }

    pub fn task(&self, id: TaskId) -> Result<&Task> {
        Ok(&self.tasks[self.plan.index(id)?])
    }

    /// The accepted output of a task, once it is Done.
    pub fn accepted(&self, id: TaskId) -> Result<Option<&Accepted>> {
        Ok(match &self.task(id)?.state {
            TaskState::Done(accepted) => Some(accepted),
            _ => None,
        })
    }

    pub fn worker(&self, id: &WorkerId) -> Option<&Worker> {
        self.workers.get(id)
    }

    pub fn gang(&self) -> Option<&Gang> {
        self.gang.as_ref()
    }

    /// An id no worker has had yet, for the driver to put in a RegisterWorker command: past every `w-{n}`
    /// ever registered, so not one of a removed record either.
    pub fn fresh_worker_id(&self) -> WorkerId {
        let after = (self.workers.len() as u64).max(self.highest_worker_number);
        (after + 1..)
            .map(|n| WorkerId::new(format!("w-{n:04}")))
            .find(|id| !self.workers.contains_key(id))
            .unwrap_or_else(|| WorkerId::new("w-overflow"))
    }

    /// When the driver should next send ExpireLeases: the earliest lease deadline, worker timeout, gang
    /// join deadline or removal of a dead worker's record; None when nothing can expire.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let lease = self.deadlines.first().map(|(d, _, _)| *d);
        let worker = self.liveness.first().map(|(seen, _)| seen.saturating_add(self.plan.worker_timeout_ms));
        let join = self.gang.as_ref().filter(|g| !g.started).map(|g| g.join_deadline_ms);
        [lease, worker, join, self.next_removal_ms()].into_iter().flatten().min()
    }

    /// Worker records removed so far (see `workers.rs`).
    pub fn workers_removed(&self) -> u64 {
        self.workers_removed
    }

    /// A stable fingerprint of the whole state (FNV-1a over its JSON), to check that a replay or a
    /// follower reached the same state as the leader without shipping it.
    pub fn digest(&self) -> u64 {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// Whether an applied command changed nothing but liveness (a worker's last-seen time and alive
    /// flag) and the state's clock, so the driver need not log it: an idle LeaseTask poll answered
    /// RetryAfter or "run over" (except one that recorded a gang candidate), a lease-less or fenced heartbeat from a worker that holds no lease, and
    /// an ExpireLeases that took no lease back and removed no worker record. A poll or heartbeat that moved
    /// its worker's `durable_seen_ms` (once per retention) is logged: record removal reads that time.
    ///
    /// Why replay stays exact without them: liveness has a durable effect only through a lease, when a
    /// silent holder dies in `expire` and loses it. Every command from a lease holder is still logged
    /// (these exceptions all require the worker to hold none), so a holder's last-seen time is the same
    /// replayed as live, and the same holders die at each logged ExpireLeases. An idle worker's
    /// liveness may differ after a replay (it can even be replayed as dead), but dying without a lease
    /// changes nothing durable, and its next logged command revives it as the live one was. Progress (the
    /// status page's done/total) is display only, no rule reads it, so it alone would not need logging;
    /// but only a heartbeat naming the worker's lease sets it, and that heartbeat extends the lease's
    /// deadline, which is durable (a replay must not expire the lease earlier), so it is logged anyway.
    /// The driver stamps each logged command with at least the state's time, so the commands skipped
    /// here cannot make a replay use an earlier time than the live state did. After a restart the
    /// driver's grace lets idle workers poll again before anything expires.
    pub fn changes_only_liveness(&self, command: &Command, reply: &Reply) -> bool {
        let idle = |worker: &WorkerId| self.workers.get(worker).is_some_and(|w| w.current.is_none());
        match (command, reply) {
            // A poll that recorded its worker as a gang candidate (at this command's time) is durable.
            (
                Command::LeaseTask { worker_id, now_ms },
                Reply::Lease(Lease::RetryAfter { reason: WaitReason::GangGathering, .. }),
            ) => {
                idle(worker_id)
                    && self.gang_candidates.get(worker_id) != Some(now_ms)
                    && !self.durably_seen_at(worker_id, *now_ms)
            }
            (Command::Heartbeat { worker_id, now_ms, .. }, Reply::Alive | Reply::Fenced(_)) => {
                idle(worker_id) && !self.durably_seen_at(worker_id, *now_ms)
            }
            (
                Command::LeaseTask { worker_id, now_ms },
                Reply::Lease(Lease::RetryAfter { .. } | Lease::RunFinished | Lease::RunFailed { .. }),
            ) => idle(worker_id) && !self.durably_seen_at(worker_id, *now_ms),
            (Command::ExpireLeases { .. }, Reply::Expired { requeued, failed, removed_workers, .. }) => {
                requeued.is_empty() && failed.is_empty() && removed_workers.is_empty()
            }
            _ => false,
        }
    }

    /// `digest` of everything the command log makes durable: the whole state except workers' liveness
    /// and the latest time, which unlogged commands move (see `changes_only_liveness`). A state rebuilt
    /// from the log has the same durable digest as the live one.
    pub fn durable_digest(&self) -> u64 {
        let mut durable = self.clone();
        durable.now_ms = 0;
        durable.liveness.clear();
        for worker in durable.workers.values_mut() {
            worker.last_seen_ms = 0;
            worker.alive = true;
        }
        durable.digest()
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn known(&self, id: &WorkerId) -> Result<()> {
        if self.workers.contains_key(id) { Ok(()) } else { Err(Error::UnknownWorker { worker_id: id.to_string() }) }
    }

    fn running(&self) -> bool {
        self.status == RunStatus::Running
    }

    /// Whether `worker` holds attempt `attempt` of task `index`, and if not, why its report is ignored.
    fn fence(&self, worker: &WorkerId, index: usize, attempt: u32) -> std::result::Result<(), Fenced> {
        if !self.running() {
            return Err(Fenced::RunOver);
        }
        if self.workers.get(worker).and_then(|w| w.current) == Some(Held { task: index, attempt }) {
            return Ok(());
        }
        let task = &self.tasks[index];
        match &task.state {
            TaskState::Done(accepted) => Err(Fenced::AlreadyDone { accepted_attempt: accepted.attempt }),
            TaskState::Failed { .. } => Err(Fenced::TaskFailed),
            _ if attempt < task.attempt => Err(Fenced::StaleAttempt { current_attempt: task.attempt }),
            _ => Err(Fenced::NotHolder),
        }
    }

    fn stage_complete(&self, stage: usize) -> bool {
        self.stage_counts[stage].done as usize == self.plan.stage_tasks(stage).len()
    }

    /// Moves past every complete stage and opens the next one (the phase barrier).
    fn advance(&mut self) {
        let stages = self.plan.stage_count();
        let before = self.stage;
        while self.stage < stages && self.stage_complete(self.stage) {
            self.stage += 1;
        }
        if self.stage == before {
            return;
        }
        if self.stage == stages {
            self.status = RunStatus::Finished;
            self.events.push(Event::RunFinished);
            return;
        }
        let (iteration, phase) = self.plan.stage(self.stage);
        self.events.push(Event::PhaseStarted { iteration, phase });
        // The train task is leased rank by rank through the gang, not through the queue.
        if phase != Phase::Train {
            debug_assert!(self.queue.is_empty() && self.retry.is_empty(), "a finished stage left pending tasks");
            self.queue.extend(self.plan.stage_tasks(self.stage));
        }
    }

    fn fail_run(&mut self, reason: String) {
        if self.running() {
            self.events.push(Event::RunFailed { reason: reason.clone() });
            self.status = RunStatus::Failed { reason };
        }
    }

    fn record_error(&mut self, task: TaskId, cause: LossCause, message: &str) {
        if self.recent_errors.len() == RECENT_ERRORS {
            self.recent_errors.pop_front();
        }
        self.recent_errors.push_back(RecentError { at_ms: self.now_ms, task, cause, message: message.to_owned() });
    }
}
