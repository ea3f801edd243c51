//! Attempts, leases and failures: expiry re-leases with attempt+1, stale and duplicate reports are
//! fenced without changing anything, failures count toward max_attempts, releases do not.

use super::*;

/// Everything about tasks and the run, leaving out worker liveness (which any command refreshes).
fn task_state(h: &Harness) -> (Vec<Task>, Vec<Counts>, RunStatus, usize) {
    (h.state.tasks.clone(), h.state.stage_counts.clone(), h.state.status.clone(), h.state.stage)
}

#[test]
fn lease_expiry_releases_the_task_with_attempt_plus_one() {
    let mut p = plan(1, 1, 1, 1);
    p.worker_timeout_ms = u64::MAX / 4; // only the lease can run out here
    let mut h = Harness::new(p);
    let a = h.register("a");
    let b = h.register("b");
    let (task, attempt) = h.take(&a);
    assert_eq!(attempt, 1);
    h.now = 120_000 - 1;
    assert_eq!(
        h.expire(),
        Reply::Expired { requeued: vec![], failed: vec![], dead_workers: vec![], removed_workers: vec![] }
    );
    h.now = 120_000;
    assert_eq!(
        h.expire(),
        Reply::Expired { requeued: vec![task], failed: vec![], dead_workers: vec![], removed_workers: vec![] }
    );
    assert_eq!(h.state.task(task).unwrap().state, TaskState::Pending);
    assert_eq!(h.state.worker(&a).unwrap().current, None);
    assert_eq!(h.take(&b), (task, 2));
    check_invariants(&h.state);
}

#[test]
fn a_lease_without_heartbeats_expires_even_if_the_worker_lives() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    // a heartbeats for liveness but never names its task: the lease is not renewed.
    for _ in 0..12 {
        h.advance(10_000);
        h.heartbeat(&a, None);
        h.expire();
    }
    assert_eq!(h.state.task(task).unwrap().state, TaskState::Pending);
    let t = h.state.task(task).unwrap();
    assert_eq!((t.attempt, t.failures), (1, 1));
    assert!(t.last_error.as_deref().unwrap().contains("expired"), "{:?}", t.last_error);
    assert_eq!(h.take(&a), (task, attempt + 1));
}

#[test]
fn heartbeats_extend_the_lease() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    for _ in 0..30 {
        h.advance(10_000);
        let reply = h.heartbeat(&a, Some((task, attempt)));
        assert_eq!(reply, Reply::LeaseExtended { deadline_ms: h.now + 120_000 });
        h.expire();
    }
    assert!(matches!(h.state.task(task).unwrap().state, TaskState::Leased { .. }));
    assert_eq!(h.state.snapshot().workers[0].progress, Progress { done: 1, total: 2 });
    assert_eq!(h.complete(&a, task, attempt), Reply::Accepted { task_id: task, attempt });
}

#[test]
fn late_completion_of_the_old_attempt_is_ignored() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let slow = h.register("slow");
    let fast = h.register("fast");
    let (task, old) = h.take(&slow);
    h.fail(&slow, task, old, "stalled", true);
    let (_, new) = h.take(&fast);
    assert_eq!(new, old + 1);
    let before = task_state(&h);
    assert_eq!(h.complete(&slow, task, old), Reply::Fenced(Fenced::StaleAttempt { current_attempt: new }));
    assert_eq!(task_state(&h), before, "a fenced completion changes no task");
    assert_eq!(h.complete(&fast, task, new), Reply::Accepted { task_id: task, attempt: new });
    assert_eq!(h.state.accepted(task).unwrap().unwrap().output.key, output(task, new).key);
    // ...and after acceptance the old attempt still cannot replace it.
    assert_eq!(h.complete(&slow, task, old), Reply::Fenced(Fenced::AlreadyDone { accepted_attempt: new }));
}

#[test]
fn a_completion_racing_the_expiry_tick_is_accepted() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    h.now = 500_000; // long past the deadline, but no ExpireLeases has run
    assert_eq!(h.complete(&a, task, attempt), Reply::Accepted { task_id: task, attempt });
}

#[test]
fn duplicate_completion_is_ignored_and_counted_once() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    assert_eq!(h.complete(&a, task, attempt), Reply::Accepted { task_id: task, attempt });
    let before = task_state(&h);
    let dup = h.apply(Command::CompleteTask {
        worker_id: a.clone(),
        task_id: task,
        attempt,
        output: Output { key: "other".into(), sha256: "x".into(), records: 99, tokens: 99 },
        now_ms: 0,
    });
    let applied = dup.unwrap();
    assert_eq!(applied.reply, Reply::Fenced(Fenced::AlreadyDone { accepted_attempt: attempt }));
    assert!(applied.events.is_empty());
    assert_eq!(task_state(&h), before);
    assert_eq!(h.state.snapshot().overall.done, 1);
    assert_eq!(h.state.worker(&a).unwrap().completed, 1);
}

#[test]
fn a_worker_that_is_not_the_holder_is_fenced() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (task, attempt) = h.take(&a);
    let before = task_state(&h);
    assert_eq!(h.complete(&b, task, attempt), Reply::Fenced(Fenced::NotHolder));
    assert_eq!(h.fail(&b, task, attempt, "not mine", false), Reply::Fenced(Fenced::NotHolder));
    assert_eq!(h.heartbeat(&b, Some((task, attempt))), Reply::Fenced(Fenced::NotHolder));
    assert_eq!(task_state(&h), before);
}

