//! Seeded random schedules of commands (leases, completions, stale and duplicate reports, failures,
//! releases, crashes, time jumps, refused commands) with every invariant checked after each step;
//! then well-behaved workers drain the run, and every task must have been accepted exactly once.

use std::collections::BTreeMap;

use super::*;

struct Sim {
    h: Harness,
    rng: Rng,
    workers: Vec<WorkerId>,
    /// What each simulated worker believes it holds.
    holding: Vec<Option<(TaskId, u32)>>,
    /// Every lease ever handed out, for stale reports.
    history: Vec<(WorkerId, TaskId, u32)>,
    /// Accepted replies per task: must end at exactly 1 each.
    accepted: BTreeMap<TaskId, u32>,
    /// Reports that were fenced, so the test can tell the schedule really produced some.
    fenced: u32,
}

impl Sim {
    fn new(seed: u64, plan: Plan, workers: usize) -> Self {
        let mut h = Harness::new(plan);
        let workers: Vec<WorkerId> = (0..workers).map(|i| h.register(&format!("w{i}"))).collect();
        Self {
            holding: vec![None; workers.len()],
            h,
            rng: Rng::new(seed),
            workers,
            history: Vec::new(),
            accepted: BTreeMap::new(),
            fenced: 0,
        }
    }

    fn note(&mut self, reply: &Reply) {
        match reply {
            Reply::Accepted { task_id, .. } => *self.accepted.entry(*task_id).or_default() += 1,
            Reply::Fenced(_) => self.fenced += 1,
            _ => {}
        }
    }

    fn lease(&mut self, i: usize) {
        let worker = self.workers[i].clone();
        let held = match self.h.lease(&worker) {
            Lease::Task { task_id, attempt, .. } | Lease::GangRank { task_id, attempt, .. } => (task_id, attempt),
            _ => return,
        };
        self.holding[i] = Some(held);
        self.history.push((worker, held.0, held.1));
    }

    fn complete(&mut self, i: usize) {
        let Some((task, attempt)) = self.holding[i] else {
            return;
        };
        let reply = self.h.complete(&self.workers[i].clone(), task, attempt);
        self.note(&reply);
        if reply != Reply::Fenced(Fenced::GangNotStarted) {
            self.holding[i] = None;
        }
    }

    fn step(&mut self) {
        let i = self.rng.below(self.workers.len() as u64) as usize;
        let worker = self.workers[i].clone();
        match self.rng.below(100) {
            0..=24 => self.lease(i),
            25..=44 => self.complete(i),
            45..=51 => {
                if let Some((task, attempt)) = self.holding[i].take() {
                    let released = self.rng.below(2) == 0;
                    self.h.fail(&worker, task, attempt, "simulated", released);
                }
            }
            52..=66 => {
                let lease = self.holding[i];
                self.h.heartbeat(&worker, lease);
            }
            67..=72 => {
                // A stale, late or duplicate report of some earlier lease, from whoever held it.
                if !self.history.is_empty() {
                    let (w, task, attempt) = self.history[self.rng.below(self.history.len() as u64) as usize].clone();
                    let reply = self.h.complete(&w, task, attempt);
                    self.note(&reply);
                }
            }
            73..=80 => {
                self.h.advance(self.rng.below(40_000));
                self.h.expire();
            }
            81..=90 => {
                if let Some((task, attempt)) = self.holding[i]
                    && task.phase == Phase::Train
                {
                    self.h.join(&worker, task, attempt, &format!("{worker}-endpoint"));
                }
            }
            91..=95 => {
                let before = self.h.state.clone();
                let ghost = Command::LeaseTask { worker_id: w("ghost"), now_ms: self.h.now + 1 };
                assert_eq!(self.h.apply(ghost).unwrap_err().kind(), "unknown_worker");
                let bad_task = rollout(self.h.state.plan().iterations + 1, 0);
                let bogus = Command::CompleteTask {
                    worker_id: worker.clone(),
                    task_id: bad_task,
                    attempt: 1,
                    output: output(bad_task, 1),
                    now_ms: self.h.now + 1,
                };
                assert_eq!(self.h.apply(bogus).unwrap_err().kind(), "unknown_task");
                assert_eq!(self.h.state, before);
            }
            _ => {
                // A crash: the worker forgets everything; half the time its restart registers again.
                self.holding[i] = None;
                if self.rng.below(2) == 0 {
                    self.h.register(worker.as_str());
                }
            }
        }
    }

