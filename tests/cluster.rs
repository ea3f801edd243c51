//! The distributed runtime as an operator runs it: `iro coordinator` and `iro worker` as separate processes
//! on loopback, with a cluster token, on the tiny fixtures. A worker SIGKILLed while it holds a lease loses
//! it and the run still completes with every prompt exactly once; a coordinator SIGKILLed mid-run and
//! restarted on the same state folder resumes without redoing the shards it had accepted; a worker stopped by
//! SIGTERM gives its lease back at once and exits non-zero, so a Job replaces it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use iro_coordinator::status::StatusReport;
use support::{Cluster, ShardObject, accepted, check_finished_run};

/// The whole run, bounded: a debug build on 2 busy cores finishes in well under this.
const RUN_LIMIT: Duration = Duration::from_secs(240);
/// After the run finished, how long its workers may take to learn it (their next LeaseTask) and exit.
const WORKER_EXIT_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// Polls /status until `f` returns Some, panicking after `limit` (or when the coordinator exits first).
fn poll_until<T>(cluster: &mut Cluster, limit: Duration, what: &str, f: impl FnMut(&StatusReport) -> Option<T>) -> T {
    cluster.poll_status(limit, what, f)
}

/// Waits for the run to finish (status `finished`), for every worker still running to exit on its own with
/// success (they learn it from their next LeaseTask), for the coordinator's report, then stops the lingering
/// coordinator with SIGTERM; it must exit with success too.
fn wait_for_the_end(cluster: &mut Cluster, workers: &[&str]) {
    let started = Instant::now();
    let status = poll_until(cluster, RUN_LIMIT, "the end of the run", |s| (s.status != "running").then(|| s.clone()));
    assert_eq!(status.status, "finished", "the run failed: {:?}", status.failure);
    let ran = started.elapsed();
    for name in workers {
        let exit = cluster
            .wait_exit(name, WORKER_EXIT_LIMIT)
            .unwrap_or_else(|| panic!("{name} still runs {WORKER_EXIT_LIMIT:?} after the run finished"));
        assert!(exit.success(), "{name} failed: {exit}");
    }
    let workers_gone = started.elapsed();
    let summary = cluster.run_dir().join("report/summary.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.log("coordinator").contains("report written") {
        assert!(cluster.exited("coordinator").is_none(), "the coordinator exited before writing the report");
        assert!(Instant::now() < deadline, "no report 60 s after the run finished");
        std::thread::sleep(POLL);
    }
    assert!(summary.exists(), "the coordinator logged `report written` but {} is missing", summary.display());
    cluster.terminate("coordinator");
    let exit = cluster.wait_exit("coordinator", Duration::from_secs(20)).expect("the coordinator ignored SIGTERM");
    assert!(exit.success(), "the coordinator failed: {exit}");
    eprintln!(
        "{} run finished {:.1}s after waiting began, workers exited {:.1}s after, coordinator stopped",
        cluster.stamp(),
        ran.as_secs_f64(),
        (workers_gone - ran).as_secs_f64()
    );
}