#[test]
fn a_heartbeat_for_a_lost_lease_tells_the_worker_to_stop() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (task, attempt) = h.take(&a);
    h.now = 200_000;
    h.heartbeat(&b, None);
    h.expire();
    h.take(&b);
    assert_eq!(h.heartbeat(&a, Some((task, attempt))), Reply::Fenced(Fenced::StaleAttempt { current_attempt: 2 }));
}

#[test]
fn fail_task_requeues_and_counts_a_failure() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    assert_eq!(h.fail(&a, task, attempt, "CUDA OOM", false), Reply::Returned { task_id: task, will_retry: true });
    let t = h.state.task(task).unwrap();
    assert_eq!((t.state.clone(), t.failures), (TaskState::Pending, 1));
    assert!(t.last_error.as_deref().unwrap().contains("CUDA OOM"));
    // Within its backoff (one retry hint) the other shard goes first; then the failed one is first in line
    // again (the barrier is waiting for it), to `a` too: no other worker could take it.
    assert_eq!(h.state.task(task).unwrap().not_before_ms, 1_000);
    let (other, other_attempt) = h.take(&a);
    assert_eq!(other, rollout(1, 1));
    h.complete(&a, other, other_attempt);
    assert!(matches!(h.lease(&a), Lease::RetryAfter { reason: WaitReason::Backoff, .. }));
    h.advance(1_000);
    assert_eq!(h.take(&a), (task, attempt + 1));
    let snap = h.state.snapshot();
    assert_eq!(snap.recent_errors.len(), 1);
    assert_eq!(snap.recent_errors[0].cause, LossCause::Failed);
    assert_eq!(snap.workers[0].failures, 1);
}

#[test]
fn a_released_lease_goes_back_to_pending_without_counting_a_failure() {
    let mut p = plan(1, 1, 1, 1);
    p.max_attempts = 1;
    let mut h = Harness::new(p);
    let a = h.register("a");
    // Released many times (SIGTERM, preemption) and still not failed, even with max_attempts = 1.
    for expected_attempt in 1..=5 {
        let (task, attempt) = h.take(&a);
        assert_eq!(attempt, expected_attempt, "each lease is a new attempt with its own object key");
        assert_eq!(h.fail(&a, task, attempt, "SIGTERM", true), Reply::Returned { task_id: task, will_retry: true });
        let t = h.state.task(task).unwrap();
        assert_eq!((t.failures, t.last_error.clone()), (0, None));
    }
    assert_eq!(*h.state.status(), RunStatus::Running);
    assert!(h.state.snapshot().recent_errors.is_empty());
}

#[test]
fn max_attempts_fails_the_run_naming_the_task_and_last_error() {
    let mut h = Harness::new(plan(2, 3, 1, 1));
    let a = h.register("a");
    let mut poison = None;
    for round in 1..=3 {
        h.wait_backoff(0);
        let (task, attempt) = h.take(&a);
        if let Some(p) = poison {
            assert_eq!(task, p, "the failed task is retried first");
        }
        poison = Some(task);
        let reply = h.fail(&a, task, attempt, &format!("tokenizer exploded #{round}"), false);
        assert_eq!(reply, Reply::Returned { task_id: task, will_retry: round < 3 });
    }
    let task = poison.unwrap();
    let RunStatus::Failed { reason } = h.state.status().clone() else { panic!("run should have failed") };
    assert!(reason.contains(&task.to_string()), "{reason}");
    assert!(reason.contains("tokenizer exploded #3"), "{reason}");
    assert!(matches!(h.state.task(task).unwrap().state, TaskState::Failed { .. }));
    assert_eq!(h.lease(&a), Lease::RunFailed { reason: reason.clone() });
    assert_eq!(h.state.snapshot().overall.failed, 1);
    // Nothing more is accepted once the run failed.
    let b = h.register("b");
    assert_eq!(h.heartbeat(&b, Some((rollout(1, 1), 1))), Reply::Fenced(Fenced::RunOver));
    check_invariants(&h.state);
}

#[test]
fn lost_leases_count_toward_max_attempts() {
    let mut p = plan(1, 1, 1, 1);
    p.max_attempts = 2;
    let mut h = Harness::new(p);
    for i in 0..2 {
        let worker = h.register(&format!("w{i}"));
        h.take(&worker);
        h.advance(1_000_000);
        h.expire();
    }
    let RunStatus::Failed { reason } = h.state.status() else { panic!("{:?}", h.state.status()) };
    assert!(reason.contains("iter-1/rollout/0") && reason.contains("stopped heartbeating"), "{reason}");
}

#[test]
fn time_never_runs_backwards() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    h.now = 50_000;
    let (task, attempt) = h.take(&a);
    // A command stamped earlier (a clock step on a new leader) cannot shorten the lease.
    h.now = 10;
    assert_eq!(h.heartbeat(&a, Some((task, attempt))), Reply::LeaseExtended { deadline_ms: 50_000 + 120_000 });
    assert_eq!(h.state.now_ms(), 50_000);
}

#[test]
fn next_deadline_tells_the_driver_when_to_tick() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    assert_eq!(h.state.next_deadline_ms(), None);
    let a = h.register("a");
    assert_eq!(h.state.next_deadline_ms(), Some(30_000));
    h.take(&a);
    h.advance(20_000);
    h.heartbeat(&a, None);
    assert_eq!(h.state.next_deadline_ms(), Some(50_000));
    h.advance(200_000);
    h.heartbeat(&a, None);
    assert_eq!(h.state.next_deadline_ms(), Some(120_000), "the lease deadline is now the earliest");
}
