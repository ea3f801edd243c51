//! Tests of the driver behind its handle, with the in-memory log and a manual clock: no sockets.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::actor::{self, DriverOptions, Handle};
use super::clock::ManualClock;
use super::log::{CommandLog, FileLog, MemoryLog, OLD_LOG_FILE, Recovered, SNAP_DIR, WAL_DIR};
use crate::error::Error;
use crate::plan::Phase;
use crate::state::{Command, Lease, Plan, Reply, Resources, TaskId, TaskState, WorkerId};

const T0: u64 = 1_000_000;

fn plan() -> Plan {
    let mut plan = Plan::new(1, 3, 1, 1);
    plan.lease_ms = 1_000;
    plan.heartbeat_interval_ms = 100;
    plan.worker_timeout_ms = 10_000;
    plan
}

async fn start(log: &MemoryLog, clock: &ManualClock, grace: u64) -> Handle {
    let options = DriverOptions { restart_grace_ms: Some(grace), ..Default::default() };
    actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, None).await.unwrap().0
}

async fn register(handle: &Handle, id: &str) -> WorkerId {
    let resources = Resources { device: "cpu".into(), ..Resources::default() };
    match handle.register(Some(WorkerId::new(id)), id.into(), resources).await.unwrap().reply {
        Reply::Registered { worker_id, .. } => worker_id,
        other => panic!("{other:?}"),
    }
}

async fn lease(handle: &Handle, worker: &WorkerId) -> Lease {
    match handle.apply(Command::LeaseTask { worker_id: worker.clone(), now_ms: 0 }).await.unwrap().reply {
        Reply::Lease(lease) => lease,
        other => panic!("{other:?}"),
    }
}

async fn task_state(handle: &Handle, task: TaskId) -> TaskState {
    handle.read(move |v| v.state.task(task).unwrap().state.clone()).await.unwrap()
}

/// Waits (in real time, briefly) for the driver's timer to react to a clock move.
async fn eventually(handle: &Handle, task: TaskId, want: impl Fn(&TaskState) -> bool) -> TaskState {
    for _ in 0..200 {
        let state = task_state(handle, task).await;
        if want(&state) {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task_state(handle, task).await
}

#[tokio::test]
async fn applied_commands_are_logged_with_the_clock_time_and_refused_ones_are_not() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let worker = register(&handle, "w-a").await;
    clock.advance(5);
    assert!(matches!(lease(&handle, &worker).await, Lease::Task { .. }));
    let refused = handle.apply(Command::LeaseTask { worker_id: WorkerId::new("ghost"), now_ms: 0 }).await;
    assert!(matches!(refused, Err(Error::UnknownWorker { .. })));
    let entries = log.entries();
    assert_eq!(entries.len(), 2, "register and lease, not the refused lease: {entries:?}");
    assert_eq!(entries[0].now_ms(), T0);
    assert_eq!(entries[1].now_ms(), T0 + 5, "the driver stamps its clock, whatever the caller put in");
    assert_eq!(handle.read(|v| v.log_index).await.unwrap(), 2);
}

#[tokio::test]
async fn the_timer_expires_a_lease_once_the_clock_passes_its_deadline() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let worker = register(&handle, "w-a").await;
    let Lease::Task { task_id, deadline_ms, .. } = lease(&handle, &worker).await else { panic!() };
    clock.set(deadline_ms - 1);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(matches!(task_state(&handle, task_id).await, TaskState::Leased { .. }), "not expired before the deadline");
    clock.set(deadline_ms);
    let state = eventually(&handle, task_id, |s| *s == TaskState::Pending).await;
    assert_eq!(state, TaskState::Pending, "the timer sent ExpireLeases at the deadline");
    assert!(log.entries().iter().any(|c| matches!(c, Command::ExpireLeases { now_ms } if *now_ms == deadline_ms)));
}

#[tokio::test]
async fn a_restart_on_the_same_log_rebuilds_the_same_state() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let worker = register(&handle, "w-a").await;
    let Lease::Task { task_id, attempt, .. } = lease(&handle, &worker).await else { panic!() };
    let output = crate::state::Output { key: "k".into(), sha256: "0".repeat(64), records: 3, tokens: 9 };
    handle
        .apply(Command::CompleteTask { worker_id: worker.clone(), task_id, attempt, output, now_ms: 0 })
        .await
        .unwrap();
    lease(&handle, &worker).await;
    let before = handle.read(|v| v.state.digest()).await.unwrap();
    handle.stop().await;
    assert!(matches!(handle.snapshot().await, Err(Error::Unavailable { .. })), "a stopped driver says so");

    let restarted = start(&log, &clock, 0).await;
    assert_eq!(restarted.read(|v| v.state.digest()).await.unwrap(), before);
    assert!(matches!(task_state(&restarted, task_id).await, TaskState::Done(_)));
}