#[test]
fn a_killed_worker_loses_its_lease_and_the_run_completes() {
    let mut cluster = Cluster::new("kill", 2);
    cluster.start_coordinator();
    for name in ["w1", "w2", "w3"] {
        cluster.start_worker(name);
    }

    // The victim: the first worker seen holding an evaluation shard (every method of iteration 1 on 2 test
    // prompts: the slowest shard task, seconds long), so the kill lands while it holds the lease.
    let (victim, victim_id, task, attempt) =
        poll_until(&mut cluster, Duration::from_secs(120), "a leased eval shard", |s| {
            s.workers.iter().find_map(|w| {
                let task = w.current_task.as_ref().filter(|t| t.contains("/eval/"))?;
                Some((w.name.clone(), w.id.clone(), task.clone(), w.attempt.unwrap_or(0)))
            })
        });
    eprintln!("{} {victim} ({victim_id}) holds {task} attempt {attempt}: killing it", cluster.stamp());
    cluster.kill(&victim);
    let killed_at = Instant::now();

    // The status endpoint shows the dead worker, the lost lease (recent_errors) and the task leased again to
    // another worker under a later attempt. A re-lease too short to be seen between two polls still shows as
    // the lost lease followed by the task's stage completing.
    let (iteration, phase) = {
        let mut parts = task.split('/');
        let iteration: u32 = parts.next().unwrap().trim_start_matches("iter-").parse().unwrap();
        (iteration, parts.next().unwrap().to_owned())
    };
    let tag = cluster.tag;
    let since = |t: Instant| t.elapsed().as_secs_f64();
    let (mut shown_dead, mut shown_lost, mut shown_re_leased) = (None, None, None);
    poll_until(&mut cluster, Duration::from_secs(60), "the dead worker and the re-leased task", |s| {
        let me = s.workers.iter().find(|w| w.id == victim_id).expect("the killed worker left the status report");
        if shown_dead.is_none() && (!me.alive || s.workers_dead >= 1) {
            assert!(!me.alive, "workers_dead = {} but {victim} shows alive", s.workers_dead);
            eprintln!("[{tag}] +{:.1}s: {victim} shown dead (workers_dead = {})", since(killed_at), s.workers_dead);
            shown_dead = Some(since(killed_at));
        }
        if shown_lost.is_none()
            && let Some(e) = s.recent_errors.iter().find(|e| e.task == task)
        {
            assert!(matches!(e.cause.as_str(), "worker_dead" | "lease_expired"), "{task}: {e:?}");
            eprintln!("[{tag}] +{:.1}s: {task} lost its lease: {} ({})", since(killed_at), e.cause, e.message);
            shown_lost = Some(since(killed_at));
        }
        if shown_re_leased.is_none()
            && let Some(w) = s.workers.iter().find(|w| w.id != victim_id && w.current_task.as_deref() == Some(&task))
        {
            assert!(w.attempt.is_some_and(|a| a > attempt), "{task} held by {} at attempt {:?}", w.name, w.attempt);
            eprintln!("[{tag}] +{:.1}s: {task} leased again by {} attempt {:?}", since(killed_at), w.name, w.attempt);
            shown_re_leased = Some(since(killed_at));
        }
        let stage_done = s
            .stages
            .iter()
            .any(|st| st.iteration == iteration && st.phase == phase && st.tasks.done == st.tasks.total());
        (shown_dead.is_some() && (shown_re_leased.is_some() || (shown_lost.is_some() && stage_done))).then_some(())
    });
    eprintln!(
        "[{tag}] status showed: {victim} dead after {:.1}s, {task} lost after {:?}s, leased again after {:?}s",
        shown_dead.unwrap(),
        shown_lost,
        shown_re_leased
    );

    let survivors: Vec<&str> = ["w1", "w2", "w3"].into_iter().filter(|n| *n != victim).collect();
    wait_for_the_end(&mut cluster, &survivors);

    let manifests = check_finished_run(&cluster);
    let accepted = accepted(&manifests);
    let (got_attempt, key) = &accepted[&task];
    assert!(*got_attempt > attempt, "{task}: attempt {got_attempt} accepted ({key}); the killed attempt was {attempt}");
    eprintln!("[{tag}] {task} accepted at attempt {got_attempt}: {key}");
    eprintln!("{} total", cluster.stamp());
}

