//! Workers: death by silence, coming back, restarting, idempotent leasing, and refusing unknown ids
//! without changing anything.

use super::*;

#[test]
fn a_silent_worker_is_marked_dead_and_its_lease_released() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (task, attempt) = h.take(&a);
    h.now = 30_000;
    h.heartbeat(&b, None);
    let reply = h.expire();
    assert_eq!(
        reply,
        Reply::Expired { requeued: vec![task], failed: vec![], dead_workers: vec![a.clone()], removed_workers: vec![] }
    );
    let snap = h.state.snapshot();
    let dead = snap.workers.iter().find(|v| v.id == a).unwrap();
    assert!(!dead.alive);
    assert_eq!((dead.current, dead.last_seen_ms), (None, 0));
    assert!(snap.workers.iter().find(|v| v.id == b).unwrap().alive);
    assert_eq!(snap.recent_errors.last().unwrap().cause, LossCause::WorkerDead);
    // Once its backoff is over, the dead worker's shard is re-leased first.
    h.wait_backoff(0);
    assert_eq!(h.take(&b), (task, attempt + 1), "the dead worker's shard is re-leased first");
    check_invariants(&h.state);
}

#[test]
fn a_dead_worker_that_speaks_again_is_alive_but_its_old_lease_is_gone() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    h.now = 40_000;
    h.expire();
    let applied = h
        .apply(Command::Heartbeat {
            worker_id: a.clone(),
            lease: Some(LeaseRef { task_id: task, attempt }),
            progress: Progress::default(),
            now_ms: h.now,
        })
        .unwrap();
    assert_eq!(applied.events, [Event::WorkerRevived { worker: a.clone() }]);
    assert_eq!(applied.reply, Reply::Fenced(Fenced::NotHolder));
    assert!(h.state.worker(&a).unwrap().alive);
    h.wait_backoff(0);
    assert_eq!(h.take(&a), (task, attempt + 1));
    check_invariants(&h.state);
}

#[test]
fn a_worker_that_registers_again_loses_the_lease_it_held() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    h.register("a");
    let t = h.state.task(task).unwrap();
    assert_eq!((t.state.clone(), t.failures), (TaskState::Pending, 1));
    assert!(t.last_error.as_deref().unwrap().contains("registered again"));
    assert_eq!(h.state.snapshot().workers.len(), 1);
    assert_eq!(h.take(&a), (task, attempt + 1));
}

#[test]
fn lease_task_is_idempotent_while_the_worker_holds_a_lease() {
    let mut h = Harness::new(plan(1, 3, 1, 1));
    let a = h.register("a");
    let first = h.take(&a);
    h.advance(5_000);
    // The reply to the first LeaseTask was lost; asking again hands back the same lease, renewed.
    match h.lease(&a) {
        Lease::Task { task_id, attempt, deadline_ms } => {
            assert_eq!((task_id, attempt), first);
            assert_eq!(deadline_ms, 5_000 + 120_000);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.state.snapshot().overall.leased, 1);
    check_invariants(&h.state);
}

#[test]
fn unknown_worker_is_refused_with_no_change() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    let before = h.state.clone();
    let ghost = w("ghost");
    let commands = [
        Command::LeaseTask { worker_id: ghost.clone(), now_ms: 99_999 },
        Command::Heartbeat { worker_id: ghost.clone(), lease: None, progress: Progress::default(), now_ms: 99_999 },
        Command::CompleteTask { worker_id: ghost.clone(), task_id: task, attempt, output: output(task, 1), now_ms: 9 },
        Command::FailTask {
            worker_id: ghost.clone(),
            task_id: task,
            attempt,
            error: "x".into(),
            released: false,
            retryable: false,
            now_ms: 9,
        },
        Command::JoinGang { worker_id: ghost.clone(), task_id: train(1), attempt: 1, endpoint: "e".into(), now_ms: 9 },
        Command::AbortGang { worker_id: ghost.clone(), task_id: train(1), attempt: 1, reason: "r".into(), now_ms: 9 },
    ];
    for command in commands {
        let err = h.apply(command).unwrap_err();
        assert_eq!(err.kind(), "unknown_worker");
        assert!(err.to_string().contains("ghost"), "{err}");
        assert_eq!(h.state, before, "a refused command changed the state");
    }
}

