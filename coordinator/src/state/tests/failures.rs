//! Failure accounting (review A2): what counts against a task and a worker, the backoff, the
//! preference for another worker, and quarantine. One bad worker, a store outage or a short cluster
//! must not fail the run; a task that fails everywhere still must.

use super::*;

fn fail_retryable(h: &mut Harness, worker: &WorkerId, task: TaskId, attempt: u32) -> Reply {
    h.ok(Command::FailTask {
        worker_id: worker.clone(),
        task_id: task,
        attempt,
        error: "store s3://b unreachable during put of `k`: connection refused".into(),
        released: false,
        retryable: true,
        now_ms: h.now,
    })
}

#[test]
fn one_bad_worker_cannot_fail_the_run_while_others_can_take_its_tasks() {
    let mut h = Harness::new(plan(1, 4, 1, 1));
    let good = h.register("good");
    let bad = h.register("bad");
    let (held, held_attempt) = h.take(&good);
    // The bad worker fails every task it takes, as fast as it can: a repeat of one task counts once
    // while `good` could take it, and after three failures in a row it is quarantined.
    let mut failed = BTreeSet::new();
    for _ in 0..6 {
        match h.lease(&bad) {
            Lease::Task { task_id, attempt, .. } => {
                assert_eq!(
                    h.fail(&bad, task_id, attempt, "CUDA error: an illegal memory access", false),
                    Reply::Returned { task_id, will_retry: true }
                );
                failed.insert(task_id);
            }
            Lease::RetryAfter { reason, .. } => {
                assert!(matches!(reason, WaitReason::Backoff | WaitReason::Quarantined))
            }
            other => panic!("{other:?}"),
        }
        h.wait_backoff(0);
    }
    assert_eq!(h.state.status(), &RunStatus::Running);
    let view = h.state.snapshot().workers.into_iter().find(|w| w.id == bad).unwrap();
    assert!(view.quarantined_until_ms.is_some_and(|until| until > h.now), "{view:?}");
    assert!(matches!(h.lease(&bad), Lease::RetryAfter { reason: WaitReason::Quarantined, .. }));
    for task in &failed {
        let t = h.state.task(*task).unwrap();
        assert_eq!((t.failures, t.failed_on.clone()), (1, vec![bad.clone()]), "{task}");
    }
    // The good worker finishes everything, the bad worker's tasks included.
    h.complete(&good, held, held_attempt);
    h.finish_stage(&good);
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    check_invariants(&h.state);
}

#[test]
fn a_lost_task_waits_for_an_idle_worker_that_has_not_failed_it() {
    let mut h = Harness::new(plan(1, 3, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (task, attempt) = h.take(&a);
    h.fail(&a, task, attempt, "boom", false);
    h.wait_backoff(0);
    // `b` is idle and has not failed it: `a` gets a fresh shard instead, and `b` the lost one.
    let (fresh, _) = h.take(&a);
    assert_ne!(fresh, task);
    assert_eq!(h.take(&b), (task, attempt + 1));
    check_invariants(&h.state);
}

#[test]
fn a_lost_task_goes_back_to_its_failed_worker_when_nobody_else_takes_it_within_a_worker_timeout() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let _silent = h.register("silent");
    let (task, attempt) = h.take(&a);
    h.fail(&a, task, attempt, "boom", false);
    h.wait_backoff(0);
    assert!(matches!(h.lease(&a), Lease::RetryAfter { reason: WaitReason::Backoff, .. }));
    h.advance(h.state.plan().worker_timeout_ms);
    assert_eq!(h.take(&a), (task, attempt + 1));
}

#[test]
fn a_task_that_fails_on_max_attempts_distinct_workers_fails_the_run() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let workers: Vec<WorkerId> = (0..3).map(|i| h.register(&format!("w{i}"))).collect();
    for (round, worker) in workers.iter().enumerate() {
        h.wait_backoff(0);
        let (task, attempt) = h.take(worker);
        let reply = h.fail(worker, task, attempt, &format!("poison #{round}"), false);
        assert_eq!(reply, Reply::Returned { task_id: task, will_retry: round < 2 });
    }
    let RunStatus::Failed { reason } = h.state.status() else { panic!("{:?}", h.state.status()) };
    assert!(reason.contains("iter-1/rollout/0") && reason.contains("poison #2"), "{reason}");
    assert_eq!(h.state.task(rollout(1, 0)).unwrap().failed_on, workers);
}

