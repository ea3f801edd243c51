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

/// `n` new workers (r0, r1, ...) gather into the gang: (worker, task, attempt, rank) each.
fn ranks(h: &mut Harness, n: u32) -> Vec<(WorkerId, TaskId, u32, u32)> {
    let workers: Vec<WorkerId> = (0..n).map(|i| h.register(&format!("r{i}"))).collect();
    let leases = h.gather(&workers);
    workers.into_iter().zip(leases).map(|(worker, (task, attempt, rank))| (worker, task, attempt, rank)).collect()
}

#[test]
fn the_gang_waits_for_all_r_ranks_before_starting() {
    let mut h = at_train(3);
    let members = ranks(&mut h, 3);
    assert_eq!(members.iter().map(|m| m.3).collect::<Vec<_>>(), [0, 1, 2], "ranks in id order");
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
    let members = ranks(&mut h, 4);
    let workers: Vec<WorkerId> = members.iter().map(|m| m.0.clone()).collect();
    let mut attempt = 1;
    let mut aborts = Vec::new();
    // Five timeouts, more than max_attempts (3): a gang that cannot gather is not the task's fault (review A2).
    for _ in 0..5 {
        // Ranks 0 and 1 join; 2 and 3 hold their leases alive but never join, so only the join timeout can
        // end the gang.
        for worker in &workers[..2] {
            h.join(worker, train(1), attempt, "addr");
        }
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
        // The same four gather again (after the backoff) into the next attempt's gang.
        let next = h.gather(&workers);
        assert!(next.iter().all(|&(_, a, _)| a == attempt + 1), "{next:?}");
        attempt += 1;
    }
    assert_eq!(aborts.len(), 5);
    let Event::GangAborted { cause, message, .. } = &aborts[0] else { unreachable!() };
    assert_eq!(*cause, LossCause::GangJoinTimeout);
    assert!(message.contains("only 2 of 4 ranks joined"), "{message}");
    let task = h.state.task(train(1)).unwrap();
    assert_eq!((task.failures, task.faults), (0, 0));
    assert!(task.last_error.as_deref().unwrap().contains("only 2 of 4 ranks joined"));
    // This time every rank joins: the gang starts and finishes.
    for worker in &workers {
        h.join(worker, train(1), attempt, "addr");
    }
    for worker in workers.iter().rev() {
        h.complete(worker, train(1), attempt);
    }
    assert_eq!(h.phase(), Some((1, Phase::Eval)));
    check_invariants(&h.state);
}

#[test]
fn no_gang_forms_until_r_idle_workers_are_asking_for_a_rank() {
    let mut h = at_train(4);
    let early: Vec<WorkerId> = (0..3).map(|i| h.register(&format!("w{i}"))).collect();
    // Three workers poll for a minute: no gang forms short of capacity, so nothing can time out or count.
    for _ in 0..60 {
        h.advance(1_000);
        for worker in &early {
            let lease = h.lease(worker);
            assert!(matches!(lease, Lease::RetryAfter { reason: WaitReason::GangGathering, .. }), "{lease:?}");
        }
        h.expire();
    }
    assert_eq!(h.state.gang(), None);
    let task = h.state.task(train(1)).unwrap();
    assert_eq!((task.state.clone(), task.attempt, task.losses), (TaskState::Pending, 0, 0));
    // The fourth one's request forms the gang with all four, ranks in id order.
    let last = h.register("w3");
    let Lease::GangRank { rank, world, attempt, .. } = h.lease(&last) else { panic!("the gang forms now") };
    assert_eq!((rank, world, attempt), (3, 4, 1));
    let gang = h.state.gang().unwrap();
    let members: Vec<&str> = gang.members.iter().map(|m| m.worker.as_str()).collect();
    assert_eq!(members, ["w0", "w1", "w2", "w3"]);
    // The others already hold their ranks and hear of them on their next request.
    for (i, worker) in early.iter().enumerate() {
        assert_eq!(h.take_rank(worker), (train(1), 1, i as u32));
    }
    check_invariants(&h.state);
}

#[test]
fn a_candidate_that_stopped_asking_is_not_counted() {
    let mut h = at_train(3);
    let workers: Vec<WorkerId> = (0..3).map(|i| h.register(&format!("w{i}"))).collect();
    h.lease(&workers[0]);
    h.advance(5_000);
    h.lease(&workers[1]);
    // w0 went quiet for longer than a worker timeout (30 s): it may be gone, or stuck in a collective.
    h.advance(30_000);
    h.lease(&workers[1]);
    assert!(matches!(h.lease(&workers[2]), Lease::RetryAfter { reason: WaitReason::GangGathering, .. }));
    assert_eq!(h.state.gang(), None, "two fresh candidates are not a gang of three");
    assert!(matches!(h.lease(&workers[0]), Lease::GangRank { rank: 0, .. }), "w0 asking again completes it");
    check_invariants(&h.state);
}