    /// Well-behaved workers that ask again after each retry hint (time passes only so: no lease
    /// expires, since nothing ticks): lease, join, complete, until the run ends. Waiting is what lets
    /// lost tasks out of their backoff and quarantined workers back.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.h.state.status() != &RunStatus::Running {
                return;
            }
            let hint = self.h.state.plan().retry_after_ms;
            self.h.advance(hint);
            for i in 0..self.workers.len() {
                self.lease(i);
            }
            for i in 0..self.workers.len() {
                if let Some((task, attempt)) = self.holding[i]
                    && task.phase == Phase::Train
                {
                    let worker = self.workers[i].clone();
                    self.h.join(&worker, task, attempt, "endpoint");
                }
            }
            // In any order: whichever rank 0 is, its completion carries the task; later ranks are fenced.
            for i in (0..self.workers.len()).rev() {
                self.complete(i);
            }
            check_invariants(&self.h.state);
        }
        panic!("the run did not finish: {:?}", self.h.state.snapshot());
    }
}

#[test]
fn random_schedules_accept_every_task_exactly_once() {
    for seed in 0..8 {
        let mut p = plan(3, 7, 3, 2);
        p.max_attempts = 1_000; // failures are injected freely here; the run must still finish
        let mut sim = Sim::new(seed, p, 6);
        for _ in 0..3_000 {
            sim.step();
            check_invariants(&sim.h.state);
        }
        sim.drain();
        let state = &sim.h.state;
        assert_eq!(*state.status(), RunStatus::Finished, "seed {seed}");
        let total = state.plan().total_tasks() as u64;
        assert_eq!(state.snapshot().overall, Counts { pending: 0, leased: 0, done: total, failed: 0 });
        assert_eq!(sim.accepted.len() as u64, total, "seed {seed}: every task accepted");
        assert!(sim.accepted.values().all(|n| *n == 1), "seed {seed}: a task was accepted twice");
        for (t, phase) in (1..=3).flat_map(|t| PHASES.map(|p| (t, p))) {
            let manifest = state.manifest(t, phase).unwrap();
            assert!(manifest.complete);
            assert_eq!(manifest.shards.len() as u32, state.plan().tasks_in(phase));
        }
        let replayed = RunState::replay(state.plan().clone(), sim.h.log.clone()).unwrap();
        assert_eq!(replayed.digest(), state.digest(), "seed {seed}: replay diverged");
        assert_eq!(&replayed, state);
        // The driver logs only what changed something durable: that must rebuild the same run.
        let rebuilt = RunState::replay(state.plan().clone(), sim.h.durable.clone()).unwrap();
        assert_eq!(rebuilt.durable_digest(), state.durable_digest(), "seed {seed}: the durable log diverged");
        assert!(sim.h.durable.len() < sim.h.log.len(), "seed {seed}: nothing was liveness-only");
        assert!(sim.fenced > 0, "seed {seed}: no stale or duplicate report was exercised");
        let releases = (0..state.plan().total_tasks()).filter(|i| state.tasks[*i].attempt > 1).count();
        assert!(releases > 0, "seed {seed}: no task was ever re-leased");
    }
}

