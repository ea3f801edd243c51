//! Determinism: the serialized command log replays to the identical state, and a serialized state
//! (a Raft snapshot) continues exactly like the original.

use super::*;

/// A run with a bit of everything: failures, a release, a death, a gang abort and refused commands.
fn eventful_run() -> Harness {
    let mut h = Harness::new(plan(2, 3, 2, 2));
    let a = h.register("a");
    let b = h.register("b");
    let (t0, a0) = h.take(&a);
    h.fail(&a, t0, a0, "OOM", false);
    let (t1, a1) = h.take(&b);
    h.fail(&b, t1, a1, "SIGTERM", true);
    let _ = h.apply(Command::LeaseTask { worker_id: w("ghost"), now_ms: 1 });
    let _ = h.apply(Command::CompleteTask {
        worker_id: a.clone(),
        task_id: rollout(7, 0),
        attempt: 1,
        output: output(rollout(7, 0), 1),
        now_ms: 1,
    });
    let (t2, a2) = h.take(&a);
    h.advance(31_000);
    h.heartbeat(&b, None);
    h.expire(); // a dies holding t2
    h.complete(&a, t2, a2); // fenced: a lost it
    h.finish_stage(&b);
    let c = h.register("c");
    let (task, attempt, _) = h.gather(&[b.clone(), c.clone()])[0];
    h.fail(&c, task, attempt, "rank crashed", false);
    h.finish_train();
    h
}

#[test]
fn replaying_the_serialized_command_log_reproduces_an_identical_state() {
    let h = eventful_run();
    // What the driver writes to disk: one JSON command per line.
    let text: String = h.log.iter().map(|c| serde_json::to_string(c).unwrap() + "\n").collect();
    let log: Vec<Command> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(log, h.log);
    let replayed = RunState::replay(h.state.plan().clone(), log).unwrap();
    assert_eq!(replayed, h.state);
    assert_eq!(replayed.digest(), h.state.digest());
    assert_eq!(replayed.snapshot(), h.state.snapshot());
    assert_eq!(replayed.current_stage(), Some((1, Phase::Eval)));
}

#[test]
fn replay_reproduces_the_replies_too() {
    let h = eventful_run();
    let mut original = RunState::new(h.state.plan().clone()).unwrap();
    let mut again = RunState::new(h.state.plan().clone()).unwrap();
    for command in &h.log {
        let first = original.apply(command.clone());
        let second = again.apply(command.clone());
        assert_eq!(first, second, "{command:?}");
    }
}

#[test]
fn a_serialized_state_continues_like_the_original() {
    let mut h = eventful_run();
    let json = serde_json::to_string(&h.state).unwrap();
    let mut restored: RunState = serde_json::from_str(&json).unwrap();
    assert_eq!(restored, h.state);
    let d = w("d");
    let next = [
        Command::RegisterWorker {
            worker_id: d.clone(),
            name: "d".into(),
            resources: Resources::default(),
            now_ms: h.now,
            session: "0123456789abcdef0123456789abcdef".into(),
        },
        Command::LeaseTask { worker_id: d.clone(), now_ms: h.now },
        Command::ExpireLeases { now_ms: h.now + 1_000_000 },
    ];
    for command in next {
        assert_eq!(restored.apply(command.clone()), h.apply(command));
    }
    assert_eq!(restored, h.state);
}

#[test]
fn the_digest_changes_when_the_state_does() {
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let before = h.state.digest();
    h.register("a");
    assert_ne!(h.state.digest(), before);
    let a_digest = h.state.digest();
    let _ = h.apply(Command::LeaseTask { worker_id: w("ghost"), now_ms: 0 });
    assert_eq!(h.state.digest(), a_digest, "a refused command leaves the digest alone");
}

#[test]
fn a_log_without_the_liveness_only_commands_rebuilds_everything_durable() {
    // The driver does not log idle polls, lease-less heartbeats or ticks that take no lease back (A4):
    // replaying what it does log must agree with the live state in all but liveness.
    let mut h = Harness::new(plan(1, 2, 1, 1));
    let a = h.register("a");
    let b = h.register("b");
    let idle = h.register("idle");
    let (t0, a0) = h.take(&a);
    let (t1, b1) = h.take(&b);
    for _ in 0..10 {
        h.advance(2_000);
        assert!(matches!(h.lease(&idle), Lease::RetryAfter { .. }), "every shard is leased");
        h.heartbeat(&idle, None);
        h.heartbeat(&b, Some((t1, b1)));
    }
    // An empty tick, then `a` goes silent and dies holding its lease while `idle` keeps polling: the
    // replay sees `idle` silent since it registered, so it dies there too, without a lease to lose.
    h.expire();
    h.advance(25_000);
    h.lease(&idle);
    h.heartbeat(&b, Some((t1, b1)));
    h.advance(6_000);
    let Reply::Expired { requeued, .. } = h.expire() else { panic!() };
    assert_eq!(requeued, vec![t0]);
    assert!(matches!(h.complete(&a, t0, a0), Reply::Fenced(_)));
    // A lease whose arrival stamp is older than an unlogged heartbeat the state already applied (commands
    // are stamped on arrival): the log holds it at the state's time, else the replay would compute an
    // earlier deadline.
    let stamped = h.now;
    h.advance(2_000);
    h.heartbeat(&idle, None);
    let Reply::Lease(Lease::Task { task_id: retaken, attempt, deadline_ms }) =
        h.ok(Command::LeaseTask { worker_id: idle.clone(), now_ms: stamped })
    else {
        panic!("expected the requeued shard");
    };
    assert_eq!((retaken, attempt, deadline_ms), (t0, 2, h.now + h.state.plan().lease_ms));
    h.complete(&idle, t0, 2);
    h.complete(&b, t1, b1);
    let (train, train_attempt, _) = h.take_rank(&idle);
    h.heartbeat(&a, Some((t0, a0)));
    h.join(&idle, train, train_attempt, "ep");

    let skipped = h.log.len() - h.durable.len();
    assert!(skipped >= 20, "only {skipped} of {} commands were liveness-only", h.log.len());
    let replayed = RunState::replay(h.state.plan().clone(), h.durable.clone()).unwrap();
    assert_eq!(replayed.durable_digest(), h.state.durable_digest());
    assert_eq!(replayed.snapshot().stages, h.state.snapshot().stages);
    assert_eq!(replayed.snapshot().gang, h.state.snapshot().gang);
    assert_ne!(replayed.digest(), h.state.digest(), "the liveness the log leaves out does differ");
}
