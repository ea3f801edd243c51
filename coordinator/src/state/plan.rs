//! The numbers the run state needs from a run config: how many iterations, shards and ranks, and the
//! timeouts. Also the arithmetic that maps task ids and stages to dense indices, so the task table is
//! a flat `Vec` and no lookup needs a map.

use serde::{Deserialize, Serialize};

use iro_common::RunConfig;

use super::ids::TaskId;
use crate::error::Error;
use crate::plan::{Phase, tasks_in_phase};

/// Phases in the order every iteration runs them.
pub const PHASES: [Phase; 3] = [Phase::Rollout, Phase::Train, Phase::Eval];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Iterations T; task ids count them from 1.
    pub iterations: u32,
    pub rollout_shards: u32,
    pub eval_shards: u32,
    /// R: ranks of the train gang.
    pub train_ranks: u32,
    /// Counted failures a task may have before it, and the run, fail: one per distinct worker, and a
    /// repeat on the same worker only when no other worker could have taken it (see `tasks.rs`).
    pub max_attempts: u32,
    /// Task failures in a row after which a worker gets no new task for `quarantine_ms` (0: never).
    #[serde(default = "default_quarantine_after")]
    pub quarantine_after: u32,
    #[serde(default = "default_quarantine_ms")]
    pub quarantine_ms: u64,
    /// A lost task's n-th loss delays its next lease by `retry_after_ms · 2^(n-1)`, at most this.
    #[serde(default = "default_retry_backoff_max_ms")]
    pub retry_backoff_max_ms: u64,
    /// How long a lease lives without a heartbeat naming it.
    pub lease_ms: u64,
    /// What workers are told to heartbeat at.
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is dead and loses its lease at once (three missed heartbeats by
    /// default, much sooner than the lease would expire).
    pub worker_timeout_ms: u64,
    /// How long a gang may take to gather all R ranks, counted from its first rank's lease.
    pub gang_join_timeout_ms: u64,
    /// The "come back later" hint for barriers, full gangs and gangs still forming.
    pub retry_after_ms: u64,
    /// How long the record of a dead worker that holds nothing is kept before it is removed (review A12):
    /// None is the default, `DEFAULT_RETENTION_TIMEOUTS` worker timeouts; `Some(0)` keeps records forever.
    /// Absent from the JSON when None, so logs and snapshots written before it existed still match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_retention_ms: Option<u64>,
    /// The most worker records the state holds (0: no bound): a RegisterWorker of a new id beyond it first
    /// drops the longest-dead records that hold nothing, and is refused when there are none.
    #[serde(default = "default_max_workers", skip_serializing_if = "is_default_max_workers")]
    pub max_workers: u32,
}

/// The default retention of dead worker records, in worker timeouts.
pub const DEFAULT_RETENTION_TIMEOUTS: u64 = 10;
/// The default bound on worker records: far above any real cluster, far below what would exhaust memory
/// (a record holds at most a few KiB of validated text, `driver::wire`).
pub const DEFAULT_MAX_WORKERS: u32 = 4096;

// Plans logged before these fields existed replay with today's defaults.
fn default_quarantine_after() -> u32 {
    3
}
fn default_quarantine_ms() -> u64 {
    900_000
}
fn default_retry_backoff_max_ms() -> u64 {
    60_000
}
fn default_max_workers() -> u32 {
    DEFAULT_MAX_WORKERS
}
fn is_default_max_workers(max: &u32) -> bool {
    *max == DEFAULT_MAX_WORKERS
}

