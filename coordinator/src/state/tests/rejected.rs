//! Rejected outputs (review A8): an accepted output the manifest writer finds missing or wrong re-opens
//! its task as a new attempt and its stage as the active one, counted against the worker that reported
//! it, so a bad object neither stalls the run nor fails it on its own, and one that can never be
//! written still fails it at the attempt limit.

use super::*;

fn reject(h: &mut Harness, task: TaskId, attempt: u32, problem: OutputProblem) -> Result<Applied> {
    h.apply(Command::RejectOutput {
        task_id: task,
        attempt,
        problem,
        detail: format!("object `runs/test/{task}.attempt-{attempt}.jsonl` not found in store memory://"),
        now_ms: h.now,
    })
}

/// A run whose first rollout (two shards) is done by `a`, now in its train phase.
fn past_rollout() -> (Harness, WorkerId) {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    h.finish_stage(&a);
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    (h, a)
}

#[test]
fn a_rejected_output_reopens_its_stage_and_is_leased_again_as_a_new_attempt() {
    let (mut h, a) = past_rollout();
    let b = h.register("b");
    let applied = reject(&mut h, rollout(1, 1), 1, OutputProblem::Missing).unwrap();
    assert_eq!(applied.reply, Reply::Returned { task_id: rollout(1, 1), will_retry: true });
    assert!(
        applied.events.iter().any(|e| matches!(
            e,
            Event::OutputRejected { task, attempt: 1, problem: OutputProblem::Missing, reopened: true, .. }
                if *task == rollout(1, 1)
        )),
        "{:?}",
        applied.events
    );
    assert_eq!(h.phase(), Some((1, Phase::Rollout)), "the rollout is the active stage again");
    let task = h.state.task(rollout(1, 1)).unwrap();
    assert_eq!((task.state.clone(), task.failures, task.failed_on.clone()), (TaskState::Pending, 1, vec![a.clone()]));
    assert!(task.last_error.as_deref().unwrap().contains("not found in store"), "{:?}", task.last_error);
    assert_eq!(h.state.accepted(rollout(1, 0)).unwrap().map(|x| x.attempt), Some(1), "the good shard stays done");
    check_invariants(&h.state);
    // The train task is not leased meanwhile: its input is incomplete again.
    assert!(matches!(h.lease(&a), Lease::RetryAfter { .. }));
    // Another worker than the one whose output went missing takes the new attempt.
    assert_eq!(h.take(&b), (rollout(1, 1), 2));
    assert_eq!(h.complete(&b, rollout(1, 1), 2), Reply::Accepted { task_id: rollout(1, 1), attempt: 2 });
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    assert_eq!(
        h.state.manifest(1, Phase::Rollout).unwrap().shards.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        [1, 2]
    );
    check_invariants(&h.state);
    let replayed = RunState::replay(h.state.plan().clone(), h.durable.clone()).unwrap();
    assert_eq!(replayed.durable_digest(), h.state.durable_digest(), "the log re-opens the same task");
}

#[test]
fn a_rejection_is_refused_once_a_later_stage_has_leased_and_changes_nothing() {
    let (mut h, a) = past_rollout();
    h.take_rank(&a);
    let before = h.state.digest();
    match reject(&mut h, rollout(1, 0), 1, OutputProblem::ChecksumMismatch) {
        Err(Error::CannotReject { message, .. }) => assert!(message.contains("iteration 1 train"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(h.state.digest(), before);
}

#[test]
fn only_the_accepted_attempt_of_a_done_task_can_be_rejected() {
    let (mut h, _) = past_rollout();
    assert!(matches!(reject(&mut h, rollout(1, 0), 2, OutputProblem::Missing), Err(Error::CannotReject { .. })));
    assert!(matches!(reject(&mut h, train(1), 1, OutputProblem::Missing), Err(Error::CannotReject { .. })));
    assert!(matches!(reject(&mut h, rollout(9, 0), 1, OutputProblem::Missing), Err(Error::UnknownTask { .. })));
    assert_eq!(h.phase(), Some((1, Phase::Train)));
}

#[test]
fn an_output_rejected_on_every_worker_fails_the_run_at_the_attempt_limit() {
    // A store that loses every object (a local folder not shared between pods): bounded, not a loop.
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let workers: Vec<WorkerId> = ["a", "b", "c"].iter().map(|id| h.register(id)).collect();
    for (i, worker) in workers.iter().enumerate() {
        let (task, attempt) = h.take(worker);
        assert_eq!((task, attempt), (rollout(1, 0), i as u32 + 1));
        h.complete(worker, task, attempt);
        let will_retry = i < 2;
        assert_eq!(
            reject(&mut h, task, attempt, OutputProblem::Missing).unwrap().reply,
            Reply::Returned { task_id: task, will_retry }
        );
    }
    let RunStatus::Failed { reason } = h.state.status() else { panic!("{:?}", h.state.status()) };
    assert!(reason.contains("iter-1/rollout/0") && reason.contains("was rejected"), "{reason}");
    check_invariants(&h.state);
}

#[test]
fn a_finished_run_whose_last_output_is_rejected_runs_again_until_it_is_redone() {
    let mut h = Harness::new(plan(1, 1, 2, 1));
    let a = h.register("a");
    h.finish_stage(&a);
    h.finish_train();
    h.finish_stage(&a);
    assert_eq!(h.state.status(), &RunStatus::Finished);
    reject(&mut h, eval(1, 1), 1, OutputProblem::Malformed).unwrap();
    assert_eq!(h.state.status(), &RunStatus::Running);
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    let b = h.register("b");
    assert_eq!(h.take(&b), (eval(1, 1), 2));
    h.complete(&b, eval(1, 1), 2);
    assert_eq!(h.state.status(), &RunStatus::Finished);
    check_invariants(&h.state);
}

#[test]
fn a_rejected_train_output_forms_a_new_gang() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    h.finish_stage(&a);
    h.finish_train();
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    reject(&mut h, train(1), 1, OutputProblem::ChecksumMismatch).unwrap();
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    let (task, attempt, rank) = h.take_rank(&a);
    assert_eq!((task, attempt, rank), (train(1), 2, 0));
    h.join(&a, task, attempt, "rank-0-of-1");
    assert_eq!(h.complete(&a, task, attempt), Reply::Accepted { task_id: task, attempt });
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    check_invariants(&h.state);
}
