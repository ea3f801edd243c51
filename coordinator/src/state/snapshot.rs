//! Read-only views of the run state: the snapshot the status endpoint serializes, and the manifest of
//! accepted outputs that the next phase reads.

use serde::Serialize;

use super::command::{Progress, Resources};
use super::ids::{TaskId, WorkerId, phase_name, phase_serde};
use super::tasks::{Counts, TaskState};
use super::{RecentError, RunState, RunStatus};
use crate::error::{Error, Result};
use crate::plan::Phase;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub now_ms: u64,
    pub run: RunStatus,
    pub iterations: u32,
    /// The active stage; None once the run finished.
    pub iteration: Option<u32>,
    #[serde(serialize_with = "phase_serde::serialize_opt")]
    pub phase: Option<Phase>,
    /// Tasks of the active stage by state (all zero once the run finished).
    pub phase_counts: Counts,
    pub overall: Counts,
    /// Every (iteration, phase) in run order, for progress bars.
    pub stages: Vec<StageView>,
    pub workers: Vec<WorkerView>,
    /// Records of long-dead workers removed so far: no longer among `workers`.
    pub workers_removed: u64,
    pub gang: Option<GangView>,
    /// Oldest first.
    pub recent_errors: Vec<RecentError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageView {
    pub iteration: u32,
    #[serde(with = "phase_serde")]
    pub phase: Phase,
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerView {
    pub id: WorkerId,
    pub name: String,
    pub resources: Resources,
    pub alive: bool,
    pub last_seen_ms: u64,
    pub current: Option<TaskId>,
    pub attempt: Option<u32>,
    pub progress: Progress,
    pub completed: u64,
    pub failures: u64,
    /// Set while the worker is quarantined (it failed `quarantine_after` tasks in a row): when it may
    /// take work again.
    pub quarantined_until_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GangView {
    pub task: TaskId,
    pub attempt: u32,
    pub world: u32,
    pub started: bool,
    pub join_deadline_ms: u64,
    pub ranks: Vec<RankView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RankView {
    pub rank: u32,
    pub worker: WorkerId,
    /// Published its endpoint.
    pub joined: bool,
    pub finished: bool,
}

/// The accepted outputs of one stage; `complete` once every shard has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageManifest {
    pub iteration: u32,
    #[serde(with = "phase_serde")]
    pub phase: Phase,
    pub complete: bool,
    /// In shard order; shards not done yet are absent.
    pub shards: Vec<ShardOutput>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardOutput {
    pub shard: u32,
    pub attempt: u32,
    pub worker: WorkerId,
    pub key: String,
    pub sha256: String,
    pub records: u64,
    pub tokens: u64,
}

impl RunState {
    pub fn snapshot(&self) -> Snapshot {
        let stages: Vec<StageView> = (0..self.plan.stage_count())
            .map(|s| {
                let (iteration, phase) = self.plan.stage(s);
                StageView { iteration, phase, counts: self.stage_counts[s] }
            })
            .collect();
        let mut overall = Counts::default();
        for stage in &stages {
            overall.add(&stage.counts);
        }
        let current = self.current_stage();
        let workers = self
            .workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                name: w.name.clone(),
                resources: w.resources.clone(),
                alive: w.alive,
                last_seen_ms: w.last_seen_ms,
                current: w.current.map(|h| self.plan.task_id(h.task)),
                attempt: w.current.map(|h| h.attempt),
                progress: w.progress,
                completed: w.completed,
                failures: w.failures,
                quarantined_until_ms: (w.quarantined_until_ms > self.now_ms).then_some(w.quarantined_until_ms),
            })
            .collect();
        let gang = self.gang.as_ref().map(|g| GangView {
            task: self.plan.task_id(g.task),
            attempt: g.attempt,
            world: self.plan.train_ranks,
            started: g.started,
            join_deadline_ms: g.join_deadline_ms,
            ranks: g
                .members
                .iter()
                .map(|m| RankView {
                    rank: m.rank,
                    worker: m.worker.clone(),
                    joined: m.endpoint.is_some(),
                    finished: m.finished,
                })
                .collect(),
        });
        Snapshot {
            now_ms: self.now_ms,
            run: self.status.clone(),
            iterations: self.plan.iterations,
            iteration: current.map(|(t, _)| t),
            phase: current.map(|(_, p)| p),
            phase_counts: current.map(|_| self.stage_counts[self.stage]).unwrap_or_default(),
            overall,
            stages,
            workers,
            workers_removed: self.workers_removed,
            gang,
            recent_errors: self.recent_errors.iter().cloned().collect(),
        }
    }

    /// The accepted attempt of every done task of one stage: what the next phase reads.
    pub fn manifest(&self, iteration: u32, phase: Phase) -> Result<StageManifest> {
        if iteration == 0 || iteration > self.plan.iterations {
            return Err(Error::UnknownTask {
                task_id: format!("iter-{iteration}/{}", phase_name(phase)),
                why: format!("iteration must be in 1..={}", self.plan.iterations),
            });
        }
        let stage = self.plan.stage_of(iteration, phase);
        let shards = self.tasks[self.plan.stage_tasks(stage)]
            .iter()
            .enumerate()
            .filter_map(|(shard, task)| match &task.state {
                TaskState::Done(a) => Some(ShardOutput {
                    shard: shard as u32,
                    attempt: a.attempt,
                    worker: a.worker.clone(),
                    key: a.output.key.clone(),
                    sha256: a.output.sha256.clone(),
                    records: a.output.records,
                    tokens: a.output.tokens,
                }),
                _ => None,
            })
            .collect();
        Ok(StageManifest { iteration, phase, complete: self.stage_complete(stage), shards })
    }
}
