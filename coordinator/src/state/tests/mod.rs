//! Tests of the run state machine, driven by commands and explicit time: no sockets, no sleeps. Each
//! file pins down one part of the contract in `state/mod.rs`; test names say which rule they hold.

mod barriers;
mod failures;
mod fencing;
mod gang;
mod lifecycle;
mod property;
mod rejected;
mod replay;
mod workers;

use super::*;

/// A run state plus the log of every command sent to it, so any test can also check replay.
pub(super) struct Harness {
    pub state: RunState,
    pub log: Vec<Command>,
    /// What the driver's log would hold: the applied commands that changed something durable, each
    /// stamped with at least the state's time.
    pub durable: Vec<Command>,
    pub now: u64,
}

pub(super) fn plan(iterations: u32, rollout: u32, eval: u32, ranks: u32) -> Plan {
    Plan::new(iterations, rollout, eval, ranks)
}

pub(super) fn w(id: &str) -> WorkerId {
    WorkerId::new(id)
}

pub(super) fn rollout(iteration: u32, shard: u32) -> TaskId {
    TaskId::new(iteration, Phase::Rollout, shard)
}

pub(super) fn train(iteration: u32) -> TaskId {
    TaskId::new(iteration, Phase::Train, 0)
}

pub(super) fn eval(iteration: u32, shard: u32) -> TaskId {
    TaskId::new(iteration, Phase::Eval, shard)
}

/// The output a worker would report for an attempt: the key is attempt-specific, as in the layout.
pub(super) fn output(task: TaskId, attempt: u32) -> Output {
    Output {
        key: format!("runs/test/{task}.attempt-{attempt}.jsonl"),
        sha256: format!("{:064x}", u64::from(task.shard) * 1000 + u64::from(attempt)),
        records: 8,
        tokens: 400,
    }
}

impl Harness {
    pub fn new(plan: Plan) -> Self {
        Self { state: RunState::new(plan).unwrap(), log: Vec::new(), durable: Vec::new(), now: 0 }
    }

    /// Applies a command and logs it whatever the outcome; `durable` gets it as the driver would log it.
    pub fn apply(&mut self, command: Command) -> Result<Applied> {
        self.log.push(command.clone());
        let mut stamped = command.clone();
        stamped.set_now_ms(command.now_ms().max(self.state.now_ms()));
        let result = self.state.apply(command);
        if let Ok(applied) = &result
            && !self.state.changes_only_liveness(&stamped, &applied.reply)
        {
            self.durable.push(stamped);
        }
        result
    }

    pub fn ok(&mut self, command: Command) -> Reply {
        self.apply(command).unwrap().reply
    }

    pub fn advance(&mut self, ms: u64) -> u64 {
        self.now += ms;
        self.now
    }

    pub fn register(&mut self, id: &str) -> WorkerId {
        let worker_id = w(id);
        let resources = Resources { device: "cpu".into(), memory_bytes: 1 << 30, cached_models: vec![] };
        self.ok(Command::RegisterWorker {
            worker_id: worker_id.clone(),
            name: id.into(),
            resources,
            now_ms: self.now,
            session: String::new(),
        });
        worker_id
    }

    pub fn lease(&mut self, worker: &WorkerId) -> Lease {
        match self.ok(Command::LeaseTask { worker_id: worker.clone(), now_ms: self.now }) {
            Reply::Lease(lease) => lease,
            other => panic!("LeaseTask answered {other:?}"),
        }
    }

    /// Leases and expects a shard task. Like a worker's task loop, it waits out a lost task's backoff
    /// (moving the clock to its end, a few times at most) when that is all there is.
    pub fn take(&mut self, worker: &WorkerId) -> (TaskId, u32) {
        for _ in 0..8 {
            match self.lease(worker) {
                Lease::Task { task_id, attempt, .. } => return (task_id, attempt),
                Lease::RetryAfter { ms, reason: WaitReason::Backoff } => self.wait_backoff(ms),
                other => panic!("expected a task for {worker}, got {other:?}"),
            }
        }
        panic!("{worker} got no task after waiting out 8 backoff hints")
    }