#[test]
fn unknown_task_is_refused_with_no_change() {
    let mut h = Harness::new(plan(2, 2, 1, 1));
    let a = h.register("a");
    h.take(&a);
    let before = h.state.clone();
    for (task_id, why) in [
        (rollout(3, 0), "iteration must be in 1..=2"),
        (rollout(0, 0), "iteration must be in 1..=2"),
        (rollout(1, 2), "rollout has 2 task(s)"),
        (eval(1, 1), "eval has 1 task(s)"),
        (TaskId::new(1, Phase::Train, 1), "train has 1 task(s)"),
    ] {
        for command in [
            Command::CompleteTask { worker_id: a.clone(), task_id, attempt: 1, output: output(task_id, 1), now_ms: 7 },
            Command::FailTask {
                worker_id: a.clone(),
                task_id,
                attempt: 1,
                error: "e".into(),
                released: true,
                retryable: false,
                now_ms: 7,
            },
            Command::Heartbeat {
                worker_id: a.clone(),
                lease: Some(LeaseRef { task_id, attempt: 1 }),
                progress: Progress::default(),
                now_ms: 7,
            },
        ] {
            let err = h.apply(command).unwrap_err();
            assert_eq!(err.kind(), "unknown_task");
            let msg = err.to_string();
            assert!(msg.contains(&task_id.to_string()) && msg.contains(why), "{msg}");
            assert_eq!(h.state, before);
        }
    }
    assert_eq!(h.state.task(rollout(9, 0)).unwrap_err().kind(), "unknown_task");
}

#[test]
fn gang_commands_on_a_sharded_task_are_refused() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let a = h.register("a");
    let (task, attempt) = h.take(&a);
    let before = h.state.clone();
    let err = h
        .apply(Command::JoinGang { worker_id: a.clone(), task_id: task, attempt, endpoint: "e".into(), now_ms: 1 })
        .unwrap_err();
    assert_eq!(err.kind(), "not_a_gang_task");
    assert_eq!(h.state, before);
}

#[test]
fn an_unsafe_worker_id_is_refused() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    let before = h.state.clone();
    for id in ["", "a/b", "..", "has space"] {
        let command = Command::RegisterWorker {
            worker_id: w(id),
            name: "n".into(),
            resources: Resources::default(),
            now_ms: 0,
            session: String::new(),
        };
        assert_eq!(h.apply(command).unwrap_err().kind(), "invalid_worker_id", "{id:?}");
    }
    assert_eq!(h.state, before);
}

