//! Process-level faults an operator meets on a long run (issue 13), on real `iro coordinator` and
//! `iro worker` processes on loopback: a worker that fails every task it takes is quarantined while the
//! others finish the run; an object store down for longer than object_store's retry window fails nothing;
//! a coordinator whose state disk fills exits non-zero and, restarted with space, redoes no accepted shard.
//! One cluster at a time (`one_cluster_at_a_time`): two cores do not run two of them well.

mod support;

use std::time::{Duration, Instant};

use support::{Cluster, check_finished_run, one_cluster_at_a_time};

/// The whole run, bounded: a debug build on 2 busy cores finishes well within this.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The bad worker sees the run's store folder read-only (a bind mount in a mount namespace of its own, as
/// on a node whose volume went read-only): it computes every task it takes and fails to write the output,
/// an I/O error of the store that the coordinator counts against it (not an unreachable store).
#[test]
fn a_worker_that_fails_every_task_is_quarantined_and_the_run_finishes_on_the_others() {
    let _one = one_cluster_at_a_time();
    let mut cluster = Cluster::new("quarantine", 1);
    // Two failures in a row quarantine a worker, for longer than the run lasts.
    cluster.edit_config(|c| {
        c.cluster.quarantine_after = 2;
        c.cluster.quarantine_s = 600;
    });
    std::fs::create_dir_all(&cluster.store_path).unwrap();
    cluster.start_coordinator();
    let store = cluster.store_path.to_str().unwrap().to_owned();
    let read_only = r#"mount --bind -o ro "$0" "$0" && exec "$@""#;
    cluster.start_worker_through("bad", &["unshare", "--mount", "sh", "-c", read_only, &store]);

    // The bad worker first, alone until it holds a task, so it is the one that takes the run's first tasks.
    let (bad_id, first) = cluster.poll_status(Duration::from_secs(120), "a task leased to the bad worker", |s| {
        let w = s.workers.iter().find(|w| w.name == "bad")?;
        Some((w.id.clone(), w.current_task.clone()?))
    });
    eprintln!("{} bad ({bad_id}) holds {first}: starting the good workers", cluster.stamp());
    cluster.start_worker("w1");
    cluster.start_worker("w2");

    let tag = cluster.tag;
    let quarantined = cluster.poll_status(Duration::from_secs(120), "the bad worker quarantined", |s| {
        let w = s.workers.iter().find(|w| w.id == bad_id).expect("the bad worker left the status report");
        w.quarantined_for_ms.map(|ms| (ms, w.failures, w.completed, w.state()))
    });
    eprintln!("[{tag}] bad quarantined: {quarantined:?} (for ms, failures, completed, state)");
    let (for_ms, failures, completed, state) = quarantined;
    assert_eq!(state, "quarantined");
    assert!(failures >= 2, "quarantined after {failures} failures; quarantine_after is 2");
    assert_eq!(completed, 0, "the bad worker completed a task with a read-only store");
    assert!(for_ms > 500_000, "quarantined for only {for_ms} ms of 600 s");

    let end = cluster.finish(RUN_LIMIT, &["w1", "w2", "bad"]);
    // No task failed for good, every one is done, by the good workers only; the bad worker is still
    // quarantined at the end, with the failures it caused and no more than one per task it took.
    for st in &end.stages {
        assert_eq!(st.tasks.failed, 0, "iteration {} {}: {:?}", st.iteration, st.phase, st.tasks);
        assert_eq!(st.tasks.done, st.tasks.total(), "iteration {} {}: {:?}", st.iteration, st.phase, st.tasks);
    }
    let bad = end.workers.iter().find(|w| w.id == bad_id).unwrap();
    assert!(bad.quarantined_for_ms.is_some(), "the bad worker is no longer quarantined: {bad:?}");
    assert_eq!(bad.completed, 0, "{bad:?}");
    let good_completed: u64 = end.workers.iter().filter(|w| w.id != bad_id).map(|w| w.completed).sum();
    assert_eq!(good_completed, end.overall_tasks.done, "every task completed by w1 and w2: {:?}", end.workers);
    let bad_errors: Vec<_> = end.recent_errors.iter().filter(|e| e.message.contains("Read-only")).collect();
    assert!(!bad_errors.is_empty(), "no failure naming the read-only store: {:?}", end.recent_errors);
    assert!(bad_errors.iter().all(|e| e.cause == "failed"), "{bad_errors:?}");
    assert!(cluster.log("bad").contains("Read-only file system"), "the bad worker's tasks failed otherwise");
    eprintln!(
        "[{tag}] bad: {} failures ({} shown in recent errors), quarantined for {:?} ms more at the end",
        bad.failures,
        bad_errors.len(),
        bad.quarantined_for_ms
    );

    check_finished_run(&cluster);
    eprintln!("{} total", cluster.stamp());
}