impl Plan {
    /// The plan of a (validated) run config. The gang join timeout is one lease: a rank that takes
    /// longer than a lease to show up would have lost its lease anyway.
    pub fn from_config(config: &RunConfig) -> Result<Self, Error> {
        let c = &config.cluster;
        let count = |field: &'static str, n: usize| {
            u32::try_from(n).map_err(|_| Error::InvalidPlan { field, message: format!("{n} does not fit in u32") })
        };
        let heartbeat_interval_ms = c.heartbeat_interval_s.saturating_mul(1000);
        let plan = Self {
            iterations: config.run.iterations,
            rollout_shards: count("rollout shards", tasks_in_phase(config, Phase::Rollout))?,
            eval_shards: count("eval shards", tasks_in_phase(config, Phase::Eval))?,
            train_ranks: count("cluster.train_ranks", c.train_ranks)?,
            max_attempts: c.max_attempts,
            quarantine_after: c.quarantine_after,
            quarantine_ms: c.quarantine_s.saturating_mul(1000),
            retry_backoff_max_ms: c.retry_backoff_max_s.saturating_mul(1000),
            lease_ms: c.lease_timeout_s.saturating_mul(1000),
            heartbeat_interval_ms,
            worker_timeout_ms: heartbeat_interval_ms.saturating_mul(3),
            gang_join_timeout_ms: c.lease_timeout_s.saturating_mul(1000),
            retry_after_ms: heartbeat_interval_ms.min(1000),
            worker_retention_ms: None,
            max_workers: DEFAULT_MAX_WORKERS,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// The same defaults as `from_config`, for tests and benchmarks that build plans by hand.
    pub fn new(iterations: u32, rollout_shards: u32, eval_shards: u32, train_ranks: u32) -> Self {
        Self {
            iterations,
            rollout_shards,
            eval_shards,
            train_ranks,
            max_attempts: 3,
            quarantine_after: default_quarantine_after(),
            quarantine_ms: default_quarantine_ms(),
            retry_backoff_max_ms: default_retry_backoff_max_ms(),
            lease_ms: 120_000,
            heartbeat_interval_ms: 10_000,
            worker_timeout_ms: 30_000,
            gang_join_timeout_ms: 120_000,
            retry_after_ms: 1_000,
            worker_retention_ms: None,
            max_workers: DEFAULT_MAX_WORKERS,
        }
    }

    /// How long a dead worker that holds nothing keeps its record (0: forever); see `worker_retention_ms`.
    pub fn worker_retention(&self) -> u64 {
        self.worker_retention_ms.unwrap_or_else(|| self.worker_timeout_ms.saturating_mul(DEFAULT_RETENTION_TIMEOUTS))
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field, message: &str| Err(Error::InvalidPlan { field, message: message.to_owned() });
        if self.iterations == 0 {
            return bad("iterations", "must be at least 1");
        }
        if self.train_ranks == 0 {
            return bad("train_ranks", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.lease_ms == 0 || self.worker_timeout_ms == 0 || self.gang_join_timeout_ms == 0 {
            return bad("lease_ms", "lease, worker and gang join timeouts must be positive");
        }
        // The retention is also how often an idle worker's polls are logged (`Worker::durable_seen_ms`):
        // at most once per worker timeout keeps idle polls off the log (review A4).
        let retention = self.worker_retention();
        if retention != 0 && retention < self.worker_timeout_ms {
            return bad("worker_retention_ms", "must be 0 (keep dead workers) or at least the worker timeout");
        }
        // Dense task indices are u32-sized in the benchmarks' worst case; refuse plans that overflow usize math.
        let total = (u64::from(self.rollout_shards) + 1 + u64::from(self.eval_shards)) * u64::from(self.iterations);
        if total > u64::from(u32::MAX) {
            return bad("iterations", "the plan has more than 2^32 tasks");
        }
        Ok(())
    }

    pub fn tasks_in(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Rollout => self.rollout_shards,
            Phase::Train => 1,
            Phase::Eval => self.eval_shards,
        }
    }

    fn per_iteration(&self) -> usize {
        self.rollout_shards as usize + 1 + self.eval_shards as usize
    }

    pub fn total_tasks(&self) -> usize {
        self.per_iteration() * self.iterations as usize
    }

    /// Stages are (iteration, phase) pairs in run order; the barrier lets only one be active.
    pub fn stage_count(&self) -> usize {
        self.iterations as usize * PHASES.len()
    }

    pub fn stage(&self, stage: usize) -> (u32, Phase) {
        (stage as u32 / 3 + 1, PHASES[stage % 3])
    }

    pub fn stage_of(&self, iteration: u32, phase: Phase) -> usize {
        (iteration as usize - 1) * 3 + PHASES.iter().position(|p| *p == phase).unwrap_or(0)
    }

    /// Dense indices of a stage's tasks.
    pub fn stage_tasks(&self, stage: usize) -> std::ops::Range<usize> {
        let (iteration, phase) = self.stage(stage);
        let base = (iteration as usize - 1) * self.per_iteration();
        let start = base
            + match phase {
                Phase::Rollout => 0,
                Phase::Train => self.rollout_shards as usize,
                Phase::Eval => self.rollout_shards as usize + 1,
            };
        start..start + self.tasks_in(phase) as usize
    }

    /// The dense index of a task id, or why it is not part of this plan.
    pub fn index(&self, id: TaskId) -> Result<usize, Error> {
        let unknown = |why: String| Error::UnknownTask { task_id: id.to_string(), why };
        if id.iteration == 0 || id.iteration > self.iterations {
            return Err(unknown(format!("iteration must be in 1..={}", self.iterations)));
        }
        let shards = self.tasks_in(id.phase);
        if id.shard >= shards {
            return Err(unknown(format!("{} has {shards} task(s) per iteration", super::ids::phase_name(id.phase))));
        }
        Ok(self.stage_tasks(self.stage_of(id.iteration, id.phase)).start + id.shard as usize)
    }

    pub fn task_id(&self, index: usize) -> TaskId {
        let per = self.per_iteration();
        let iteration = (index / per) as u32 + 1;
        let offset = index % per;
        let rollout = self.rollout_shards as usize;
        let (phase, shard) = if offset < rollout {
            (Phase::Rollout, offset)
        } else if offset == rollout {
            (Phase::Train, 0)
        } else {
            (Phase::Eval, offset - rollout - 1)
        };
        TaskId::new(iteration, phase, shard as u32)
    }

    pub fn stage_of_task(&self, index: usize) -> usize {
        let id = self.task_id(index);
        self.stage_of(id.iteration, id.phase)
    }
}