#[test]
fn a_restarted_coordinator_resumes_without_redoing_accepted_shards() {
    let mut cluster = Cluster::new("restart", 2);
    cluster.start_coordinator();
    for name in ["w1", "w2"] {
        cluster.start_worker(name);
    }

    // Wait until a rollout shard of iteration 1 is accepted, and kill the coordinator while a worker holds a
    // lease if that is seen soon after. Which shards are accepted: in each sharded stage with none pending,
    // those that no worker holds (accepted stays accepted, so they still are at the kill just after).
    let shards = |phase: &str| {
        let c = &cluster.config;
        let prompts = if phase == "rollout" { c.data.prompts_per_iteration } else { c.data.test_prompts };
        u32::try_from(prompts.div_ceil(c.cluster.shard_size)).unwrap()
    };
    let (rollout_shards, eval_shards) = (shards("rollout"), shards("eval"));
    let mut first_accepted: Option<Instant> = None;
    let (accepted_before, in_flight) =
        poll_until(&mut cluster, Duration::from_secs(120), "an accepted rollout shard of iteration 1", |s| {
            let stage = s.stages.iter().find(|st| st.iteration == 1 && st.phase == "rollout")?;
            if stage.tasks.done == 0 {
                return None;
            }
            let first = *first_accepted.get_or_insert_with(Instant::now);
            let held: BTreeSet<String> = s.workers.iter().filter_map(|w| w.current_task.clone()).collect();
            if held.is_empty() && first.elapsed() < Duration::from_secs(10) {
                return None;
            }
            let mut done = BTreeSet::new();
            for st in s.stages.iter().filter(|st| st.phase != "train") {
                if st.tasks.done == 0 || st.tasks.pending > 0 || st.tasks.failed > 0 {
                    continue;
                }
                let n = if st.phase == "rollout" { rollout_shards } else { eval_shards };
                let tasks: Vec<String> = (0..n)
                    .map(|i| format!("iter-{}/{}/{i}", st.iteration, st.phase))
                    .filter(|t| !held.contains(t))
                    .collect();
                assert_eq!(tasks.len() as u64, st.tasks.done, "done {tasks:?} vs {:?}", st.tasks);
                done.extend(tasks);
            }
            (!done.is_empty()).then_some((done, held))
        });
    cluster.kill("coordinator");
    let tag = cluster.tag;
    let objects_at_kill: Vec<ShardObject> = cluster.shard_objects();
    eprintln!("[{tag}] accepted before the kill: {accepted_before:?}; leased then: {in_flight:?}");
    eprintln!("[{tag}] shard objects at the kill: {:?}", objects_at_kill.iter().map(|o| &o.key).collect::<Vec<_>>());
    let at_kill: BTreeMap<String, ShardObject> = objects_at_kill.iter().map(|o| (o.task(), o.clone())).collect();
    assert_eq!(at_kill.len(), objects_at_kill.len(), "one object per shard before the kill");
    for task in &accepted_before {
        assert!(at_kill.contains_key(task), "{task} was accepted but has no object in the store");
    }

    // The workers keep retrying (their reconnect window is minutes); a new coordinator on the same state
    // folder and ports replays the command log.
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    cluster.start_coordinator();
    let recovered = poll_until(&mut cluster, Duration::from_secs(60), "the restarted coordinator", |s| {
        (s.log.recovered > 0).then_some(s.log.recovered)
    });
    eprintln!("{} the coordinator is back, {recovered} commands replayed", cluster.stamp());
    // Both workers carry on under the ids they registered with before the restart (no new registration),
    // each heard from since this coordinator process started.
    poll_until(&mut cluster, Duration::from_secs(60), "both workers talking to the new coordinator", |s| {
        let uptime_ms = (s.uptime_s * 1000.0) as u64;
        (s.workers.len() == 2 && s.workers.iter().all(|w| w.alive && w.last_heartbeat_age_ms < uptime_ms)).then_some(())
    });
    eprintln!("{} both workers reconnected after {:.1}s", cluster.stamp(), restarted.elapsed().as_secs_f64());

    wait_for_the_end(&mut cluster, &["w1", "w2"]);
    assert!(cluster.log("coordinator").contains("resumed the run from the command log"));

    let manifests = check_finished_run(&cluster);
    let accepted = accepted(&manifests);
    let final_objects = cluster.shard_objects();
    for task in &accepted_before {
        let before = &at_kill[task];
        let (attempt, key) = &accepted[task];
        assert_eq!((*attempt, key), (before.attempt, &before.key), "{task} was redone after the restart");
        let attempts: Vec<&str> = final_objects.iter().filter(|o| o.task() == *task).map(|o| o.key.as_str()).collect();
        assert_eq!(attempts, [before.key.as_str()], "{task}: another attempt was written after the restart");
    }
    // Leases in flight at the kill, and shards written but not yet accepted then: say what became of them.
    for task in &in_flight {
        match accepted.get(task) {
            Some((attempt, key)) => eprintln!("[{tag}] {task}: leased at the kill, accepted attempt {attempt} ({key})"),
            None => eprintln!("[{tag}] {task}: leased at the kill (no manifest: not a shard task), finished"),
        }
    }
    for (task, o) in &at_kill {
        if !accepted_before.contains(task) {
            eprintln!("[{tag}] {task}: {} at the kill, accepted {:?}", o.key, accepted[task]);
        }
    }
    eprintln!("{} total", cluster.stamp());
}

#[test]
fn a_worker_stopped_by_sigterm_gives_its_lease_back_and_exits_to_be_replaced() {
    let mut cluster = Cluster::new("term", 1);
    cluster.start_coordinator();
    cluster.start_worker("w1");
    // An eval shard: a tiny rollout shard can finish in the moment between the status read and the signal, and
    // then there is no lease left to give back.
    let (task, attempt) = poll_until(&mut cluster, Duration::from_secs(120), "a leased eval task", |s| {
        s.workers.iter().find_map(|w| {
            let task = w.current_task.clone().filter(|t| t.contains("/eval/"))?;
            Some((task, w.attempt?))
        })
    });
    cluster.terminate("w1");
    let stopped = Instant::now();
    let exit = cluster.wait_exit("w1", Duration::from_secs(30)).expect("w1 ignored SIGTERM");
    // Not a success: a Kubernetes Job would count the index as complete and never replace the worker.
    assert_eq!(exit.code(), Some(75), "w1 exited with {exit}");
    // The lease came back with the worker's word (at once; an expiry would take heartbeats and leave a
    // `lease_expired` / `worker_dead` error behind; a release is not an error).
    let tag = cluster.tag;
    poll_until(&mut cluster, Duration::from_secs(10), "the lease given back", |s| {
        s.stages.iter().all(|st| st.tasks.leased == 0).then_some(())
    });
    let back = stopped.elapsed();
    eprintln!("[{tag}] {task} attempt {attempt} back {:.1}s after SIGTERM", back.as_secs_f64());
    assert!(back < Duration::from_secs(5), "{task} took {back:?} to come back");
    assert!(cluster.log("w1").contains("released the lease"), "w1 did not release its lease");
    // Once the coordinator has given w1 up for dead, a lease it still held would show up as lost.
    let errors = poll_until(&mut cluster, Duration::from_secs(60), "w1 shown dead", |s| {
        s.workers.iter().any(|w| w.name == "w1" && !w.alive).then(|| s.recent_errors.clone())
    });
    assert!(errors.iter().all(|e| e.task != task), "{task} was lost, not released: {errors:?}");
    // A replacement worker finishes the run.
    cluster.start_worker("w2");
    wait_for_the_end(&mut cluster, &["w2"]);
    check_finished_run(&cluster);
}