/// The coordinator's `--state-dir` on a 256 KiB tmpfs. Once iteration 1's rollout shards are accepted, a
/// filler file takes the remaining space and a new worker registers (a command that must be logged): the
/// log write fails, the coordinator stops serving and exits non-zero. With the filler gone, a coordinator
/// restarted on the same state dir replays the log and finishes the run without redoing those shards.
#[test]
fn a_coordinator_whose_state_disk_fills_exits_nonzero_and_resumes_with_space() {
    let _one = one_cluster_at_a_time();
    let disk = support::Tmpfs::mount("256k");
    let mut cluster = Cluster::new("full-disk", 2);
    cluster.state_dir = disk.path.join("state");
    cluster.start_coordinator();
    cluster.start_worker("w1");
    cluster.start_worker("w2");

    cluster.poll_status(RUN_LIMIT, "iteration 1's rollout accepted", |s| {
        let st = s.stages.iter().find(|st| st.iteration == 1 && st.phase == "rollout")?;
        (st.tasks.done == st.tasks.total()).then_some(())
    });
    let before: Vec<support::ShardObject> =
        cluster.shard_objects().into_iter().filter(|o| o.iteration == 1 && o.phase == "rollout").collect();
    assert_eq!(before.len(), 2, "one object per accepted rollout shard: {before:?}");
    let filler = disk.path.join("filler");
    let filled = disk.fill(&filler);
    let tag = cluster.tag;
    eprintln!("{} state disk filled ({filled} bytes of filler); starting w3", cluster.stamp());
    cluster.start_worker("w3");
    let filled_at = Instant::now();

    // /livez fails once the write failed, then the process exits, non-zero.
    let mut livez_failed = None;
    let exit = loop {
        if let Some(exit) = cluster.exited("coordinator") {
            break exit;
        }
        if livez_failed.is_none() && support::http_get(cluster.status, "/livez").is_err() {
            livez_failed = Some(filled_at.elapsed());
        }
        assert!(filled_at.elapsed() < Duration::from_secs(60), "the coordinator still runs 60 s after its disk filled");
        std::thread::sleep(Duration::from_millis(50));
    };
    let exited_after = filled_at.elapsed();
    eprintln!(
        "[{tag}] coordinator exited {exit} {:.1}s after the fill; /livez failed after {livez_failed:?}",
        exited_after.as_secs_f64()
    );
    assert!(!exit.success(), "the coordinator exited with success on a full disk");
    assert!(exited_after < Duration::from_secs(30), "exited only {exited_after:?} after the disk filled");
    let log = cluster.log("coordinator");
    assert!(log.contains("cannot persist the command log"), "the coordinator did not say why it stopped");
    assert!(log.contains("No space left on device"), "the log write failed for another reason");

    std::fs::remove_file(&filler).unwrap();
    cluster.start_coordinator();
    let recovered = cluster.poll_status(Duration::from_secs(60), "the restarted coordinator", |s| {
        (s.log.recovered > 0).then_some(s.log.recovered)
    });
    eprintln!("{} the coordinator is back on the same state dir, {recovered} commands replayed", cluster.stamp());
    cluster.finish(RUN_LIMIT, &["w1", "w2", "w3"]);
    assert!(cluster.log("coordinator").contains("resumed the run from the command log"));

    let manifests = check_finished_run(&cluster);
    let accepted = support::accepted(&manifests);
    let after = cluster.shard_objects();
    for o in &before {
        assert_eq!(accepted[&o.task()], (o.attempt, o.key.clone()), "{} was redone after the restart", o.task());
        let all: Vec<&str> = after.iter().filter(|a| a.task() == o.task()).map(|a| a.key.as_str()).collect();
        assert_eq!(all, [o.key.as_str()], "{}: another attempt was written after the restart", o.task());
    }
    eprintln!("{} total", cluster.stamp());
}