#[tokio::test]
async fn after_a_restart_nothing_expires_before_the_grace_period_ends() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let worker = register(&handle, "w-a").await;
    let Lease::Task { task_id, deadline_ms, .. } = lease(&handle, &worker).await else { panic!() };
    handle.stop().await;

    // The coordinator was down past the lease's deadline.
    clock.set(deadline_ms + 5_000);
    let restarted = start(&log, &clock, 2_000).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(matches!(task_state(&restarted, task_id).await, TaskState::Leased { .. }), "held during the grace");
    clock.advance(1_500);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(matches!(task_state(&restarted, task_id).await, TaskState::Leased { .. }), "still within the grace");
    // The worker checks in within the grace and renews its lease: nothing is lost.
    let reply = restarted
        .apply(Command::Heartbeat {
            worker_id: worker.clone(),
            lease: Some(crate::state::LeaseRef { task_id, attempt: 1 }),
            progress: Default::default(),
            now_ms: 0,
        })
        .await
        .unwrap()
        .reply;
    assert!(matches!(reply, Reply::LeaseExtended { .. }), "{reply:?}");
    clock.advance(500);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(matches!(task_state(&restarted, task_id).await, TaskState::Leased { .. }), "the renewed lease holds");
    clock.advance(500);
    assert_eq!(eventually(&restarted, task_id, |s| *s == TaskState::Pending).await, TaskState::Pending);
}

#[tokio::test]
async fn a_failed_log_write_refuses_that_command_and_every_later_one() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let worker = register(&handle, "w-a").await;
    log.fail_appends(true);
    let refused = handle.apply(Command::LeaseTask { worker_id: worker.clone(), now_ms: 0 }).await;
    assert!(matches!(refused, Err(Error::Unavailable { .. })), "{refused:?}");
    log.fail_appends(false);
    let later = handle.apply(Command::LeaseTask { worker_id: worker.clone(), now_ms: 0 }).await;
    assert!(matches!(later, Err(Error::Unavailable { .. })), "no command is served once state and log diverged");
    let error = handle.read(|v| v.telemetry.log_error.clone()).await.unwrap();
    assert!(error.unwrap().contains("appends made to fail"));
    assert_eq!(log.entries().len(), 1, "only the registration is durable");
}

#[tokio::test]
async fn concurrent_commands_share_log_writes() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let handle = start(&log, &clock, 0).await;
    let mut calls = Vec::new();
    for i in 0..64 {
        let handle = handle.clone();
        calls.push(tokio::spawn(async move { register(&handle, &format!("w-{i}")).await }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let (entries, batches) = handle.read(|v| (v.telemetry.log_entries, v.telemetry.log_batches)).await.unwrap();
    assert_eq!(entries, 64);
    assert!(batches <= 64, "{batches} batches");
}

const HASH: &str = "config-hash-a";

fn open(dir: &Path) -> FileLog {
    FileLog::open(dir, "run-a", &plan(), HASH).unwrap()
}

/// Opens and loads, returning the log and every recovered entry's command.
fn reopen(dir: &Path) -> (FileLog, Vec<Command>) {
    let mut log = open(dir);
    let mut commands = Vec::new();
    log.load(&mut |item| {
        if let Recovered::Entry { command, .. } = item {
            commands.push(command);
        }
        Ok(())
    })
    .unwrap();
    (log, commands)
}

fn expire(now_ms: u64) -> Command {
    Command::ExpireLeases { now_ms }
}

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let segments = open_segments(dir);
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments[0].1.clone()
}

fn open_segments(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut found: Vec<_> = std::fs::read_dir(dir.join(WAL_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().parse::<u64>().unwrap(), p))
        .collect();
    found.sort();
    found
}

#[test]
fn a_torn_last_batch_is_dropped_whole_and_appending_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let first = [expire(1), expire(2)];
    let last = [expire(3), expire(4), expire(5)];
    {
        let (mut log, loaded) = reopen(dir.path());
        assert!(loaded.is_empty());
        log.append(&first).unwrap();
        log.append(&last).unwrap();
    }
    let path = only_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let mut intact = {
        let (_, loaded) = reopen(dir.path());
        assert_eq!(loaded.len(), 5);
        full.clone()
    };
    // Only the last batch can be torn (each ends with an fsync): cut it at every length, and also keep
    // its length but zero its middle (pages reaching disk out of order, review A7 a).
    let (_, small) = {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = reopen(d.path());
        log.append(&first).unwrap();
        let len = std::fs::read(only_segment(d.path())).unwrap().len();
        (d, len)
    };
    intact.truncate(small);
    let mut zeroed = full.clone();
    let middle = small + (full.len() - small) / 2;
    zeroed[middle - 8..middle + 8].fill(0);
    for torn in [full[..full.len() - 1].to_vec(), full[..small + 5].to_vec(), full[..small + 12].to_vec(), zeroed] {
        std::fs::write(&path, &torn).unwrap();
        let (mut log, loaded) = reopen(dir.path());
        assert_eq!(loaded, first.to_vec(), "the torn batch is dropped whole, the one before it kept");
        assert_eq!(std::fs::read(&path).unwrap(), intact, "the torn tail is truncated on disk");
        assert_eq!(log.last_index(), 2);
        log.append(&last).unwrap();
        drop(log);
        let (log, loaded) = reopen(dir.path());
        assert_eq!(loaded.len(), 5, "appends resume after the cut");
        assert_eq!(log.entries(2..5).unwrap(), vec![expire(2), expire(3), expire(4)], "read back by index");
    }
}

