//! Gang scheduling of the train task: R ranks gather, get rank/world and every rank's endpoint, and
//! lose everything together when one of them is lost.

use super::*;

/// A run whose rollout is done, in its train phase, with `world` ranks expected.
fn at_train(world: u32) -> Harness {
    let mut h = Harness::new(plan(2, 1, 1, world));
    let r = h.register("rollout");
    h.finish_stage(&r);
    assert_eq!(h.phase(), Some((1, Phase::Train)));
    h
}

fn ranks(h: &mut Harness, n: u32) -> Vec<(WorkerId, TaskId, u32, u32)> {
    (0..n)
        .map(|i| {
            let worker = h.register(&format!("r{i}"));
            let (task, attempt, rank) = h.take_rank(&worker);
            (worker, task, attempt, rank)
        })
        .collect()
}

#[test]
fn the_gang_waits_for_all_r_ranks_before_starting() {
    let mut h = at_train(3);
    let members = ranks(&mut h, 3);
    assert_eq!(members.iter().map(|m| m.3).collect::<Vec<_>>(), [0, 1, 2], "ranks in lease order");
    assert!(members.iter().all(|m| (m.1, m.2) == (train(1), 1)));
    let (w0, task, attempt, _) = &members[0];
    assert_eq!(
        h.join(w0, *task, *attempt, "nccl-id"),
        Reply::GangWaiting { joined: 1, world: 3, retry_after_ms: 1_000 }
    );
    let (w1, ..) = &members[1];
    assert_eq!(
        h.join(w1, *task, *attempt, "10.0.0.1:1"),
        Reply::GangWaiting { joined: 2, world: 3, retry_after_ms: 1_000 }
    );
    assert!(!h.state.gang().unwrap().started);
    let (w2, ..) = &members[2];
    let endpoints = vec!["nccl-id".to_string(), "10.0.0.1:1".into(), "10.0.0.2:2".into()];
    let applied = h
        .apply(Command::JoinGang {
            worker_id: w2.clone(),
            task_id: *task,
            attempt: *attempt,
            endpoint: "10.0.0.2:2".into(),
            now_ms: h.now,
        })
        .unwrap();
    assert_eq!(applied.reply, Reply::GangReady { rank: 2, world: 3, endpoints: endpoints.clone() });
    assert_eq!(applied.events, [Event::GangStarted { task: train(1), attempt: 1, world: 3 }]);
    // Earlier ranks polling again now get their own rank and the same endpoints.
    assert_eq!(h.join(w0, *task, *attempt, "ignored"), Reply::GangReady { rank: 0, world: 3, endpoints });
    check_invariants(&h.state);
}

#[test]
fn a_worker_beyond_r_ranks_is_told_the_gang_is_full() {
    let mut h = at_train(2);
    ranks(&mut h, 2);
    let extra = h.register("extra");
    assert!(matches!(h.lease(&extra), Lease::RetryAfter { reason: WaitReason::GangFull, .. }));
    assert_eq!(h.state.snapshot().gang.unwrap().ranks.len(), 2);
}