#[test]
fn a_poison_task_fails_the_run_on_a_single_worker_which_is_never_quarantined() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    for round in 1..=3 {
        h.wait_backoff(0);
        let (task, attempt) = h.take(&a);
        assert_eq!(
            h.fail(&a, task, attempt, "bad config", false),
            Reply::Returned { task_id: task, will_retry: round < 3 }
        );
    }
    assert!(matches!(h.state.status(), RunStatus::Failed { .. }));
    assert_eq!(h.state.worker(&a).unwrap().quarantined_until_ms, 0, "the last healthy worker is not quarantined");
}

#[test]
fn a_poison_task_fails_even_when_the_workers_that_have_not_failed_it_are_gone() {
    let mut p = plan(1, 1, 1, 1);
    p.quarantine_after = 0;
    let mut h = Harness::new(p);
    let a = h.register("a");
    let _gone = h.register("gone");
    let mut rounds = 0;
    while h.state.status() == &RunStatus::Running {
        h.wait_backoff(0);
        h.advance(h.state.plan().worker_timeout_ms);
        let (task, attempt) = h.take(&a);
        h.fail(&a, task, attempt, "bad shard", false);
        rounds += 1;
        assert!(rounds <= 9, "the faults cap did not stop the loop");
    }
    let task = h.state.task(rollout(1, 0)).unwrap();
    assert_eq!((rounds, task.failures, task.faults), (9, 1, 9));
}

#[test]
fn a_store_outage_longer_than_the_retry_window_does_not_fail_the_run() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let mut backoffs = Vec::new();
    // Twenty retryable failures (minutes of outage at the capped backoff) with max_attempts 3.
    for _ in 0..20 {
        h.wait_backoff(0);
        let (task, attempt) = h.take(&a);
        assert_eq!(fail_retryable(&mut h, &a, task, attempt), Reply::Returned { task_id: task, will_retry: true });
        backoffs.push(h.state.task(task).unwrap().not_before_ms - h.now);
    }
    assert_eq!(&backoffs[..4], [1_000, 2_000, 4_000, 8_000]);
    assert_eq!(*backoffs.last().unwrap(), h.state.plan().retry_backoff_max_ms);
    let task = h.state.task(rollout(1, 0)).unwrap();
    assert_eq!((task.failures, task.faults, task.failed_on.len()), (0, 0, 0));
    assert_eq!(h.state.snapshot().recent_errors.last().unwrap().cause, LossCause::Infrastructure);
    assert_eq!(h.state.worker(&a).unwrap().consecutive_failures, 0);
    // The store is back: the task completes and the run goes on.
    h.wait_backoff(0);
    let (task, attempt) = h.take(&a);
    assert_eq!(h.complete(&a, task, attempt), Reply::Accepted { task_id: task, attempt });
    assert_eq!(h.phase(), Some((1, Phase::Train)));
}

#[test]
fn a_quarantined_worker_is_back_after_its_quarantine_and_one_more_failure_sends_it_back() {
    let mut h = Harness::new(plan(1, 8, 1, 1));
    let bad = h.register("bad");
    let _other = h.register("other");
    for _ in 0..3 {
        h.wait_backoff(0);
        h.advance(h.state.plan().worker_timeout_ms);
        let (task, attempt) = h.take(&bad);
        h.fail(&bad, task, attempt, "boom", false);
    }
    let until = h.state.worker(&bad).unwrap().quarantined_until_ms;
    assert_eq!(until, h.now + h.state.plan().quarantine_ms);
    h.now = until;
    let (task, attempt) = h.take(&bad);
    h.fail(&bad, task, attempt, "boom", false);
    assert!(h.state.worker(&bad).unwrap().quarantined_until_ms > h.now, "probation: one failure re-quarantines");
    // A completion clears the streak.
    h.now = h.state.worker(&bad).unwrap().quarantined_until_ms;
    let (task, attempt) = h.take(&bad);
    h.complete(&bad, task, attempt);
    assert_eq!(h.state.worker(&bad).unwrap().consecutive_failures, 0);
}