#[test]
fn a_flipped_byte_before_the_tail_is_corruption_naming_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    {
        let (mut log, _) = reopen(dir.path());
        for batch in [[expire(1), expire(2)], [expire(13), expire(14)], [expire(25), expire(26)]] {
            log.append(&batch).unwrap();
            ends.push(std::fs::metadata(only_segment(dir.path())).unwrap().len());
        }
    }
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // A digit in the second batch: it still parses as JSON, so only the checksum can tell.
    let at = ends[0] as usize + 8 + 13 + r#"{"ExpireLeases":{"now_ms":1"#.len();
    assert_eq!(bytes[at], b'3', "the last digit of 13");
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let mut log = open(dir.path());
    match log.load(&mut |_| Ok(())) {
        Err(Error::CorruptLog { path: named, offset, message }) => {
            assert_eq!(named, path.display().to_string());
            assert_eq!(offset, ends[0], "the offset of the damaged record: {message}");
            assert!(message.contains("checksum") && message.contains(&format!("byte {}", ends[1])), "{message}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut from a corrupt log");
}

#[test]
fn a_second_log_on_the_same_folder_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    match FileLog::open(dir.path(), "run-a", &plan(), HASH) {
        Err(e @ Error::StateLocked { .. }) => {
            assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}")
        }
        other => panic!("expected the lock to refuse it, got {other:?}"),
    }
    drop(first);
    open(dir.path());
}