#[test]
fn survivors_of_an_aborted_gang_are_waited_for_instead_of_a_short_gang_timing_out() {
    // Review A9: 6 workers, R = 4. Two ranks die mid-training; the two survivors are still stopping their
    // collectives and do not ask; the two idle workers alone must not form a gang that can only time out.
    let mut h = at_train(4);
    let members = ranks(&mut h, 4);
    let idle: Vec<WorkerId> = ["x0", "x1"].iter().map(|id| h.register(id)).collect();
    for (worker, task, attempt, _) in &members {
        h.join(worker, *task, *attempt, "addr");
    }
    assert!(h.state.gang().unwrap().started);
    h.advance(20_000);
    for (worker, task, attempt, _) in &members[..2] {
        h.heartbeat(worker, Some((*task, *attempt)));
    }
    for worker in &idle {
        h.lease(worker);
    }
    h.advance(11_000);
    h.expire(); // r2 and r3 are silent past the worker timeout
    assert_eq!(h.state.gang(), None, "the gang was aborted");
    for _ in 0..300 {
        h.advance(1_000);
        for worker in &idle {
            h.lease(worker);
        }
        for (worker, _, _, _) in &members[..2] {
            h.heartbeat(worker, None); // alive, but busy aborting: not asking for work
        }
        h.expire();
    }
    assert_eq!(h.state.gang(), None, "no short gang formed in five minutes");
    let task = h.state.task(train(1)).unwrap();
    assert_eq!((task.attempt, task.failures), (1, 1), "one loss: the gang the deaths aborted");
    assert!(h.state.snapshot().recent_errors.iter().all(|e| e.cause != LossCause::GangJoinTimeout));
    // The survivors are back: with the idle two they are four, and the second gang forms and finishes.
    assert!(matches!(h.lease(&members[0].0), Lease::RetryAfter { reason: WaitReason::GangGathering, .. }));
    // r1's request makes four candidates: the gang forms, and everyone hears of their rank.
    let gathered = [members[1].0.clone(), members[0].0.clone(), idle[0].clone(), idle[1].clone()];
    let leases: Vec<_> = gathered.iter().map(|w| h.take_rank(w)).collect();
    assert!(leases.iter().all(|&(_, attempt, _)| attempt == 2), "{leases:?}");
    for (worker, (task, attempt, _)) in gathered.iter().zip(&leases) {
        h.join(worker, *task, *attempt, "addr");
    }
    let rank0 = gathered.iter().zip(&leases).find(|(_, l)| l.2 == 0).unwrap().0.clone();
    for (worker, (task, attempt, _)) in gathered.iter().zip(&leases) {
        if *worker != rank0 {
            h.complete(worker, *task, *attempt);
        }
    }
    assert_eq!(h.complete(&rank0, train(1), 2), Reply::Accepted { task_id: train(1), attempt: 2 });
    check_invariants(&h.state);
    let replayed = RunState::replay(h.state.plan().clone(), h.durable.clone()).unwrap();
    assert_eq!(replayed.durable_digest(), h.state.durable_digest(), "the log forms the same gangs");
}

#[test]
fn a_candidate_is_logged_once_per_heartbeat_interval_not_on_every_poll() {
    let mut h = at_train(2);
    let a = h.register("a");
    let before = h.durable.len();
    // One poll a second for 30 s: recorded at the first, then once per 10 s heartbeat interval.
    for _ in 0..30 {
        h.lease(&a);
        h.advance(1_000);
    }
    let logged = h.durable[before..].iter().filter(|c| matches!(c, Command::LeaseTask { .. })).count();
    assert_eq!(logged, 3, "{:?}", &h.durable[before..]);
    let replayed = RunState::replay(h.state.plan().clone(), h.durable.clone()).unwrap();
    assert_eq!(replayed.durable_digest(), h.state.durable_digest());
    // A second worker completes the gang, in the replay as live.
    let b = h.register("b");
    assert!(matches!(h.lease(&b), Lease::GangRank { .. }));
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
            dead_workers: vec![members[1].0.clone(), w("rollout")],
            removed_workers: vec![],
        }
    );
    let replacement = h.register("replacement");
    let gathered = h.gather(&[members[0].0.clone(), replacement.clone()]);
    let [(_, a0, r0), (_, a1, r1)] = gathered[..] else { panic!("{gathered:?}") };
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
    assert_eq!(h.gather(&[members[0].0.clone(), members[1].0.clone()])[0], (train(1), 2, 0));
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