#[test]
fn a_gang_that_does_not_gather_in_time_is_retried_without_counting_a_failure() {
    let mut h = at_train(4);
    let members = ranks(&mut h, 2);
    let workers: Vec<WorkerId> = members.iter().map(|m| m.0.clone()).collect();
    let mut attempt = 1;
    for worker in &workers {
        h.join(worker, train(1), attempt, "addr");
    }
    let mut aborts = Vec::new();
    // Five timeouts, more than max_attempts (3): a short cluster is not the task's fault (review A2).
    for _ in 0..5 {
        // The two ranks keep their leases alive, so only the join timeout can end the gang.
        h.advance(60_000);
        for worker in &workers {
            h.heartbeat(worker, Some((train(1), attempt)));
        }
        h.advance(60_000);
        for worker in &workers {
            h.heartbeat(worker, None);
        }
        let applied = h.apply(Command::ExpireLeases { now_ms: h.now }).unwrap();
        aborts.extend(applied.events.into_iter().filter(|e| matches!(e, Event::GangAborted { .. })));
        assert_eq!(h.state.status(), &RunStatus::Running);
        // The same two workers form the next attempt's gang (after the backoff), and it times out the same way.
        for worker in &workers {
            let (_, next, _) = h.take_rank(worker);
            assert!(next > attempt);
            h.join(worker, train(1), next, "addr");
        }
        attempt += 1;
    }
    assert_eq!(aborts.len(), 5);
    let Event::GangAborted { cause, message, .. } = &aborts[0] else { unreachable!() };
    assert_eq!(*cause, LossCause::GangJoinTimeout);
    assert!(message.contains("only 2 of 4 ranks joined"), "{message}");
    let task = h.state.task(train(1)).unwrap();
    assert_eq!((task.failures, task.faults), (0, 0));
    assert!(task.last_error.as_deref().unwrap().contains("only 2 of 4 ranks joined"));
    // Two more workers come: the gang fills, starts and finishes.
    let late: Vec<WorkerId> = (0..2).map(|i| h.register(&format!("late{i}"))).collect();
    for worker in &late {
        let (_, a, _) = h.take_rank(worker);
        assert_eq!(a, attempt);
        h.join(worker, train(1), a, "addr");
    }
    let everyone: Vec<WorkerId> = workers.iter().chain(&late).cloned().collect();
    for worker in everyone.iter().rev() {
        h.complete(worker, train(1), attempt);
    }
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    check_invariants(&h.state);
}

#[test]
fn one_rank_whose_lease_expires_aborts_the_whole_gang() {
    let mut h = at_train(3);
    let members = ranks(&mut h, 3);
    for (worker, task, attempt, _) in &members {
        h.join(worker, *task, *attempt, "addr");
    }
    // Ranks 0 and 2 heartbeat their lease; rank 1 only proves it is alive.
    for _ in 0..12 {
        h.advance(10_000);
        for (worker, task, attempt, rank) in &members {
            h.heartbeat(worker, (*rank != 1).then_some((*task, *attempt)));
        }
        h.expire();
    }
    assert_eq!(h.state.gang(), None);
    let t = h.state.task(train(1)).unwrap();
    assert_eq!((t.state.clone(), t.attempt, t.failures), (TaskState::Pending, 1, 1));
    assert!(t.last_error.as_deref().unwrap().contains("rank 1"), "{:?}", t.last_error);
    // Every rank is told to stop, not just the one that was lost.
    for (worker, task, attempt, _) in &members {
        assert_eq!(h.heartbeat(worker, Some((*task, *attempt))), Reply::Fenced(Fenced::NotHolder));
    }
    check_invariants(&h.state);
}

#[test]
fn one_rank_dying_aborts_the_gang_and_the_restart_is_a_new_attempt() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    for (worker, task, attempt, _) in &members {
        h.join(worker, *task, *attempt, "addr");
    }
    h.advance(30_000);
    h.heartbeat(&members[0].0, Some((train(1), 1)));
    let reply = h.expire();
    assert_eq!(
        reply,
        Reply::Expired {
            requeued: vec![train(1)],
            failed: vec![],
            dead_workers: vec![members[1].0.clone(), w("rollout")]
        }
    );
    let replacement = h.register("replacement");
    let (_, a0, r0) = h.take_rank(&members[0].0);
    let (_, a1, r1) = h.take_rank(&replacement);
    assert_eq!((a0, r0, a1, r1), (2, 0, 2, 1));
    // The old attempt's rank 0 cannot complete the new gang's task.
    assert_eq!(h.complete(&members[1].0, train(1), 1), Reply::Fenced(Fenced::StaleAttempt { current_attempt: 2 }));
    h.join(&members[0].0, train(1), 2, "a");
    h.join(&replacement, train(1), 2, "b");
    assert_eq!(h.complete(&replacement, train(1), 2), Reply::RankFinished { task_id: train(1), rank: 1 });
    assert_eq!(h.complete(&members[0].0, train(1), 2), Reply::Accepted { task_id: train(1), attempt: 2 });
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    check_invariants(&h.state);
}