    /// Moves the clock to the end of the earliest backoff of a lost task (or on by the retry hint `ms`).
    pub fn wait_backoff(&mut self, ms: u64) {
        let state = &self.state;
        let mut ends: Vec<u64> = state.retry.iter().map(|&i| state.tasks[i].not_before_ms).collect();
        if state.stage < state.plan.stage_count() {
            // The train task backs off outside the retry list.
            ends.push(state.tasks[state.plan.stage_tasks(state.stage).start].not_before_ms);
        }
        self.now = ends.into_iter().filter(|&t| t > self.now).min().unwrap_or(self.now + ms);
    }

    /// Leases and expects a gang rank: (task, attempt, rank); waits out a backoff as `take` does.
    pub fn take_rank(&mut self, worker: &WorkerId) -> (TaskId, u32, u32) {
        for _ in 0..8 {
            match self.lease(worker) {
                Lease::GangRank { task_id, attempt, rank, .. } => return (task_id, attempt, rank),
                Lease::RetryAfter { ms, reason: WaitReason::Backoff } => self.wait_backoff(ms),
                other => panic!("expected a gang rank for {worker}, got {other:?}"),
            }
        }
        panic!("{worker} got no gang rank after waiting out 8 backoff hints")
    }

    /// R workers (exactly the gang's size) ask for a train rank in turn, as idle workers poll: each becomes
    /// a candidate, and the last one's request forms the gang with all of them. Waits out the train task's
    /// backoff first, during which nobody is recorded. Returns each worker's (task, attempt, rank).
    pub fn gather(&mut self, workers: &[WorkerId]) -> Vec<(TaskId, u32, u32)> {
        assert_eq!(workers.len() as u32, self.state.plan().train_ranks, "a gang gathers exactly R workers");
        let train = self.state.tasks[self.state.plan.stage_tasks(self.state.stage).start].not_before_ms;
        self.now = self.now.max(train);
        let (last, first) = workers.split_last().expect("a gang has at least one rank");
        for worker in first {
            match self.lease(worker) {
                Lease::RetryAfter { reason: WaitReason::GangGathering, .. } => {}
                other => panic!("{worker} should wait for the gang to gather, got {other:?}"),
            }
        }
        let formed = self.take_rank(last);
        let mut leases: Vec<_> = first.iter().map(|worker| self.take_rank(worker)).collect();
        leases.push(formed);
        leases
    }

    pub fn complete(&mut self, worker: &WorkerId, task_id: TaskId, attempt: u32) -> Reply {
        let output = output(task_id, attempt);
        self.ok(Command::CompleteTask { worker_id: worker.clone(), task_id, attempt, output, now_ms: self.now })
    }

    pub fn fail(&mut self, worker: &WorkerId, task_id: TaskId, attempt: u32, error: &str, released: bool) -> Reply {
        self.ok(Command::FailTask {
            worker_id: worker.clone(),
            task_id,
            attempt,
            error: error.into(),
            released,
            retryable: false,
            now_ms: self.now,
        })
    }

    pub fn heartbeat(&mut self, worker: &WorkerId, lease: Option<(TaskId, u32)>) -> Reply {
        let lease = lease.map(|(task_id, attempt)| LeaseRef { task_id, attempt });
        self.ok(Command::Heartbeat {
            worker_id: worker.clone(),
            lease,
            progress: Progress { done: 1, total: 2 },
            now_ms: self.now,
        })
    }

    pub fn expire(&mut self) -> Reply {
        self.ok(Command::ExpireLeases { now_ms: self.now })
    }

    pub fn join(&mut self, worker: &WorkerId, task_id: TaskId, attempt: u32, endpoint: &str) -> Reply {
        self.ok(Command::JoinGang {
            worker_id: worker.clone(),
            task_id,
            attempt,
            endpoint: endpoint.into(),
            now_ms: self.now,
        })
    }

    /// Leases and completes every task of the active sharded stage with one worker.
    pub fn finish_stage(&mut self, worker: &WorkerId) {
        let stage = self.state.current_stage();
        while self.state.current_stage() == stage {
            let (task, attempt) = self.take(worker);
            assert_eq!(self.complete(worker, task, attempt), Reply::Accepted { task_id: task, attempt });
        }
    }