#[test]
fn random_schedules_with_few_attempts_fail_cleanly() {
    let mut failed_runs = 0;
    for seed in 100..108 {
        let mut p = plan(2, 5, 2, 2);
        p.max_attempts = 2;
        let mut sim = Sim::new(seed, p, 4);
        for _ in 0..3_000 {
            sim.step();
            check_invariants(&sim.h.state);
        }
        sim.drain();
        let state = &sim.h.state;
        assert!(sim.accepted.values().all(|n| *n == 1), "seed {seed}: a task was accepted twice");
        if let RunStatus::Failed { reason } = state.status() {
            failed_runs += 1;
            let failed: Vec<TaskId> = (0..state.plan().total_tasks())
                .map(|i| state.plan().task_id(i))
                .filter(|id| matches!(state.task(*id).unwrap().state, TaskState::Failed { .. }))
                .collect();
            assert_eq!(failed.len(), 1, "seed {seed}: one failed task stops the run");
            assert!(reason.contains(&failed[0].to_string()), "seed {seed}: {reason}");
            assert_eq!(state.task(failed[0]).unwrap().failures, 2);
        }
    }
    assert!(failed_runs > 0, "the schedule should be harsh enough to fail some runs");
}

/// Reviews A4 and A7: what the driver does with its log, done on disk. A random schedule's durable
/// commands are appended in small batches, the live state is snapshotted every 100 entries, and the
/// segments behind the snapshots are deleted; reopening the folder then rebuilds, from the newest
/// snapshot and the entries after it, the same durable state as a full replay of every command.
#[test]
fn replay_from_a_snapshot_after_compaction_matches_a_full_replay() {
    use crate::driver::log::{CommandLog, FileLog, Recovered};
    for seed in [3, 11] {
        let mut p = plan(3, 7, 3, 2);
        p.max_attempts = 1_000;
        let mut sim = Sim::new(seed, p.clone(), 6);
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open(dir.path(), "sim", &p, "hash").unwrap();
        log.load(&mut |_| Ok(())).unwrap();
        let (mut written, mut snapshot_at) = (0, 0);
        let mut flush = |sim: &Sim, log: &mut FileLog| {
            log.append(&sim.h.durable[written..]).unwrap();
            written = sim.h.durable.len();
            // As the driver does: the live state, right after a durable commit, every so many entries.
            if log.last_index() >= snapshot_at + 100 {
                snapshot_at = log.begin_snapshot(sim.h.state.clone()).unwrap().run().unwrap();
            }
        };
        for step in 0..3_000 {
            sim.step();
            if step % 5 == 4 {
                flush(&sim, &mut log);
            }
        }
        sim.drain();
        flush(&sim, &mut log);
        assert_eq!(*sim.h.state.status(), RunStatus::Finished, "seed {seed}");
        assert_eq!(log.snapshots().unwrap().len(), 2, "seed {seed}: the newest two snapshots are kept");
        let first_segment = log.segments().unwrap()[0].0;
        assert!(first_segment > 100, "seed {seed}: old segments were compacted away, still from {first_segment}");
        drop(log);

        let mut log = FileLog::open(dir.path(), "sim", &p, "hash").unwrap();
        let (mut state, mut replayed) = (RunState::new(p.clone()).unwrap(), 0);
        let loaded = log
            .load(&mut |item| {
                match item {
                    Recovered::Snapshot { state: snapshot, .. } => state = *snapshot,
                    Recovered::Entry { command, .. } => {
                        let _ = state.apply(command);
                        replayed += 1;
                    }
                }
                Ok(())
            })
            .unwrap();
        let durable = sim.h.durable.len() as u64;
        assert_eq!(loaded.last_index, durable, "seed {seed}");
        assert!(loaded.snapshot_index > 0 && replayed == durable - loaded.snapshot_index, "seed {seed}: {loaded:?}");
        let full = RunState::replay(p.clone(), sim.h.durable.clone()).unwrap();
        assert_eq!(state.durable_digest(), full.durable_digest(), "seed {seed}: snapshot + tail vs full replay");
        assert_eq!(state.durable_digest(), sim.h.state.durable_digest(), "seed {seed}: vs the live state");
    }
}
