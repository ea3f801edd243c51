//! The happy path: a run goes through T iterations of rollout → train → eval and finishes, with every
//! shard accepted once and its output queryable.

use super::*;

#[test]
fn happy_path_runs_t_iterations_in_phase_order() {
    let mut h = Harness::new(plan(3, 4, 2, 2));
    let a = h.register("a");
    let mut phases = Vec::new();
    while let Some(stage) = h.phase() {
        phases.push(stage);
        if stage.1 == Phase::Train {
            h.finish_train();
        } else {
            h.finish_stage(&a);
        }
        check_invariants(&h.state);
    }
    let expected: Vec<(u32, Phase)> = (1..=3).flat_map(|t| PHASES.map(|p| (t, p))).collect();
    assert_eq!(phases, expected);
    assert_eq!(*h.state.status(), RunStatus::Finished);
    assert_eq!(h.lease(&a), Lease::RunFinished);
    let snap = h.state.snapshot();
    assert_eq!(snap.overall, Counts { pending: 0, leased: 0, done: 3 * (4 + 1 + 2), failed: 0 });
    assert_eq!(snap.phase, None);
}

#[test]
fn each_shard_is_leased_once_with_attempt_one() {
    let mut h = Harness::new(plan(1, 5, 1, 1));
    let workers: Vec<WorkerId> = (0..5).map(|i| h.register(&format!("w{i}"))).collect();
    let mut leased: Vec<(TaskId, u32)> = workers.iter().map(|w| h.take(w)).collect();
    leased.sort();
    let expected: Vec<(TaskId, u32)> = (0..5).map(|s| (rollout(1, s), 1)).collect();
    assert_eq!(leased, expected);
    let extra = h.register("extra");
    assert!(matches!(h.lease(&extra), Lease::RetryAfter { reason: WaitReason::PhaseBarrier, .. }));
}

#[test]
fn accepted_outputs_form_the_stage_manifest() {
    let mut h = Harness::new(plan(1, 3, 1, 1));
    let a = h.register("a");
    let (t0, a0) = h.take(&a);
    h.complete(&a, t0, a0);
    let partial = h.state.manifest(1, Phase::Rollout).unwrap();
    assert!(!partial.complete);
    assert_eq!(partial.shards.len(), 1);
    h.finish_stage(&a);
    let manifest = h.state.manifest(1, Phase::Rollout).unwrap();
    assert!(manifest.complete);
    assert_eq!(manifest.shards.iter().map(|s| s.shard).collect::<Vec<_>>(), [0, 1, 2]);
    for s in &manifest.shards {
        let expected = output(rollout(1, s.shard), s.attempt);
        assert_eq!((&s.key, &s.sha256, s.records, s.tokens), (&expected.key, &expected.sha256, 8, 400));
    }
    let accepted = h.state.accepted(rollout(1, 2)).unwrap().unwrap();
    assert_eq!(accepted.output, output(rollout(1, 2), 1));
    assert_eq!(h.state.accepted(eval(1, 0)).unwrap(), None);
    assert_eq!(h.state.manifest(2, Phase::Rollout).unwrap_err().kind(), "unknown_task");
}

#[test]
fn events_report_leases_completions_and_phase_changes() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    let applied = h
        .apply(Command::CompleteTask {
            worker_id: a.clone(),
            task_id: task,
            attempt,
            output: output(task, attempt),
            now_ms: 5,
        })
        .unwrap();
    assert_eq!(
        applied.events,
        [
            Event::TaskDone { task, attempt, worker: a.clone() },
            Event::PhaseStarted { iteration: 1, phase: Phase::Train }
        ]
    );
}

#[test]
fn plan_from_the_default_config() {
    let config = iro_common::RunConfig::default();
    let p = Plan::from_config(&config).unwrap();
    assert_eq!((p.iterations, p.rollout_shards, p.eval_shards, p.train_ranks), (3, 128, 5, 1));
    assert_eq!(
        (p.max_attempts, p.lease_ms, p.heartbeat_interval_ms, p.worker_timeout_ms),
        (3, 120_000, 10_000, 30_000)
    );
    assert_eq!(p.total_tasks(), 3 * 134);
    for index in 0..p.total_tasks() {
        assert_eq!(p.index(p.task_id(index)).unwrap(), index, "task index arithmetic round-trips");
    }
}

#[test]
fn invalid_plan_is_refused() {
    let mut p = plan(1, 1, 1, 0);
    assert_eq!(RunState::new(p.clone()).unwrap_err().kind(), "invalid_plan");
    p.train_ranks = 1;
    p.max_attempts = 0;
    let err = RunState::new(p).unwrap_err();
    assert!(err.to_string().contains("max_attempts"), "{err}");
}

#[test]
fn task_ids_round_trip_through_text() {
    for id in [rollout(1, 0), train(3), eval(2, 17)] {
        assert_eq!(id.to_string().parse::<TaskId>().unwrap(), id);
    }
    assert_eq!(rollout(2, 7).to_string(), "iter-2/rollout/7");
    for bad in ["", "iter-1/rollout", "iter-x/rollout/1", "iter-1/dance/1", "iter-1/eval/-1", "1/eval/1/2"] {
        assert_eq!(bad.parse::<TaskId>().unwrap_err().kind(), "invalid_task_id", "{bad}");
    }
}

#[test]
fn a_hundred_thousand_tasks_over_a_thousand_workers() {
    // Not a benchmark (that lives with the driver); it checks leasing stays cheap at the scale.
    let mut state = RunState::new(plan(1, 100_000, 0, 1)).unwrap();
    let workers: Vec<WorkerId> = (0..1000).map(|i| WorkerId::new(format!("w{i}"))).collect();
    for (i, worker) in workers.iter().enumerate() {
        let command = Command::RegisterWorker {
            worker_id: worker.clone(),
            name: worker.to_string(),
            resources: Resources::default(),
            now_ms: i as u64,
            session: String::new(),
        };
        state.apply(command).unwrap();
    }
    let mut now = 1000;
    let mut done = 0;
    while done < 100_000 {
        for worker in &workers {
            now += 1;
            let Reply::Lease(Lease::Task { task_id, attempt, .. }) =
                state.apply(Command::LeaseTask { worker_id: worker.clone(), now_ms: now }).unwrap().reply
            else {
                continue;
            };
            let output = output(task_id, attempt);
            let reply = state
                .apply(Command::CompleteTask { worker_id: worker.clone(), task_id, attempt, output, now_ms: now })
                .unwrap()
                .reply;
            assert!(matches!(reply, Reply::Accepted { .. }));
            done += 1;
        }
    }
    assert_eq!(state.current_stage(), Some((1, Phase::Train)));
    assert_eq!(state.snapshot().overall.done, 100_000);
}