#[test]
fn fail_task_from_one_rank_aborts_the_gang() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    let (w1, task, attempt, _) = &members[1];
    assert_eq!(h.fail(w1, *task, *attempt, "NaN loss", false), Reply::Returned { task_id: train(1), will_retry: true });
    assert_eq!(h.state.gang(), None);
    assert_eq!(h.state.worker(&members[0].0).unwrap().current, None);
    assert_eq!(h.state.task(train(1)).unwrap().failures, 1);
    check_invariants(&h.state);
}

#[test]
fn abort_gang_stops_every_rank() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    let (w0, task, attempt, _) = &members[0];
    let applied = h
        .apply(Command::AbortGang {
            worker_id: w0.clone(),
            task_id: *task,
            attempt: *attempt,
            reason: "all-reduce deadline: rank 1 did not answer".into(),
            now_ms: h.now,
        })
        .unwrap();
    assert_eq!(applied.reply, Reply::Returned { task_id: train(1), will_retry: true });
    let Some(Event::GangAborted { cause, message, .. }) = applied.events.first() else { panic!("{applied:?}") };
    assert_eq!(*cause, LossCause::GangAborted);
    assert!(message.contains("rank 1 did not answer"), "{message}");
    let (w1, ..) = &members[1];
    assert_eq!(h.join(w1, *task, *attempt, "late"), Reply::Fenced(Fenced::NotHolder));
}

#[test]
fn a_released_rank_aborts_the_gang_without_counting_a_failure() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    let (w1, task, attempt, _) = &members[1];
    assert_eq!(h.fail(w1, *task, *attempt, "SIGTERM", true), Reply::Returned { task_id: train(1), will_retry: true });
    let t = h.state.task(train(1)).unwrap();
    assert_eq!((t.state.clone(), t.failures), (TaskState::Pending, 0));
    assert_eq!(h.take_rank(&members[0].0), (train(1), 2, 0));
}

#[test]
fn a_finished_rank_going_silent_does_not_abort_the_gang() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    for (worker, task, attempt, _) in &members {
        h.join(worker, *task, *attempt, "addr");
    }
    let (w1, task, attempt, _) = &members[1];
    assert_eq!(h.complete(w1, *task, *attempt), Reply::RankFinished { task_id: train(1), rank: 1 });
    h.advance(100_000);
    h.heartbeat(&members[0].0, Some((train(1), 1)));
    h.expire();
    assert!(h.state.gang().is_some_and(|g| g.started));
    assert_eq!(h.complete(&members[0].0, train(1), 1), Reply::Accepted { task_id: train(1), attempt: 1 });
    let accepted = h.state.accepted(train(1)).unwrap().unwrap();
    assert_eq!(accepted.worker, members[0].0, "rank 0's output (the checkpoint) is the task's");
}

#[test]
fn a_gang_rank_that_asks_again_gets_the_same_rank() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    assert_eq!(h.take_rank(&members[1].0), (train(1), 1, 1));
}

#[test]
fn a_completion_before_the_gang_started_is_fenced() {
    let mut h = at_train(2);
    let members = ranks(&mut h, 2);
    let (w0, task, attempt, _) = &members[0];
    h.join(w0, *task, *attempt, "addr");
    assert_eq!(h.complete(w0, *task, *attempt), Reply::Fenced(Fenced::GangNotStarted));
    assert_eq!(h.state.task(train(1)).unwrap().state, TaskState::Gang { attempt: 1 });
    check_invariants(&h.state);
}
