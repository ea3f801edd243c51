//! Three `iro coordinator` replicas (Raft, issue 14) and two real `iro worker`s as separate processes on
//! loopback, on the tiny fixtures. The leader is SIGKILLed while a worker holds a lease: a follower takes
//! over, the workers follow it (they were given every replica's URL), nothing the old leader acknowledged
//! is lost, the killed replica rejoins on its state folder and catches up, and the run finishes with every
//! prompt exactly once and the report written by the leader. Prints the failover times.

mod support;

use std::time::{Duration, Instant};

use support::{Cluster, brief, check_finished_run};

const RUN_LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);

fn wait<T>(cluster: &mut Cluster, limit: Duration, what: &str, mut f: impl FnMut(&mut Cluster) -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = f(cluster) {
            return found;
        }
        assert!(Instant::now() < deadline, "no {what} within {limit:?}");
        std::thread::sleep(POLL);
    }
}

#[test]
fn a_sigkilled_leader_loses_nothing_and_the_run_finishes_on_its_successor() {
    let mut cluster = Cluster::new("raft", 1);
    cluster.start_replicas();
    let first = wait(&mut cluster, Duration::from_secs(30), "first leader", |c| c.leader());
    eprintln!("{} replica {first} leads", cluster.stamp());
    for name in ["w1", "w2"] {
        cluster.start_worker(name);
    }

    // A rollout shard accepted and a lease held: then the leader dies with completions in flight.
    let mut last = String::new();
    let before = wait(&mut cluster, Duration::from_secs(180), "an accepted shard and a held lease", |c| {
        let s = c.status()?;
        let line = brief(&s);
        if line != last {
            eprintln!("{} {line}", c.stamp());
            last = line;
        }
        let held = s.workers.iter().any(|w| w.current_task.is_some());
        (s.overall_tasks.done >= 1 && held).then_some(s)
    });
    let killed = Instant::now();
    cluster.kill(&format!("coordinator-{first}"));

    let second = wait(&mut cluster, Duration::from_secs(30), "a new leader", |c| c.leader().filter(|id| *id != first));
    let elected_s = killed.elapsed().as_secs_f64();
    let after = cluster.status().expect("the new leader answers");
    assert!(
        after.overall_tasks.done >= before.overall_tasks.done,
        "an acknowledged completion was lost: {} done before the kill, {} on the new leader",
        before.overall_tasks.done,
        after.overall_tasks.done
    );
    let accepted_s = wait(&mut cluster, Duration::from_secs(120), "a task accepted by the new leader", |c| {
        let s = c.status()?;
        (s.overall_tasks.done > after.overall_tasks.done || s.status != "running")
            .then(|| killed.elapsed().as_secs_f64())
    });
    eprintln!(
        "{} failover: replica {second} leads {elected_s:.2} s after replica {first} was SIGKILLed; the next task \
         accepted {accepted_s:.2} s after the kill",
        cluster.stamp()
    );

    // The killed replica comes back on its folder and catches up.
    cluster.start_replica(first);
    let status = wait(&mut cluster, RUN_LIMIT, "the end of the run", |c| {
        let s = c.status()?;
        let line = brief(&s);
        if line != last {
            eprintln!("{} {line}", c.stamp());
            last = line;
        }
        (s.status != "running").then_some(s)
    });
    assert_eq!(status.status, "finished", "the run failed: {:?}", status.failure);
    for name in ["w1", "w2"] {
        let exit = cluster.wait_exit(name, Duration::from_secs(30)).unwrap_or_else(|| panic!("{name} still runs"));
        assert!(exit.success(), "{name} exited with {exit}");
    }
    let applied = wait(&mut cluster, Duration::from_secs(30), "every replica at the same applied index", |c| {
        let statuses = c.replica_statuses();
        let indexes: Vec<u64> = statuses.values().filter_map(|s| s.raft.as_ref().map(|r| r.applied_index)).collect();
        let finished = statuses.values().all(|s| s.status == "finished");
        (indexes.len() == 3 && finished && indexes.iter().all(|i| *i == indexes[0])).then_some(indexes[0])
    });
    eprintln!("{} all three replicas finished at applied index {applied}", cluster.stamp());
    // The report is written once the leader has published every manifest.
    wait(&mut cluster, Duration::from_secs(60), "the report", |c| {
        c.run_dir().join("report/summary.json").exists().then_some(())
    });
    check_finished_run(&cluster);
}

/// The leader frozen for 10 s (SIGSTOP: a paused VM, a stalled disk) while its peers can reach each other:
/// they elect a new leader and the run goes on; the old one, thawed, steps down and follows. Then all three
/// replicas are SIGKILLed at once and restarted on their folders: the run resumes from the Raft logs.
#[test]
fn a_frozen_leader_is_replaced_and_three_replicas_killed_at_once_resume() {
    let mut cluster = Cluster::new("raft-stop", 1);
    cluster.start_replicas();
    let first = wait(&mut cluster, Duration::from_secs(30), "first leader", |c| c.leader());
    for name in ["w1", "w2"] {
        cluster.start_worker(name);
    }
    wait(&mut cluster, Duration::from_secs(180), "a held lease", |c| {
        c.status().filter(|s| s.workers.iter().any(|w| w.current_task.is_some())).map(|_| ())
    });
    let leader = format!("coordinator-{first}");
    cluster.signal(&leader, "STOP");
    let stopped = Instant::now();
    let second = wait(&mut cluster, Duration::from_secs(30), "a leader besides the frozen one", |c| {
        c.leader().filter(|id| *id != first)
    });
    eprintln!(
        "{} replica {second} leads {:.2} s after replica {first} froze",
        cluster.stamp(),
        stopped.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    cluster.signal(&leader, "CONT");
    // Thawed, it hears the higher term and follows: one leader, the others agreeing.
    wait(&mut cluster, Duration::from_secs(30), "the thawed replica following", |c| {
        let statuses = c.replica_statuses();
        let thawed = statuses.get(&first)?.raft.clone()?;
        (thawed.role == "follower" && thawed.leader.is_some_and(|l| l != first)).then_some(())
    });

    // Progress under the new leader, then every replica killed at once.
    let done = cluster.status().map_or(0, |s| s.overall_tasks.done);
    wait(&mut cluster, Duration::from_secs(120), "a task accepted after the freeze", |c| {
        c.status().filter(|s| s.overall_tasks.done > done || s.status != "running").map(|_| ())
    });
    let before = cluster.status().expect("the leader answers");
    for id in 1..=3 {
        cluster.kill(&format!("coordinator-{id}"));
    }
    for id in 1..=3 {
        cluster.start_replica(id);
    }
    let after = wait(&mut cluster, Duration::from_secs(30), "a leader after the restart", |c| c.status());
    assert!(
        after.overall_tasks.done >= before.overall_tasks.done,
        "acknowledged completions were lost: {} before the restart, {} after",
        before.overall_tasks.done,
        after.overall_tasks.done
    );
    let status = wait(&mut cluster, RUN_LIMIT, "the end of the run", |c| c.status().filter(|s| s.status != "running"));
    assert_eq!(status.status, "finished", "the run failed: {:?}", status.failure);
    for name in ["w1", "w2"] {
        let exit = cluster.wait_exit(name, Duration::from_secs(60)).unwrap_or_else(|| panic!("{name} still runs"));
        assert!(exit.success(), "{name} exited with {exit}");
    }
    wait(&mut cluster, Duration::from_secs(60), "the report", |c| {
        c.run_dir().join("report/summary.json").exists().then_some(())
    });
    check_finished_run(&cluster);
}