#[test]
fn snapshot_shows_phase_counts_workers_and_current_tasks() {
    let mut h = Harness::new(plan(2, 4, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let (t, at) = h.take(&a);
    h.complete(&a, t, at);
    let (held, attempt) = h.take(&b);
    let snap = h.state.snapshot();
    assert_eq!((snap.iteration, snap.phase, snap.iterations), (Some(1), Some(Phase::Rollout), 2));
    assert_eq!(snap.phase_counts, Counts { pending: 2, leased: 1, done: 1, failed: 0 });
    assert_eq!(snap.overall, Counts { pending: 2 + 1 + 1 + 6, leased: 1, done: 1, failed: 0 });
    assert_eq!(snap.overall.total(), 12);
    assert_eq!(snap.stages.len(), 6);
    let wb = snap.workers.iter().find(|v| v.id == b).unwrap();
    assert_eq!((wb.current, wb.attempt, wb.alive), (Some(held), Some(attempt), true));
    assert_eq!(snap.workers.iter().find(|v| v.id == a).unwrap().completed, 1);
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["phase"], "rollout");
    assert_eq!(json["run"]["status"], "running");
    assert_eq!(json["workers"][1]["current"]["phase"], "rollout");
}

#[test]
fn recent_errors_are_bounded() {
    let mut p = plan(1, 1, 1, 1);
    p.max_attempts = 1000;
    let mut h = Harness::new(p);
    let a = h.register("a");
    for i in 0..100 {
        let (task, attempt) = h.take(&a);
        h.fail(&a, task, attempt, &format!("error {i}"), false);
    }
    let errors = h.state.snapshot().recent_errors;
    assert_eq!(errors.len(), RECENT_ERRORS);
    assert!(errors.last().unwrap().message.contains("error 99"));
    assert!(errors[0].message.contains(&format!("error {}", 100 - RECENT_ERRORS)));
}

#[test]
fn fresh_worker_ids_do_not_collide() {
    let mut h = Harness::new(plan(1, 1, 1, 1));
    h.register("w-0002");
    let id = h.state.fresh_worker_id();
    assert_eq!(id.as_str(), "w-0003");
    h.register(id.as_str());
    assert_eq!(h.state.fresh_worker_id().as_str(), "w-0004");
}

// Records of dead workers (review A12): removed after the retention, never while they hold something,
// bounded in number, and removed alike live and replayed.

const T: u64 = 30_000; // the worker timeout of `plan()`
const R: u64 = 60_000; // the retention these tests set

fn retained(iterations: u32, rollout: u32, eval: u32, ranks: u32) -> Plan {
    Plan { worker_retention_ms: Some(R), ..plan(iterations, rollout, eval, ranks) }
}

/// An idle poll, answered "retry later".
fn poll(h: &mut Harness, worker: &WorkerId) {
    assert!(matches!(h.lease(worker), Lease::RetryAfter { .. }), "{worker} should have nothing to do");
}

fn removed(reply: &Reply) -> Vec<WorkerId> {
    let Reply::Expired { removed_workers, .. } = reply else { panic!("{reply:?}") };
    removed_workers.clone()
}

fn ids(h: &Harness) -> Vec<String> {
    h.state.snapshot().workers.iter().map(|w| w.id.to_string()).collect()
}

#[test]
fn a_dead_worker_that_holds_nothing_is_removed_after_the_retention_and_not_before() {
    let mut h = Harness::new(retained(1, 1, 1, 1));
    let busy = h.register("busy");
    let gone = h.register("gone");
    let idle = h.register("idle");
    let (task, attempt) = h.take(&busy);
    // `gone` is silent from 0 on; `busy` heartbeats its lease and `idle` polls, every 10 s.
    let due = T + 2 * R;
    while h.now + 10_000 < due {
        h.advance(10_000);
        h.heartbeat(&busy, Some((task, attempt)));
        poll(&mut h, &idle);
        assert_eq!(removed(&h.expire()), vec![], "at {}", h.now);
    }
    assert!(!h.state.worker(&gone).unwrap().alive, "dead since {T} ms");
    assert_eq!(h.state.next_deadline_ms(), Some(due), "the driver's timer fires at the removal");
    h.now = due - 1;
    assert_eq!(removed(&h.expire()), vec![]);
    h.now = due;
    let applied = h.apply(Command::ExpireLeases { now_ms: due }).unwrap();
    assert_eq!(removed(&applied.reply), vec![gone.clone()]);
    assert_eq!(applied.events, [Event::WorkerRemoved { worker: gone.clone() }]);
    assert_eq!(h.durable.last(), h.log.last(), "a tick that removes a record is logged");
    assert_eq!(ids(&h), ["busy", "idle"]);
    let snap = h.state.snapshot();
    assert_eq!((snap.workers_removed, h.state.workers_removed()), (1, 1));
    assert!(snap.workers.iter().all(|w| w.alive), "no dead worker left, one removed");
    assert_eq!(h.state.next_deadline_ms(), h.state.liveness.first().map(|(seen, _)| seen + T));
    check_invariants(&h.state);

    // Calling again, it is an unknown worker (its task loop re-registers), and registering brings it back.
    let err = h.apply(Command::LeaseTask { worker_id: gone.clone(), now_ms: h.now }).unwrap_err();
    assert_eq!(err.kind(), "unknown_worker");
    h.register("gone");
    assert_eq!(h.state.worker(&gone).unwrap().registered_ms, due);
    poll(&mut h, &gone);
}

#[test]
fn a_worker_that_keeps_polling_is_never_removed_and_logs_one_poll_per_retention() {
    let mut h = Harness::new(retained(1, 1, 1, 1));
    let busy = h.register("busy");
    let idle = h.register("idle");
    let (task, attempt) = h.take(&busy);
    let logged = h.durable.len();
    for second in 1..=1_000 {
        h.advance(1_000);
        poll(&mut h, &idle);
        if second % 10 == 0 {
            h.heartbeat(&busy, Some((task, attempt)));
            assert_eq!(removed(&h.expire()), vec![]);
        }
    }
    assert!(h.state.worker(&idle).is_some());
    let polls_logged = h.durable[logged..]
        .iter()
        .filter(|c| matches!(c, Command::LeaseTask { worker_id, .. } if *worker_id == idle))
        .count();
    assert_eq!(polls_logged as u64, 1_000_000 / R, "one of 1 000 polls per retention");
    let replayed = RunState::replay(h.state.plan().clone(), h.durable.clone()).unwrap();
    assert_eq!(replayed.durable_digest(), h.state.durable_digest());
}

#[test]
fn lease_holders_gang_members_and_quarantined_workers_are_never_removed() {
    // A gang: rank 1 finishes first and goes silent, rank 0 trains on for a long time.
    let mut h = Harness::new(retained(1, 1, 1, 2));
    let first = h.register("first");
    h.finish_stage(&first);
    let ranks = [h.register("r0"), h.register("r1")];
    let leases = h.gather(&ranks);
    for (worker, (task, attempt, _)) in ranks.iter().zip(&leases) {
        h.join(worker, *task, *attempt, "tcp://10.0.0.1:29500");
    }
    let (task, attempt, rank) = leases[1];
    assert_eq!(rank, 1);
    assert!(matches!(h.complete(&ranks[1], task, attempt), Reply::RankFinished { .. }));
    let finished_at = h.now;
    for _ in 0..100 {
        h.advance(10_000);
        h.heartbeat(&ranks[0], Some((task, attempt)));
        poll(&mut h, &first);
        assert_eq!(removed(&h.expire()), vec![], "a member of the running gang stays");
    }
    assert!(!h.state.worker(&ranks[1]).unwrap().alive);
    // The gang ends with rank 0's completion: rank 1 holds nothing any more, and has long been dead.
    h.complete(&ranks[0], task, attempt);
    assert_eq!(removed(&h.expire()), vec![ranks[1].clone()]);
    assert!(h.now >= finished_at + T + R);

    // A worker dead while the run is over keeps the lease it held, and its record.
    let mut h = Harness::new(Plan { max_attempts: 1, ..retained(1, 2, 1, 1) });
    let holder = h.register("holder");
    let loser = h.register("loser");
    h.take(&holder);
    let (task, attempt) = h.take(&loser);
    h.fail(&loser, task, attempt, "poison", false);
    assert!(matches!(h.state.status(), RunStatus::Failed { .. }));
    h.advance(10 * (T + 2 * R));
    assert_eq!(removed(&h.expire()), vec![loser.clone()], "the idle one goes, the holder stays");
    assert!(h.state.worker(&holder).unwrap().current.is_some());

    // A quarantined worker stays until its quarantine is over, so dying does not lift it.
    let mut h = Harness::new(retained(1, 8, 1, 1));
    let bad = h.register("bad");
    let good = h.register("good");
    for _ in 0..3 {
        h.wait_backoff(0);
        let (task, attempt) = h.take(&bad);
        h.fail(&bad, task, attempt, "boom", false);
    }
    let until = h.state.worker(&bad).unwrap().quarantined_until_ms;
    assert!(until > h.now + T + 2 * R, "the default quarantine outlasts the retention");
    while h.now + 10_000 < until {
        h.advance(10_000);
        poll_or_take(&mut h, &good);
        assert_eq!(removed(&h.expire()), vec![], "at {}", h.now);
    }
    assert_eq!(h.state.next_deadline_ms(), Some(until));
    h.now = until;
    poll_or_take(&mut h, &good);
    assert_eq!(removed(&h.expire()), vec![bad]);
}

/// An idle worker's poll in a stage it could work in: it takes a shard and completes it, or waits.
fn poll_or_take(h: &mut Harness, worker: &WorkerId) {
    if let Lease::Task { task_id, attempt, .. } = h.lease(worker) {
        h.complete(worker, task_id, attempt);
    }
}

#[test]
fn the_number_of_worker_records_is_bounded_and_the_longest_dead_make_room() {
    let mut p = retained(1, 1, 1, 1);
    p.max_workers = 3;
    let mut h = Harness::new(p);
    let register = |h: &mut Harness, id: &str| {
        h.apply(Command::RegisterWorker {
            worker_id: w(id),
            name: id.into(),
            resources: Resources::default(),
            now_ms: h.now,
            session: String::new(),
        })
    };
    let a = h.register("a");
    let b = h.register("b");
    h.now = 10_000;
    h.register("c");
    let before = h.state.clone();
    let err = register(&mut h, "d").unwrap_err();
    assert_eq!(err.kind(), "too_many_workers");
    assert!(err.to_string().contains("maximum of 3 worker records"), "{err}");
    assert_eq!(h.state, before, "a refused registration changes nothing");
    // Registering again under a known id needs no room.
    h.register("b");

    // b polls on; a and c are silent. Dead for sure once silent past a worker timeout, the oldest first.
    h.now = R + 10_000;
    h.heartbeat(&b, None);
    h.now = T + R;
    let applied = register(&mut h, "d").unwrap();
    assert_eq!(applied.events[0], Event::WorkerRemoved { worker: a.clone() });
    assert_eq!(ids(&h), ["b", "c", "d"]);
    assert_eq!(register(&mut h, "e").unwrap_err().kind(), "too_many_workers", "c is not surely dead yet");
    h.now = 10_000 + T + R;
    register(&mut h, "e").unwrap();
    assert_eq!(ids(&h), ["b", "d", "e"]);
    assert_eq!(h.state.workers_removed(), 2);
    check_invariants(&h.state);

    // With records kept forever, none can be told dead from the log, so the bound just refuses.
    let mut p = plan(1, 1, 1, 1);
    (p.max_workers, p.worker_retention_ms) = (1, Some(0));
    let mut h = Harness::new(p);
    h.register("a");
    h.now = 1_000_000_000;
    assert_eq!(
        h.expire(),
        Reply::Expired { requeued: vec![], failed: vec![], dead_workers: vec![w("a")], removed_workers: vec![] }
    );
    assert_eq!(register(&mut h, "b").unwrap_err().kind(), "too_many_workers");
    assert_eq!(h.state.next_deadline_ms(), None, "nothing will ever be removed");
}

#[test]
fn a_fresh_id_never_reuses_a_removed_workers() {
    let mut h = Harness::new(retained(1, 1, 1, 1));
    let ids: Vec<WorkerId> = (0..3)
        .map(|_| {
            let id = h.state.fresh_worker_id();
            h.register(id.as_str())
        })
        .collect();
    assert_eq!(ids.iter().map(WorkerId::as_str).collect::<Vec<_>>(), ["w-0001", "w-0002", "w-0003"]);
    h.now = T + 2 * R;
    h.take(&ids[0]); // w-0001 holds a lease, the others are removed
    assert_eq!(removed(&h.expire()), ids[1..]);
    assert_eq!(h.state.fresh_worker_id().as_str(), "w-0004");
}

#[test]
fn removing_records_replays_to_the_same_state() {
    let mut p = retained(2, 3, 2, 2);
    p.max_workers = 5;
    let mut h = Harness::new(p);
    let a = h.register("a");
    let b = h.register("b");
    let crashy: Vec<WorkerId> = (0..3).map(|i| h.register(&format!("crash-{i}"))).collect();
    let (t0, a0) = h.take(&a);
    h.fail(&a, t0, a0, "OOM", false);
    let (t1, a1) = h.take(&crashy[0]);
    // crash-0 dies holding a lease; the others never speak again; a and b poll and work.
    let mut snapshot = None;
    for step in 0..60 {
        h.advance(5_000);
        h.wait_backoff(0);
        poll_or_take(&mut h, &a);
        if step % 3 == 0 {
            h.heartbeat(&b, None);
        }
        h.expire();
        if step == 30 {
            snapshot = Some((serde_json::to_string(&h.state).unwrap(), h.durable.len()));
        }
    }
    // crash-0 lost its lease when it died, and its record later: its late report is an unknown worker's.
    let late = Command::CompleteTask {
        worker_id: crashy[0].clone(),
        task_id: t1,
        attempt: a1,
        output: output(t1, a1),
        now_ms: h.now,
    };
    assert_eq!(h.apply(late).unwrap_err().kind(), "unknown_worker");
    assert_eq!(h.state.workers_removed(), 3, "{:?}", ids(&h));
    // More registrations than the bound: the removed records made room.
    for i in 0..3 {
        h.register(&format!("new-{i}"));
    }
    assert_eq!(h.state.workers.len(), 5);
    assert_eq!(
        h.apply(Command::LeaseTask { worker_id: crashy[1].clone(), now_ms: h.now }).unwrap_err().kind(),
        "unknown_worker"
    );

    let plan = h.state.plan().clone();
    let full = RunState::replay(plan.clone(), h.log.clone()).unwrap();
    assert_eq!(full, h.state, "replaying every command");
    let durable = RunState::replay(plan.clone(), h.durable.clone()).unwrap();
    assert_eq!(durable.durable_digest(), h.state.durable_digest(), "replaying what the driver logs");
    assert_eq!(durable.workers.keys().collect::<Vec<_>>(), h.state.workers.keys().collect::<Vec<_>>());
    assert!(h.durable.len() < h.log.len());
    let (json, at) = snapshot.unwrap();
    let mut restored: RunState = serde_json::from_str(&json).unwrap();
    for command in &h.durable[at..] {
        let _ = restored.apply(command.clone());
    }
    assert_eq!(restored.durable_digest(), h.state.durable_digest(), "a snapshot and the log after it");
    check_invariants(&h.state);
}

#[test]
fn a_plan_written_before_the_retention_fields_reads_with_their_defaults() {
    let p = plan(2, 3, 1, 1);
    let mut json = serde_json::to_value(&p).unwrap();
    assert!(json.get("worker_retention_ms").is_none() && json.get("max_workers").is_none(), "{json}");
    json.as_object_mut().unwrap().remove("quarantine_after");
    let old: Plan = serde_json::from_value(json).unwrap();
    assert_eq!(old, p, "logs and snapshots written before keep matching the plan");
    assert_eq!((old.worker_retention(), old.max_workers), (10 * T, 4096));
    let mut bad = p.clone();
    bad.worker_retention_ms = Some(T - 1);
    assert_eq!(RunState::new(bad).unwrap_err().kind(), "invalid_plan");
}
