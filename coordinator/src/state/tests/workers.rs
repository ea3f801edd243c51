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
    assert_eq!(reply, Reply::Expired { requeued: vec![task], failed: vec![], dead_workers: vec![a.clone()] });
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
