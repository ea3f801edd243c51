//! Tests of the driver behind its handle, with the in-memory log and a manual clock: no sockets.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::actor::{self, DriverOptions, Handle};
use super::clock::ManualClock;
use super::log::{CommandLog, FileLog, Loaded, MemoryLog, OLD_LOG_FILE, Recovered, SNAP_DIR, SnapshotJob, WAL_DIR};
use crate::error::Error;
use crate::plan::Phase;
use crate::state::{Command, Lease, Plan, Reply, Resources, RunState, TaskId, TaskState, WorkerId};

const T0: u64 = 1_000_000;

fn plan() -> Plan {
    let mut plan = Plan::new(1, 3, 1, 1);
    plan.lease_ms = 1_000;
    plan.heartbeat_interval_ms = 100;
    plan.worker_timeout_ms = 10_000;
    plan
}

async fn start(log: &MemoryLog, clock: &ManualClock, grace: u64) -> Handle {
    let options = DriverOptions { restart_grace_ms: Some(grace), ..DriverOptions::default() };
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
fn a_torn_tail_record_is_dropped_whole_and_the_log_reopens_for_appends() {
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
fn a_flipped_byte_in_a_middle_record_is_refused_naming_the_file_and_offset() {
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
fn a_bad_last_record_of_a_segment_that_others_follow_is_refused_naming_that_segment() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = reopen(dir.path());
        log.append(&[expire(1), expire(2)]).unwrap();
        // A snapshot cuts the segment: the next batch goes to a new one.
        drop(log.begin_snapshot(crate::state::RunState::new(plan()).unwrap()).unwrap());
        log.append(&[expire(3)]).unwrap();
    }
    let segments = open_segments(dir.path());
    assert_eq!(segments.iter().map(|(first, _)| *first).collect::<Vec<_>>(), vec![1, 3]);
    // Its last record torn would be a tear in the last segment; in an older one it is damage.
    let older = &segments[0].1;
    let mut bytes = std::fs::read(older).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(older, &bytes).unwrap();
    match open(dir.path()).load(&mut |_| Ok(())) {
        Err(e @ Error::CorruptLog { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&older.display().to_string()) && text.contains("later segments"), "{text}");
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn a_second_log_on_a_locked_state_dir_is_refused_naming_the_dir_and_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    match FileLog::open(dir.path(), "run-a", &plan(), HASH) {
        Err(e @ Error::StateLocked { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
            assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        }
        other => panic!("expected the lock to refuse it, got {other:?}"),
    }
    drop(first);
    open(dir.path());
}

#[test]
fn a_state_dir_written_for_another_config_hash_plan_or_run_is_refused_naming_what_differs() {
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

async fn start_on(
    log: FileLog,
    clock: &ManualClock,
    every: u64,
) -> (Handle, tokio::task::JoinHandle<crate::error::Result<()>>) {
    let options = DriverOptions { restart_grace_ms: Some(0), snapshot_every: Some(every), ..DriverOptions::default() };
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
    task.await.unwrap().unwrap();

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
    task.await.unwrap().unwrap();

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
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_memory_log_snapshots_and_compacts_too() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let options = DriverOptions { restart_grace_ms: Some(0), snapshot_every: Some(10), ..DriverOptions::default() };
    let (handle, task) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options.clone(), None).await.unwrap();
    for i in 0..25 {
        register(&handle, &format!("w-{i}")).await;
    }
    let live = state_json(&handle).await;
    handle.stop().await;
    task.await.unwrap().unwrap();
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
    let json: serde_json::Value = serde_json::from_str(&payloads.json(TaskId::new(1, Phase::Train, 0), 2)).unwrap();
    assert_eq!(json["value_dir"], "runs/demo/iter-1/value/attempt-2");
    assert_eq!(json["output_key"], "runs/demo/iter-1/value/attempt-2/model/files.json");
}

/// Leases a rollout shard, writes `bytes` (one record) at its layout key and completes it with their sha256.
async fn complete_at_layout_key(
    handle: &Handle,
    worker: &WorkerId,
    store: &iro_common::store::Store,
    layout: &iro_common::layout::RunLayout,
) {
    let Lease::Task { task_id, attempt, .. } = lease(handle, worker).await else { panic!("expected a shard") };
    let key = layout.shard(task_id.iteration, iro_common::layout::ShardedPhase::Rollout, task_id.shard, attempt);
    let bytes = vec![b'x'; task_id.shard as usize + 1];
    let sha256 = iro_common::store::sha256_hex(&bytes);
    store.put(&key, bytes).await.unwrap();
    let output = crate::state::Output { key, sha256, records: 1, tokens: 2 };
    let reply = handle
        .apply(Command::CompleteTask { worker_id: worker.clone(), task_id, attempt, output, now_ms: 0 })
        .await
        .unwrap()
        .reply;
    assert!(matches!(reply, Reply::Accepted { .. }), "{reply:?}");
}

async fn start_publishing(log: &MemoryLog, clock: &ManualClock, store: &iro_common::store::Store) -> Handle {
    let publisher = super::manifests::Publisher::start(store.clone(), "gate").unwrap();
    let options = DriverOptions { restart_grace_ms: Some(0), ..DriverOptions::default() };
    actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, Some(publisher)).await.unwrap().0
}

/// The inode of a local store's object: a rewrite (staged and renamed into place) changes it.
fn inode(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

#[tokio::test]
async fn the_next_stage_is_not_leased_before_the_manifest_it_reads_is_written() {
    use iro_common::layout::{RunLayout, ShardedPhase};
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let dir = tempfile::tempdir().unwrap();
    let store = iro_common::store::Store::open(&dir.path().display().to_string()).unwrap();
    let layout = RunLayout::new("gate").unwrap();
    let manifest_key = layout.manifest(1, ShardedPhase::Rollout);
    // A folder where the manifest goes: the store refuses the write until it is removed.
    let blocker = dir.path().join(&manifest_key);
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let handle = start_publishing(&log, &clock, &store).await;
    let worker = register(&handle, "w-a").await;
    for _ in 0..3 {
        complete_at_layout_key(&handle, &worker, &store, &layout).await;
    }
    // The manifest cannot be written, so the train task waits.
    for _ in 0..3 {
        match lease(&handle, &worker).await {
            Lease::RetryAfter { reason: crate::state::WaitReason::PhaseBarrier, .. } => {}
            other => panic!("expected to be held back, got {other:?}"),
        }
    }
    let train = TaskId::new(1, Phase::Train, 0);
    assert_eq!(task_state(&handle, train).await, TaskState::Pending, "nothing was leased while held back");
    // The status page says why, naming the manifest.
    let mut why = None;
    for _ in 0..100 {
        why = handle.read(|v| crate::status::report("gate", v).leases_held_back).await.unwrap();
        if why.as_deref().is_some_and(|w| w.contains(&manifest_key)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let why = why.expect("the status report names no reason while leases are held back");
    assert!(why.contains(&manifest_key) && why.contains("cannot be written"), "{why}");

    std::fs::remove_dir_all(&blocker).unwrap();
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
    assert_eq!(manifest.shards.iter().map(|e| e.attempt).collect::<Vec<_>>(), [1, 1, 1], "no shard was redone");
    handle.stop().await;

    // A restart writes the manifests of finished stages again (here: after someone deleted it).
    store.delete(&manifest_key).await.unwrap();
    let restarted = start_publishing(&log, &clock, &store).await;
    for _ in 0..100 {
        if store.exists(&manifest_key).await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = iro_common::records::read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap();
    assert_eq!(again, manifest, "the same manifest, rewritten");
    restarted.stop().await;
}

#[tokio::test]
async fn a_restart_does_not_rewrite_a_manifest_that_is_already_there_and_the_same() {
    use iro_common::layout::{RunLayout, ShardedPhase};
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let dir = tempfile::tempdir().unwrap();
    let store = iro_common::store::Store::open(&dir.path().display().to_string()).unwrap();
    let layout = RunLayout::new("gate").unwrap();
    let handle = start_publishing(&log, &clock, &store).await;
    let worker = register(&handle, "w-a").await;
    for _ in 0..3 {
        complete_at_layout_key(&handle, &worker, &store, &layout).await;
    }
    let wait_for_train = |handle: Handle, worker: WorkerId| async move {
        for _ in 0..100 {
            if let Lease::GangRank { .. } = lease(&handle, &worker).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the train task was never leased");
    };
    wait_for_train(handle.clone(), worker.clone()).await;
    let path = dir.path().join(layout.manifest(1, ShardedPhase::Rollout));
    let written = inode(&path);
    handle.stop().await;

    // The shard objects are gone now: a restart that checked them again would re-open the stage. It finds
    // the same manifest in the store, and neither reads them nor writes it.
    for shard in 0..3 {
        store.delete(&layout.shard(1, ShardedPhase::Rollout, shard, 1)).await.unwrap();
    }
    let restarted = start_publishing(&log, &clock, &store).await;
    wait_for_train(restarted.clone(), worker.clone()).await;
    assert_eq!(inode(&path), written, "the manifest was not written again");
    let rejected = restarted.read(|v| v.telemetry.outputs_rejected.values().sum::<u64>()).await.unwrap();
    assert_eq!(rejected, 0);
    restarted.stop().await;

    // A manifest that differs from what the log accepted (here: edited by hand) is checked and rewritten.
    for shard in 0..3 {
        let bytes = vec![b'x'; shard as usize + 1];
        store.put(&layout.shard(1, ShardedPhase::Rollout, shard, 1), bytes).await.unwrap();
    }
    let original = iro_common::records::read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap();
    let mut edited = original.clone();
    edited.shards.pop();
    store.put_json(&layout.manifest(1, ShardedPhase::Rollout), &edited).await.unwrap();
    let again = start_publishing(&log, &clock, &store).await;
    wait_for_train(again.clone(), worker.clone()).await;
    let rewritten = iro_common::records::read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap();
    assert_eq!(rewritten, original);
    again.stop().await;
}

#[test]
fn the_system_clock_starts_at_the_unix_time_and_never_runs_backwards() {
    use super::clock::{Clock, SystemClock};
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let clock = SystemClock::new();
    let mut last = clock.now_ms();
    assert!(last.abs_diff(wall) < 1_000, "{last} is not the Unix time {wall}");
    for _ in 0..10_000 {
        let now = clock.now_ms();
        assert!(now >= last, "the clock went back from {last} to {now}");
        last = now;
    }
}

/// A `CommandLog` whose appends wait while its gate is shut: a stalled fsync (an EBS or NFS hiccup).
#[derive(Clone, Default)]
struct GatedLog {
    inner: MemoryLog,
    /// (shut, appends waiting at the gate)
    gate: Arc<(std::sync::Mutex<(bool, usize)>, std::sync::Condvar)>,
}

impl GatedLog {
    fn shut(&self, shut: bool) {
        let (lock, opened) = &*self.gate;
        lock.lock().unwrap().0 = shut;
        opened.notify_all();
    }

    /// Waits (in real time, briefly) until an append is stuck at the gate.
    async fn stuck(&self) {
        for _ in 0..500 {
            if self.gate.0.lock().unwrap().1 > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("no append reached the shut gate");
    }
}

impl CommandLog for GatedLog {
    fn load(&mut self, sink: &mut dyn FnMut(Recovered) -> crate::error::Result<()>) -> crate::error::Result<Loaded> {
        self.inner.load(sink)
    }

    fn last_index(&self) -> u64 {
        self.inner.last_index()
    }

    fn entries(&self, range: std::ops::Range<u64>) -> crate::error::Result<Vec<Command>> {
        CommandLog::entries(&self.inner, range)
    }

    fn begin_snapshot(&mut self, state: RunState) -> crate::error::Result<SnapshotJob> {
        self.inner.begin_snapshot(state)
    }

    fn append(&mut self, commands: &[Command]) -> crate::error::Result<()> {
        let (lock, opened) = &*self.gate;
        let mut gate = lock.lock().unwrap();
        gate.1 += 1;
        while gate.0 {
            gate = opened.wait(gate).unwrap();
        }
        gate.1 -= 1;
        drop(gate);
        self.inner.append(commands)
    }
}

/// As in production: a lease outlives a silent worker, so a dead worker is what takes leases back.
fn stall_plan() -> Plan {
    let mut plan = Plan::new(1, 2, 1, 1);
    plan.lease_ms = 60_000;
    plan.heartbeat_interval_ms = 10_000;
    plan.worker_timeout_ms = 30_000;
    plan
}

fn heartbeat(worker: &WorkerId, task_id: TaskId, attempt: u32) -> Command {
    Command::Heartbeat {
        worker_id: worker.clone(),
        lease: Some(crate::state::LeaseRef { task_id, attempt }),
        progress: crate::state::Progress { done: 1, total: 2 },
        now_ms: 0,
    }
}

/// Two workers holding one shard each, on a driver over `log`.
async fn two_leases(log: &GatedLog, clock: &ManualClock) -> (Handle, Vec<(WorkerId, TaskId, u32)>) {
    let options = DriverOptions { restart_grace_ms: Some(0), ..DriverOptions::default() };
    let (handle, _) =
        actor::start(stall_plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, None).await.unwrap();
    let mut held = Vec::new();
    for id in ["w-a", "w-b"] {
        let worker = register(&handle, id).await;
        let Lease::Task { task_id, attempt, .. } = lease(&handle, &worker).await else { panic!("expected a shard") };
        held.push((worker, task_id, attempt));
    }
    (handle, held)
}

/// Both workers still hold their shards, nobody died, and nothing was lost.
async fn nothing_expired(handle: &Handle, held: &[(WorkerId, TaskId, u32)]) {
    // Give the timer a chance to do what it would.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let losses = handle.read(|v| v.telemetry.losses.clone()).await.unwrap();
    assert!(losses.values().all(|n| *n == 0), "leases were lost: {losses:?}");
    for (worker, task, attempt) in held {
        match task_state(handle, *task).await {
            TaskState::Leased { worker: holder, attempt: a, .. } => assert_eq!((&holder, a), (worker, *attempt)),
            other => panic!("{task} should still be leased to {worker}: {other:?}"),
        }
        let id = worker.clone();
        assert!(handle.read(move |v| v.state.worker(&id).unwrap().alive).await.unwrap(), "{worker} was declared dead");
    }
}

/// A3: heartbeats queue behind a log write that stalls past the worker timeout. They, not the stall,
/// decide who is alive: no worker is declared dead and no lease is dropped.
async fn a_stall_expires_nobody(jump: impl FnOnce(&ManualClock)) {
    let (log, clock) = (GatedLog::default(), ManualClock::new(T0));
    let (handle, held) = two_leases(&log, &clock).await;
    log.shut(true);
    let mut beats = Vec::new();
    for (i, (worker, task, attempt)) in held.iter().enumerate() {
        let (handle, command) = (handle.clone(), heartbeat(worker, *task, *attempt));
        beats.push(tokio::spawn(async move { handle.apply(command).await }));
        if i == 0 {
            // The first heartbeat's write is stuck; the second waits in the queue behind it.
            log.stuck().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    jump(&clock);
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.shut(false);
    for beat in beats {
        let reply = beat.await.unwrap().unwrap().reply;
        assert!(matches!(reply, Reply::LeaseExtended { .. }), "the heartbeat was fenced: {reply:?}");
    }
    nothing_expired(&handle, &held).await;

    // The grace is bounded: a worker that stays silent past it does die, one that heartbeats does not.
    let (a, b) = (&held[0], &held[1]);
    clock.advance(15_000);
    handle.apply(heartbeat(&b.0, b.1, b.2)).await.unwrap();
    clock.advance(15_000);
    handle.apply(heartbeat(&b.0, b.1, b.2)).await.unwrap();
    clock.advance(15_000);
    assert_eq!(eventually(&handle, a.1, |s| *s == TaskState::Pending).await, TaskState::Pending, "a is dead");
    assert!(matches!(task_state(&handle, b.1).await, TaskState::Leased { .. }), "b heartbeated");
}

#[tokio::test]
async fn a_log_stall_past_the_worker_timeout_expires_no_healthy_worker() {
    a_stall_expires_nobody(|clock| {
        clock.advance(31_000);
    })
    .await;
}

#[tokio::test]
async fn a_clock_step_with_heartbeats_queued_expires_no_healthy_worker() {
    a_stall_expires_nobody(|clock| clock.set(T0 + 40_000)).await;
}

#[tokio::test]
async fn a_clock_step_while_the_driver_waits_expires_no_healthy_worker() {
    // A paused VM or a stepped clock: the driver's timer fires long after it asked to, before the
    // workers' heartbeats get through.
    let (log, clock) = (GatedLog::default(), ManualClock::new(T0));
    let (handle, held) = two_leases(&log, &clock).await;
    clock.set(T0 + 40_000);
    tokio::time::sleep(Duration::from_millis(30)).await;
    for (worker, task, attempt) in &held {
        let reply = handle.apply(heartbeat(worker, *task, *attempt)).await.unwrap().reply;
        assert!(matches!(reply, Reply::LeaseExtended { .. }), "the heartbeat was fenced: {reply:?}");
    }
    nothing_expired(&handle, &held).await;
}

async fn start_with(plan: Plan, log: &MemoryLog, clock: &ManualClock) -> Handle {
    let options = DriverOptions { restart_grace_ms: Some(0), ..DriverOptions::default() };
    actor::start(plan, Box::new(log.clone()), Arc::new(clock.clone()), options, None).await.unwrap().0
}

#[tokio::test]
async fn idle_polls_do_not_grow_the_log() {
    // A4: 10 idle workers poll while one holds the only rollout shard; the polls and lease-less
    // heartbeats change only liveness, which lives in memory.
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let plan = Plan { rollout_shards: 1, ..stall_plan() };
    let handle = start_with(plan.clone(), &log, &clock).await;
    let busy = register(&handle, "busy").await;
    let Lease::Task { task_id, attempt, .. } = lease(&handle, &busy).await else { panic!() };
    let mut idle = Vec::new();
    for i in 0..10 {
        idle.push(register(&handle, &format!("idle-{i}")).await);
    }
    let before = handle.read(|v| v.log_index).await.unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(idle.len()));
    let mut pollers = Vec::new();
    for worker in idle.clone() {
        let (handle, start) = (handle.clone(), start.clone());
        pollers.push(tokio::spawn(async move {
            start.wait().await;
            for round in 0..100 {
                assert!(matches!(lease(&handle, &worker).await, Lease::RetryAfter { .. }));
                if round % 10 == 0 {
                    let beat = Command::Heartbeat {
                        worker_id: worker.clone(),
                        lease: None,
                        progress: Default::default(),
                        now_ms: 0,
                    };
                    assert_eq!(handle.apply(beat).await.unwrap().reply, Reply::Alive);
                }
            }
        }));
    }
    for poller in pollers {
        poller.await.unwrap();
    }
    let polls = handle.read(|v| v.telemetry.applied["lease_task"]).await.unwrap();
    assert_eq!(polls, 1 + 1_000, "every poll was applied (and counted), just not logged");
    let grown = handle.read(|v| v.log_index).await.unwrap() - before;
    assert!(grown <= 2, "1 000 idle polls and 100 heartbeats grew the log by {grown} entries");

    // Liveness is kept in memory all the same.
    clock.advance(1_000);
    handle.apply(heartbeat(&busy, task_id, attempt)).await.unwrap();
    for worker in &idle {
        assert!(matches!(lease(&handle, worker).await, Lease::RetryAfter { .. }));
    }
    let seen = handle.read(|v| v.state.snapshot().workers.iter().map(|w| w.last_seen_ms).min()).await.unwrap();
    assert_eq!(seen, Some(T0 + 1_000), "every worker's liveness was renewed");
    assert_eq!(handle.read(|v| v.log_index).await.unwrap() - before, 1, "only the busy worker's heartbeat");
    let live = handle.read(|v| v.state.durable_digest()).await.unwrap();
    let rebuilt = crate::state::RunState::replay(plan, log.entries()).unwrap();
    assert_eq!(rebuilt.durable_digest(), live, "the log rebuilds everything durable");
}

#[tokio::test]
async fn a_state_rebuilt_from_the_log_equals_the_live_state_in_everything_durable() {
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let plan = Plan { rollout_shards: 3, ..stall_plan() };
    let handle = start_with(plan.clone(), &log, &clock).await;
    let a = register(&handle, "w-a").await;
    let b = register(&handle, "w-b").await;
    let idle = register(&handle, "w-idle").await;
    let Lease::Task { task_id: t0, attempt: a0, .. } = lease(&handle, &a).await else { panic!() };
    let Lease::Task { task_id: t1, attempt: b1, .. } = lease(&handle, &b).await else { panic!() };
    let Lease::Task { task_id: t2, attempt: i2, .. } = lease(&handle, &idle).await else { panic!() };
    let output = crate::state::Output { key: "k".into(), sha256: "0".repeat(64), records: 1, tokens: 2 };
    let done = Command::CompleteTask { worker_id: idle.clone(), task_id: t2, attempt: i2, output, now_ms: 0 };
    handle.apply(done).await.unwrap();
    // `a` goes silent; `b` and the idle worker keep talking, the idle one without being logged.
    for _ in 0..9 {
        clock.advance(3_000);
        handle.apply(heartbeat(&b, t1, b1)).await.unwrap();
        assert!(matches!(lease(&handle, &idle).await, Lease::RetryAfter { .. }));
        let stale = heartbeat(&idle, t2, i2);
        assert!(matches!(handle.apply(stale).await.unwrap().reply, Reply::Fenced(_)));
    }
    clock.advance(4_000);
    handle.apply(heartbeat(&b, t1, b1)).await.unwrap();
    assert_eq!(eventually(&handle, t0, |s| *s == TaskState::Pending).await, TaskState::Pending, "a died");
    // The lost task waits out its first backoff (one retry hint) before anyone takes it.
    clock.advance(1_000);
    let Lease::Task { task_id, attempt, .. } = lease(&handle, &idle).await else { panic!() };
    assert_eq!((task_id, attempt), (t0, a0 + 1));
    let live = handle.read(|v| (v.state.durable_digest(), v.telemetry.applied.values().sum::<u64>())).await.unwrap();
    let entries = log.entries();
    assert_eq!(entries.len() as u64, handle.read(|v| v.log_index).await.unwrap());
    assert!(entries.len() as u64 + 18 <= live.1, "the idle polls and stale heartbeats were not logged");
    let rebuilt = crate::state::RunState::replay(plan.clone(), entries).unwrap();
    assert_eq!(rebuilt.durable_digest(), live.0);
    handle.stop().await;
    let restarted = start_with(plan, &log, &clock).await;
    assert_eq!(restarted.read(|v| v.state.durable_digest()).await.unwrap(), live.0, "a restart resumes it");
}

#[tokio::test]
async fn the_timer_removes_a_long_dead_worker_and_logs_it() {
    // A12: a worker that died holding nothing is removed a retention after it died, by a tick the driver's
    // own timer sends (nothing else is due: the other worker heartbeats its lease), and that tick is logged.
    let (log, clock) = (MemoryLog::new(), ManualClock::new(T0));
    let plan = Plan { rollout_shards: 1, worker_retention_ms: Some(20_000), ..plan() };
    let handle = start_with(plan.clone(), &log, &clock).await;
    let busy = register(&handle, "busy").await;
    let gone = register(&handle, "gone").await;
    let Lease::Task { task_id, attempt, .. } = lease(&handle, &busy).await else { panic!() };
    let due = T0 + 10_000 + 2 * 20_000;
    while clock.advance(500) < due + 2_000 {
        handle.apply(heartbeat(&busy, task_id, attempt)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut removed = 0;
    for _ in 0..200 {
        removed = handle.read(|v| crate::status::report("gc", v).workers_removed).await.unwrap();
        if removed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(removed, 1, "the status report counts the removed record");
    let report = handle.read(|v| crate::status::report("gc", v)).await.unwrap();
    assert_eq!((report.workers_alive, report.workers_dead), (1, 0));
    let refused = handle.apply(Command::LeaseTask { worker_id: gone.clone(), now_ms: 0 }).await;
    assert!(matches!(refused, Err(Error::UnknownWorker { .. })), "{refused:?}");
    let entries = log.entries();
    assert!(entries.iter().any(|c| matches!(c, Command::ExpireLeases { now_ms } if *now_ms >= due)), "{entries:?}");
    handle.stop().await;
    let restarted = start_with(plan, &log, &clock).await;
    let workers = restarted.read(|v| v.state.snapshot().workers.len()).await.unwrap();
    assert_eq!(workers, 1, "a restart replays the removal");
}

/// A `CommandLog` on a disk that fills up: once `full`, every append fails as `write_all` would.
#[derive(Clone, Default)]
struct FillingDisk {
    inner: MemoryLog,
    full: Arc<std::sync::atomic::AtomicBool>,
}

const LOG_PATH: &str = "/var/lib/iro/state/wal/00000000000000000001.seg";

impl CommandLog for FillingDisk {
    fn load(&mut self, sink: &mut dyn FnMut(Recovered) -> crate::error::Result<()>) -> crate::error::Result<Loaded> {
        self.inner.load(sink)
    }

    fn last_index(&self) -> u64 {
        self.inner.last_index()
    }

    fn entries(&self, range: std::ops::Range<u64>) -> crate::error::Result<Vec<Command>> {
        CommandLog::entries(&self.inner, range)
    }

    fn begin_snapshot(&mut self, state: RunState) -> crate::error::Result<SnapshotJob> {
        self.inner.begin_snapshot(state)
    }

    fn append(&mut self, commands: &[Command]) -> crate::error::Result<()> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            let enospc = std::io::Error::from_raw_os_error(28);
            return Err(Error::Storage { path: LOG_PATH.into(), message: enospc.to_string() });
        }
        self.inner.append(commands)
    }
}

#[tokio::test]
async fn a_failed_log_write_fails_the_probes_and_ends_the_driver_with_the_error() {
    // A10: the disk fills. The coordinator must not stay up refusing everything while looking healthy.
    let (log, clock) = (FillingDisk::default(), ManualClock::new(T0));
    let options = DriverOptions { restart_grace_ms: Some(0), log_error_exit_ms: Some(300), ..DriverOptions::default() };
    let (handle, mut driver) =
        actor::start(plan(), Box::new(log.clone()), Arc::new(clock.clone()), options, None).await.unwrap();
    let context = crate::status::StatusContext {
        handle: handle.clone(),
        rpc: Arc::default(),
        run_id: "full".into(),
        tokens: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, crate::status::router(context)).await });
    let get = |path: &'static str| {
        let url = url.clone();
        async move { crate::status::client::get(&url, path, None).await.unwrap() }
    };
    assert_eq!((get("/livez").await.status, get("/readyz").await.status), (200, 200));

    let worker = register(&handle, "w-a").await;
    log.full.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = handle.apply(Command::LeaseTask { worker_id: worker.clone(), now_ms: 0 }).await;
    assert!(matches!(refused, Err(Error::Unavailable { .. })), "{refused:?}");
    let ready = get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("No space left on device") && ready.body.contains(LOG_PATH), "{}", ready.body);
    assert_eq!(get("/livez").await.status, 503);
    let status = get("/status").await;
    assert_eq!(status.status, 200, "the status page still says what happened");
    assert!(status.body.contains("No space left on device"), "{}", status.body);
    assert!(!driver.is_finished(), "the driver answers for a moment before it ends");

    let ended = tokio::time::timeout(Duration::from_secs(10), &mut driver).await.expect("the driver did not end");
    match ended.unwrap() {
        Err(Error::Storage { path, message }) => {
            assert_eq!(path, LOG_PATH);
            assert!(message.contains("No space left on device"), "{message}");
        }
        other => panic!("the driver should end with the write error: {other:?}"),
    }
    assert_eq!(get("/readyz").await.status, 503, "and stays unready once it has ended");
    assert_eq!(get("/livez").await.status, 503);
}
