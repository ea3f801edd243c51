//! Phase barriers: rollout(t) → train(t) → eval(t) → rollout(t+1), each waiting for every task of the
//! one before.

use super::*;

#[test]
fn train_waits_for_every_rollout_shard() {
    let mut h = Harness::new(plan(2, 3, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (t0, a0) = h.take(&a);
    h.complete(&a, t0, a0);
    let (t1, a1) = h.take(&a);
    h.complete(&a, t1, a1);
    let (straggler, attempt) = h.take(&b);
    // Every shard is leased or done, so the next worker waits at the barrier instead of training early.
    assert!(matches!(h.lease(&a), Lease::RetryAfter { reason: WaitReason::PhaseBarrier, .. }));
    assert_eq!(h.phase(), Some((1, Phase::Rollout)));
    assert_eq!(h.state.task(train(1)).unwrap().state, TaskState::Pending);
    h.complete(&b, straggler, attempt);
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    let (task, _, rank) = h.take_rank(&a);
    assert_eq!((task, rank), (train(1), 0));
    check_invariants(&h.state);
}

#[test]
fn eval_waits_for_train_and_next_rollout_waits_for_eval() {
    let mut h = Harness::new(plan(2, 1, 2, 1));
    let a = h.register("a");
    let b = h.register("b");
    h.finish_stage(&a);
    let (task, attempt, _) = h.take_rank(&a);
    // The gang is full (R = 1): nobody else gets work until training is done.
    assert!(matches!(h.lease(&b), Lease::RetryAfter { reason: WaitReason::GangFull, .. }));
    h.join(&a, task, attempt, "rank0");
    h.complete(&a, task, attempt);
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    let (e0, ea0) = h.take(&a);
    let (e1, ea1) = h.take(&b);
    assert_eq!((e0.phase, e1.phase), (Phase::Eval, Phase::Eval));
    let c = h.register("c");
    assert!(matches!(h.lease(&c), Lease::RetryAfter { reason: WaitReason::PhaseBarrier, .. }));
    h.complete(&a, e0, ea0);
    assert_eq!(h.phase(), Some((1, Phase::Eval)), "iteration 2 waits for the last eval shard");
    h.complete(&b, e1, ea1);
    assert_eq!(h.phase(), Some((2, Phase::Rollout)));
    assert_eq!(h.take(&c), (rollout(2, 0), 1));
}

#[test]
fn an_empty_eval_phase_is_skipped() {
    let mut h = Harness::new(plan(2, 1, 0, 1));
    let a = h.register("a");
    h.finish_stage(&a);
    let (task, attempt, _) = h.take_rank(&a);
    h.join(&a, task, attempt, "rank0");
    let events = h
        .apply(Command::CompleteTask {
            worker_id: a.clone(),
            task_id: task,
            attempt,
            output: output(task, attempt),
            now_ms: 0,
        })
        .unwrap()
        .events;
    assert_eq!(h.phase(), Some((2, Phase::Rollout)));
    assert!(events.contains(&Event::PhaseStarted { iteration: 2, phase: Phase::Rollout }));
    assert!(h.state.manifest(1, Phase::Eval).unwrap().complete);
}

#[test]
fn completions_from_the_past_stage_cannot_open_a_later_one() {
    // A shard of iteration 1 that somehow reports after iteration 2 started is fenced as done.
    let mut h = Harness::new(plan(2, 1, 1, 1));
    let a = h.register("a");
    let (t, at) = h.take(&a);
    h.complete(&a, t, at);
    h.finish_train();
    h.finish_stage(&a);
    assert_eq!(h.phase(), Some((2, Phase::Rollout)));
    assert_eq!(h.complete(&a, t, at), Reply::Fenced(Fenced::AlreadyDone { accepted_attempt: 1 }));
    assert_eq!(h.phase(), Some((2, Phase::Rollout)));
}
