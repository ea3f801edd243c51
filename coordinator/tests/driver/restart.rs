//! A coordinator killed and restarted on the same state folder resumes the run: accepted shards stay
//! done, held leases survive until they expire and are then leased again, and a torn log tail from a
//! crash mid-write is cut off rather than refused. A second coordinator on a folder in use, or one
//! started with another run config, is refused.

use std::io::Write;

use iro_coordinator::driver::log::WAL_DIR;
use iro_coordinator::driver::{ManualClock, serve};
use iro_coordinator::error::Error;
use iro_coordinator::state::Plan;
use iro_proto as pb;
use pb::lease_task_response::Outcome;

use crate::support::*;

#[tokio::test]
async fn a_restarted_coordinator_resumes_without_redoing_accepted_shards() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let a = register(&mut client, "pod-a").await;
    let b = register(&mut client, "pod-b").await;
    let first = take(&mut client, &a).await;
    assert!(complete(&mut client, &a, &first).await.accepted);
    let second = take(&mut client, &b).await;
    let index = status(&server).await.log.index;
    server.shutdown().await;

    let server = start(dir.path(), &clock).await;
    let report = status(&server).await;
    assert_eq!((report.log.index, report.log.recovered), (index, index));
    assert_eq!((report.overall_tasks.done, report.overall_tasks.leased), (1, 1));
    assert_eq!(report.workers.len(), 2, "workers are remembered");
    let mut client = crate::support::client(&server).await;
    // The accepted shard is not redone: its completion is still the accepted one.
    let again = complete(&mut client, &a, &first).await;
    assert_eq!(again.fence.unwrap().kind, "already_done");

    // pod-b went away with the coordinator: it is declared dead, and its shard is leased again. Time
    // passes in two steps the driver sees: one jump past half a worker timeout would read as the
    // coordinator having been paused, which holds expiry back.
    clock.advance(WORKER_TIMEOUT_MS / 2);
    status(&server).await;
    clock.advance(WORKER_TIMEOUT_MS / 2);
    let report = wait_for(&server, "the held lease to be taken back", |r| r.phase_tasks.leased == 0).await;
    assert_eq!((report.phase_tasks.done, report.phase_tasks.pending), (1, 1));
    clock.advance(1_000); // the lost task's first backoff
    let retaken = take(&mut client, &a).await;
    assert_eq!((retaken.task_id.as_str(), retaken.attempt), (second.task_id.as_str(), 2));
    assert!(retaken.payload_json.contains(".attempt-2.jsonl"), "a new attempt writes a new key");
    assert!(complete(&mut client, &a, &retaken).await.accepted);
    let late = complete(&mut client, &b, &second).await;
    assert_eq!(late.fence.unwrap().kind, "already_done", "the late attempt 1 is fenced");
    assert_eq!(status(&server).await.phase.as_deref(), Some("train"), "the rollout barrier opened");
    server.shutdown().await;
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_off_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let a = register(&mut client, "pod-a").await;
    let task = take(&mut client, &a).await;
    assert!(complete(&mut client, &a, &task).await.accepted);
    let index = status(&server).await.log.index;
    server.shutdown().await;

    let log = last_segment(dir.path());
    let intact = std::fs::read(&log).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    // A record header claiming 100 bytes, and the first few of them: a batch cut short by a crash.
    file.write_all(&[100, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, b'{', b'"']).unwrap();
    drop(file);

    let server = start(dir.path(), &clock).await;
    let report = status(&server).await;
    assert_eq!(report.log.index, index, "every acknowledged command survived");
    assert_eq!(report.overall_tasks.done, 1);
    assert_eq!(std::fs::read(&log).unwrap(), intact, "the torn record is gone from disk");
    let mut client = crate::support::client(&server).await;
    let next = take(&mut client, &a).await;
    assert_eq!(next.task_id, "iter-1/rollout/1");
    server.shutdown().await;
}

#[tokio::test]
async fn a_state_folder_of_another_plan_is_refused_with_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    start(dir.path(), &clock).await.shutdown().await;
    let mut changed = config(dir.path(), &clock);
    changed.plan = Plan { rollout_shards: 5, ..changed.plan };
    match serve(changed).await {
        Err(Error::StateMismatch { message, .. }) => assert!(message.contains("plan.rollout_shards"), "{message}"),
        other => panic!("expected a state mismatch, got {:?}", other.map(|s| s.grpc_addr())),
    }
}

#[tokio::test]
async fn a_worker_reregistering_under_its_id_gives_up_its_old_lease_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let request = pb::RegisterWorkerRequest { worker_id: "pod-a".into(), ..register_request("pod-a") };
    let a = client.register_worker(request.clone()).await.unwrap().into_inner().worker_id;
    assert_eq!(a, "pod-a");
    let held = take(&mut client, &a).await;
    client.register_worker(request).await.unwrap();
    let report = status(&server).await;
    assert_eq!(report.overall_tasks.leased, 0, "the restarted process's old lease was taken back");
    assert_eq!(report.recent_errors[0].cause, "worker_restarted");
    // The lost task waits out its first backoff (one retry hint).
    clock.advance(1_000);
    match lease(&mut client, &a).await {
        Outcome::Task(task) => assert_eq!((task.task_id, task.attempt), (held.task_id, 2)),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir.join(WAL_DIR)).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    segments.pop().expect("a segment")
}

#[tokio::test]
async fn a_second_coordinator_on_a_state_folder_in_use_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    match serve(config(dir.path(), &clock)).await {
        Err(e @ Error::StateLocked { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&dir.path().display().to_string()), "names the folder: {text}");
            assert!(text.contains(&format!("pid {}", std::process::id())), "names the holder: {text}");
        }
        other => panic!("expected the folder's lock to refuse it, got {:?}", other.map(|s| s.grpc_addr())),
    }
    server.shutdown().await;
    start(dir.path(), &clock).await.shutdown().await;
}

#[tokio::test]
async fn a_restart_with_another_run_config_is_refused_naming_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let original = config(dir.path(), &clock);
    let before = iro_coordinator::driver::config_sha256(&original.run).unwrap();
    serve(original).await.unwrap().shutdown().await;
    let mut changed = config(dir.path(), &clock);
    changed.run.sampling.temperature += 0.25;
    let after = iro_coordinator::driver::config_sha256(&changed.run).unwrap();
    assert_ne!(before, after);
    match serve(changed).await {
        Err(Error::StateMismatch { message, .. }) => {
            assert!(message.contains(&before) && message.contains(&after), "{message}")
        }
        other => panic!("expected a state mismatch, got {:?}", other.map(|s| s.grpc_addr())),
    }
    start(dir.path(), &clock).await.shutdown().await;
}