#[test]
fn a_folder_of_another_plan_run_or_config_is_refused_naming_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let mut other = plan();
    other.lease_ms = 5;
    match FileLog::open(dir.path(), "run-a", &other, HASH) {
        Err(Error::StateMismatch { message, .. }) => assert!(message.contains("plan.lease_ms"), "{message}"),
        other => panic!("{other:?}"),
    }
    match FileLog::open(dir.path(), "run-b", &plan(), HASH) {
        Err(Error::StateMismatch { message, .. }) => assert!(message.contains("run_id"), "{message}"),
        other => panic!("{other:?}"),
    }
    match FileLog::open(dir.path(), "run-a", &plan(), "config-hash-b") {
        Err(Error::StateMismatch { message, .. }) => {
            assert!(message.contains("config-hash-a") && message.contains("config-hash-b"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_format_1_json_lines_log_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meta.json"), r#"{"format":1,"run_id":"run-a","plan":{}}"#).unwrap();
    std::fs::write(dir.path().join(OLD_LOG_FILE), serde_json::to_string(&expire(1)).unwrap() + "\n").unwrap();
    match FileLog::open(dir.path(), "run-a", &plan(), HASH) {
        Err(Error::StateMismatch { message, .. }) => {
            assert!(message.contains("commands.jsonl") && message.contains("new state folder"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

async fn start_on(log: FileLog, clock: &ManualClock, every: u64) -> (Handle, tokio::task::JoinHandle<()>) {
    let options = DriverOptions { restart_grace_ms: Some(0), snapshot_every: Some(every), ..Default::default() };
    actor::start(plan(), Box::new(log), Arc::new(clock.clone()), options, None).await.unwrap()
}

async fn state_json(handle: &Handle) -> String {
    handle.read(|v| serde_json::to_string(v.state).unwrap()).await.unwrap()
}

#[tokio::test]
async fn snapshots_compact_the_log_and_a_restart_rebuilds_the_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    const EVERY: u64 = 20;
    let (handle, task) = start_on(open(dir.path()), &clock, EVERY).await;
    // Registrations change the state whatever gets logged or not, so the count of entries is known.
    let mut workers = Vec::new();
    for i in 0..90 {
        clock.advance(1);
        workers.push(register(&handle, &format!("w-{i:03}")).await);
    }
    let Lease::Task { task_id, attempt, .. } = lease(&handle, &workers[0]).await else { panic!() };
    let output = crate::state::Output { key: "k".into(), sha256: "0".repeat(64), records: 3, tokens: 9 };
    let worker_id = workers[0].clone();
    handle.apply(Command::CompleteTask { worker_id, task_id, attempt, output, now_ms: 0 }).await.unwrap();
    lease(&handle, &workers[1]).await;
    let live = state_json(&handle).await;
    let index = handle.read(|v| v.log_index).await.unwrap();
    assert!(index >= 90 + 3, "{index}");
    handle.stop().await;
    task.await.unwrap();

    let snapshots: Vec<_> = std::fs::read_dir(dir.path().join(SNAP_DIR)).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(snapshots.len(), 2, "the newest two snapshots are kept: {snapshots:?}");
    let segments = open_segments(dir.path());
    assert!(segments[0].0 > 2 * EVERY, "segments behind the older kept snapshot are deleted: {segments:?}");
    assert!(segments.len() <= 3, "{segments:?}");

    let (restarted, task) = start_on(open(dir.path()), &clock, EVERY).await;
    assert_eq!(state_json(&restarted).await, live, "snapshot + later segments rebuild the live state");
    assert_eq!(restarted.read(|v| v.log_index).await.unwrap(), index);
    // The run goes on from there, and a second restart agrees again.
    register(&restarted, "w-late").await;
    let live = state_json(&restarted).await;
    restarted.stop().await;
    task.await.unwrap();

    // A newest snapshot that fails its checksum is skipped for the one before it and the segments after.
    let mut snapshots: Vec<_> =
        std::fs::read_dir(dir.path().join(SNAP_DIR)).unwrap().map(|e| e.unwrap().path()).collect();
    snapshots.sort();
    let newest = snapshots.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(newest, bytes).unwrap();
    let (again, task) = start_on(open(dir.path()), &clock, 0).await;
    assert_eq!(state_json(&again).await, live);
    again.stop().await;
    task.await.unwrap();
}

#[tokio::test]
async fn the_memory_log_snapshots_and_compacts_too() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let options = DriverOptions { restart_grace_ms: Some(0), snapshot_every: Some(10), ..Default::default() };
    let (handle, task) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options.clone(), None).await.unwrap();
    for i in 0..25 {
        register(&handle, &format!("w-{i}")).await;
    }
    let live = state_json(&handle).await;
    handle.stop().await;
    task.await.unwrap();
    // The first snapshot at entry 10, the next at 20 or (with the first still being written) a bit later.
    let index = log.snapshot_index().unwrap();
    assert!((20..25).contains(&index), "{index}");
    assert_eq!(log.entries().len() as u64, 25 - index, "entries the snapshot covers are dropped");
    match CommandLog::entries(&log, 3..4) {
        Err(Error::LogCompacted { index: 3, first }) => assert_eq!(first, index + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(CommandLog::entries(&log, 25..26).unwrap().len(), 1);
    let (restarted, _) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, None).await.unwrap();
    assert_eq!(state_json(&restarted).await, live);
}

#[test]
fn task_payloads_give_prompt_ranges_and_attempt_specific_keys() {
    let mut config = iro_common::RunConfig::default();
    config.run.id = "demo".into();
    config.data.prompts_per_iteration = 100;
    config.cluster.shard_size = 64;
    let payloads = super::wire::Payloads::new(&config).unwrap();
    let json: serde_json::Value = serde_json::from_str(&payloads.json(TaskId::new(2, Phase::Rollout, 1), 3)).unwrap();
    assert_eq!(json["prompt_start"], 64);
    assert_eq!(json["prompt_end"], 100);
    assert_eq!(json["output_key"], "runs/demo/iter-2/rollout/shard-00001.attempt-3.jsonl");
    let json: serde_json::Value = serde_json::from_str(&payloads.json(TaskId::new(1, Phase::Train, 0), 1)).unwrap();
    assert_eq!(json["value_dir"], "runs/demo/iter-1/value");
}

/// Completes the leased rollout shard with an output at its layout key (the object is not written).
async fn complete_at_layout_key(handle: &Handle, worker: &WorkerId, layout: &iro_common::layout::RunLayout) {
    let Lease::Task { task_id, attempt, .. } = lease(handle, worker).await else { panic!("expected a shard") };
    let key = layout.shard(task_id.iteration, iro_common::layout::ShardedPhase::Rollout, task_id.shard, attempt);
    let output = crate::state::Output { key, sha256: "0".repeat(64), records: 1, tokens: 2 };
    let reply = handle
        .apply(Command::CompleteTask { worker_id: worker.clone(), task_id, attempt, output, now_ms: 0 })
        .await
        .unwrap()
        .reply;
    assert!(matches!(reply, Reply::Accepted { .. }), "{reply:?}");
}

#[tokio::test]
async fn the_next_stage_is_not_leased_before_the_manifest_it_reads_is_written() {
    use iro_common::layout::{RunLayout, ShardedPhase};
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let store = iro_common::store::Store::in_memory();
    let layout = RunLayout::new("gate").unwrap();
    let publisher = super::manifests::Publisher::start(store.clone(), "gate").unwrap();
    let options = DriverOptions { restart_grace_ms: Some(0), ..Default::default() };
    let (handle, _) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, Some(publisher)).await.unwrap();
    let worker = register(&handle, "w-a").await;
    for _ in 0..3 {
        complete_at_layout_key(&handle, &worker, &layout).await;
    }
    // The shard objects are not in the store yet, so the manifest cannot be written: the train task waits.
    for _ in 0..3 {
        match lease(&handle, &worker).await {
            Lease::RetryAfter { reason: crate::state::WaitReason::PhaseBarrier, .. } => {}
            other => panic!("expected to be held back, got {other:?}"),
        }
    }
    let train = TaskId::new(1, Phase::Train, 0);
    assert_eq!(task_state(&handle, train).await, TaskState::Pending, "nothing was leased while held back");
    assert!(!store.exists(&layout.manifest(1, ShardedPhase::Rollout)).await.unwrap());
    // The status page says why, naming the manifest and the missing shard object.
    let manifest_key = layout.manifest(1, ShardedPhase::Rollout);
    let mut why = None;
    for _ in 0..100 {
        why = handle.read(|v| crate::status::report("gate", v).leases_held_back).await.unwrap();
        if why.as_deref().is_some_and(|w| w.contains(&manifest_key)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = why.expect("the status report names no reason while leases are held back");
    assert!(why.contains(&manifest_key) && why.contains("shard-00000"), "{why}");

    for shard in 0..3 {
        store.put(&layout.shard(1, ShardedPhase::Rollout, shard, 1), vec![b'x'; shard as usize + 1]).await.unwrap();
    }
    let mut leased = None;
    for _ in 0..100 {
        match lease(&handle, &worker).await {
            Lease::RetryAfter { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
            other => {
                leased = Some(other);
                break;
            }
        }
    }
    assert!(matches!(leased, Some(Lease::GangRank { .. })), "the train task once the manifest is written: {leased:?}");
    let why = handle.read(|v| crate::status::report("gate", v).leases_held_back).await.unwrap();
    assert_eq!(why, None, "leases flow again, the status page must say nothing is held back");
    let manifest = iro_common::records::read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap();
    assert!(manifest.is_complete());
    assert_eq!(manifest.shards.iter().map(|e| e.bytes).collect::<Vec<_>>(), [1, 2, 3], "sizes come from the store");
    handle.stop().await;

    // A restart writes the manifests of finished stages again (here: after someone deleted it).
    store.delete(&layout.manifest(1, ShardedPhase::Rollout)).await.unwrap();
    let publisher = super::manifests::Publisher::start(store.clone(), "gate").unwrap();
    let options = DriverOptions { restart_grace_ms: Some(0), ..Default::default() };
    let (restarted, _) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, Some(publisher)).await.unwrap();
    for _ in 0..100 {
        if store.exists(&layout.manifest(1, ShardedPhase::Rollout)).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = iro_common::records::read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap();
    assert_eq!(again, manifest, "the same manifest, rewritten");
    restarted.stop().await;
}