    /// Runs the train gang to completion: R workers (registered here) lease, join, and complete.
    pub fn finish_train(&mut self) {
        let world = self.state.plan().train_ranks;
        let ranks: Vec<WorkerId> = (0..world).map(|r| self.register(&format!("gang-{r}"))).collect();
        let leases = self.gather(&ranks);
        for (worker, (task, attempt, rank)) in ranks.iter().zip(&leases) {
            self.join(worker, *task, *attempt, &format!("10.0.0.{rank}:29500"));
        }
        for (worker, (task, attempt, _)) in ranks.iter().zip(&leases).rev() {
            self.complete(worker, *task, *attempt);
        }
    }

    pub fn phase(&self) -> Option<(u32, Phase)> {
        self.state.current_stage()
    }
}

/// splitmix64: a seeded, dependency-free generator for the property test's schedules.
pub(super) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Recounts every invariant the state keeps incrementally and checks them against a full scan.
pub(super) fn check_invariants(state: &RunState) {
    let plan = &state.plan;
    let mut counts = vec![Counts::default(); plan.stage_count()];
    let mut live_leases = 0;
    for (index, task) in state.tasks.iter().enumerate() {
        let stage = plan.stage_of_task(index);
        let c = &mut counts[stage];
        match &task.state {
            TaskState::Pending => c.pending += 1,
            TaskState::Leased { worker, attempt, deadline_ms } => {
                c.leased += 1;
                live_leases += 1;
                assert_eq!(state.workers[worker].current, Some(Held { task: index, attempt: *attempt }));
                assert!(state.deadlines.contains(&(*deadline_ms, index, 0)));
                assert_eq!(task.attempt, *attempt, "a lease always carries the latest attempt");
            }
            TaskState::Gang { attempt } => {
                c.leased += 1;
                let gang = state.gang.as_ref().expect("a gang task has a gang");
                assert_eq!((gang.task, gang.attempt), (index, *attempt));
                for m in gang.members.iter().filter(|m| !m.finished) {
                    live_leases += 1;
                    assert_eq!(state.workers[&m.worker].current, Some(Held { task: index, attempt: *attempt }));
                    assert!(state.deadlines.contains(&(m.deadline_ms, index, m.rank)));
                }
            }
            TaskState::Done(accepted) => {
                c.done += 1;
                assert!(accepted.attempt <= task.attempt);
                assert!(stage <= state.stage, "nothing past the barrier is done");
            }
            TaskState::Failed { .. } => c.failed += 1,
        }
        if stage > state.stage {
            assert_eq!(task.state, TaskState::Pending, "tasks past the barrier stay untouched");
            assert_eq!(task.attempt, 0);
        }
    }
    assert_eq!(counts, state.stage_counts, "incremental counts drifted from the task table");
    assert_eq!(state.deadlines.len(), live_leases, "deadline index out of step with leases");
    let holders = state.workers.values().filter(|w| w.current.is_some()).count();
    assert_eq!(holders, live_leases, "a worker holds a lease the task table does not know");
    for index in state.queue.iter().chain(&state.retry) {
        assert_eq!(state.tasks[*index].state, TaskState::Pending);
        assert_eq!(plan.stage_of_task(*index), state.stage);
    }
    if state.running() && state.stage < plan.stage_count() && plan.stage(state.stage).1 != Phase::Train {
        let queued = (state.queue.len() + state.retry.len()) as u64;
        assert_eq!(queued, state.stage_counts[state.stage].pending, "pending tasks not all queued");
    }
    for task in &state.tasks {
        assert!(task.failures <= task.faults && task.faults <= 3 * plan.max_attempts);
        let distinct: BTreeSet<_> = task.failed_on.iter().collect();
        assert_eq!(distinct.len(), task.failed_on.len(), "a worker is named twice in failed_on");
    }
    let alive = state.workers.values().filter(|w| w.alive).count();
    assert_eq!(state.liveness.len(), alive);
    assert!(state.recent_errors.len() <= RECENT_ERRORS);
}
