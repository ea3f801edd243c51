//! The manifest writer against a real store (a local folder) over real gRPC (review A8, A16): accepted
//! outputs are checked before a manifest names them, and one found missing or wrong is redone as a new
//! attempt; the run completes with every record exactly once.

use std::path::Path;

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{ShardAttempt, read_accepted, read_manifest, write_shard};
use iro_common::store::Store;
use iro_common::values::{read_value_manifest, write_value_folder};
use iro_coordinator::driver::{CoordinatorConfig, ManualClock, ServerHandle, serve};
use iro_proto as pb;
use pb::lease_task_response::Outcome;

use crate::support::*;

/// 3 rollout shards, a gang of 1, 1 eval shard; manifests on, into `store_dir`.
pub fn manifest_config(state_dir: &Path, store_dir: &Path, clock: &ManualClock) -> CoordinatorConfig {
    let mut config = config(state_dir, clock);
    config.run.run.store = store_dir.display().to_string();
    config.run.data.prompts_per_iteration = 192;
    config.plan.rollout_shards = 3;
    config.write_manifests = true;
    config
}

pub fn layout() -> RunLayout {
    RunLayout::new("itest").unwrap()
}

/// What the fake worker does to its own output right after the coordinator accepted it.
pub type Sabotage<'a> = &'a mut dyn FnMut(&pb::TaskSpec, &str);

/// A worker without a model: writes one record per prompt of the shard (or a value folder for the train
/// task) at the attempt's key, and completes with the real sha256 and counts. Returns every lease it got
/// as (task, attempt), once the coordinator says the run finished.
pub async fn work_until_finished(
    server: &ServerHandle,
    clock: &ManualClock,
    store: &Store,
    sabotage: Sabotage<'_>,
) -> Vec<(String, u32)> {
    let mut client = client(server).await;
    let worker = register(&mut client, "fake").await;
    let mut leased = Vec::new();
    for _ in 0..2_000 {
        let task = match lease(&mut client, &worker).await {
            Outcome::Task(task) => task,
            Outcome::RetryAfterMs(_) => {
                // Held back while a manifest is checked, or a re-opened shard's backoff: time goes on.
                clock.advance(500);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            }
            Outcome::RunFinished(_) => return leased,
            other => panic!("unexpected {other:?}"),
        };
        leased.push((task.task_id.clone(), task.attempt));
        let request = if task.world > 0 {
            let join = pb::JoinGangRequest {
                worker_id: worker.clone(),
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                endpoint: "rank-0-of-1".into(),
            };
            let joined = client.join_gang(join).await.unwrap().into_inner().outcome.unwrap();
            assert!(matches!(joined, pb::join_gang_response::Outcome::Ready(_)), "{joined:?}");
            let files =
                vec![("model.safetensors".to_owned(), vec![7u8; 100]), ("config.json".to_owned(), b"{}".to_vec())];
            let (key, sha256) =
                write_value_folder(store, &layout(), task.iteration, task.attempt, files).await.unwrap();
            pb::CompleteTaskRequest {
                output_key: key,
                sha256,
                records: 1,
                tokens: 0,
                ..complete_request(&worker, &task)
            }
        } else {
            let payload: serde_json::Value = serde_json::from_str(&task.payload_json).unwrap();
            let (start, end) = (payload["prompt_start"].as_u64().unwrap(), payload["prompt_end"].as_u64().unwrap());
            let records: Vec<serde_json::Value> = (start..end)
                .map(|i| serde_json::json!({"prompt_id": format!("{}-{i}", task.phase), "attempt": task.attempt}))
                .collect();
            let phase = if task.phase == "rollout" { ShardedPhase::Rollout } else { ShardedPhase::Eval };
            let at = ShardAttempt { iteration: task.iteration, phase, shard: task.shard, attempt: task.attempt };
            let entry = write_shard(store, &layout(), at, &records, 10 * records.len() as u64).await.unwrap();
            assert_eq!(entry.key, payload["output_key"].as_str().unwrap());
            pb::CompleteTaskRequest {
                output_key: entry.key.clone(),
                sha256: entry.sha256,
                records: entry.records,
                tokens: entry.tokens,
                ..complete_request(&worker, &task)
            }
        };
        let key = request.output_key.clone();
        let response = client.complete_task(request).await.unwrap().into_inner();
        assert!(response.accepted, "{response:?}");
        sabotage(&task, &key);
    }
    panic!("the run did not finish; leases so far: {leased:?}");
}

/// `iro_outputs_rejected_total{problem="…"}` (and friends) from a live `/metrics`.
pub async fn metric(server: &ServerHandle, series: &str) -> f64 {
    let body = http(server, "/metrics").await.body;
    let line = body.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in:\n{body}"));
    line[series.len()..].trim().parse().unwrap()
}

#[tokio::test]
async fn an_accepted_shard_deleted_or_corrupted_before_its_manifest_is_redone_and_the_run_completes() {
    let (state, objects) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = ManualClock::new(T0);
    let server = serve(manifest_config(state.path(), objects.path(), &clock)).await.unwrap();
    let store = Store::open(&objects.path().display().to_string()).unwrap();
    // While the rollout still runs: the first attempt of shard 0 vanishes from the store, and the first
    // attempt of shard 1 is overwritten with other records (a second writer of the same key, review A6).
    let mut sabotage = |task: &pb::TaskSpec, key: &str| {
        let path = objects.path().join(key);
        match (task.task_id.as_str(), task.attempt) {
            ("iter-1/rollout/0", 1) => std::fs::remove_file(path).unwrap(),
            ("iter-1/rollout/1", 1) => std::fs::write(path, b"{\"prompt_id\":\"rollout-999\"}\n").unwrap(),
            _ => {}
        }
    };
    let leased = work_until_finished(&server, &clock, &store, &mut sabotage).await;
    for redone in ["iter-1/rollout/0", "iter-1/rollout/1"] {
        assert!(leased.contains(&(redone.to_owned(), 2)), "{redone} was leased again as attempt 2: {leased:?}");
    }
    assert!(!leased.contains(&("iter-1/rollout/2".to_owned(), 2)), "the good shard is not redone: {leased:?}");
    assert_eq!(server.run_over().await, iro_coordinator::state::RunStatus::Finished);

    let manifest = read_manifest(&store, &layout(), 1, ShardedPhase::Rollout).await.unwrap();
    assert_eq!(manifest.shards.iter().map(|e| e.attempt).collect::<Vec<_>>(), [2, 2, 1]);
    let records: Vec<serde_json::Value> = read_accepted(&store, &manifest).await.unwrap();
    let ids: Vec<String> = records.iter().map(|r| r["prompt_id"].as_str().unwrap().to_owned()).collect();
    let want: Vec<String> = (0..192).map(|i| format!("rollout-{i}")).collect();
    assert_eq!(ids, want, "every prompt exactly once, none from the corrupted object");
    let eval = read_manifest(&store, &layout(), 1, ShardedPhase::Eval).await.unwrap();
    assert!(eval.is_complete());
    assert_eq!(read_value_manifest(&store, &layout(), 1).await.unwrap().unwrap().attempt, 1);

    assert_eq!(metric(&server, "iro_outputs_rejected_total{problem=\"missing\"}").await, 1.0);
    assert_eq!(metric(&server, "iro_outputs_rejected_total{problem=\"checksum_mismatch\"}").await, 1.0);
    assert_eq!(metric(&server, "iro_outputs_rejected_total{problem=\"malformed\"}").await, 0.0);
    assert_eq!(metric(&server, "iro_lease_losses_total{cause=\"output_rejected\"}").await, 2.0);
    let report = status(&server).await;
    let rejected: Vec<_> = report.recent_errors.iter().filter(|e| e.cause == "output_rejected").collect();
    assert_eq!(rejected.len(), 2, "{:#?}", report.recent_errors);
    assert!(rejected.iter().any(|e| e.message.contains("not found in store")), "{rejected:#?}");
    assert!(rejected.iter().any(|e| e.message.contains("hashes to sha256")), "{rejected:#?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_value_model_whose_files_are_missing_is_retrained_before_eval_reads_it() {
    let (state, objects) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = ManualClock::new(T0);
    let server = serve(manifest_config(state.path(), objects.path(), &clock)).await.unwrap();
    let store = Store::open(&objects.path().display().to_string()).unwrap();
    let mut sabotage = |task: &pb::TaskSpec, _: &str| {
        if (task.task_id.as_str(), task.attempt) == ("iter-1/train/0", 1) {
            let weights = layout().value_model(1, 1) + "/model.safetensors";
            std::fs::remove_file(objects.path().join(weights)).unwrap();
        }
    };
    let leased = work_until_finished(&server, &clock, &store, &mut sabotage).await;
    assert!(leased.contains(&("iter-1/train/0".to_owned(), 2)), "{leased:?}");
    let eval_at = leased.iter().position(|(t, _)| t == "iter-1/eval/0").unwrap();
    let retrain_at = leased.iter().position(|l| *l == ("iter-1/train/0".to_owned(), 2)).unwrap();
    assert!(retrain_at < eval_at, "eval reads V_1 only after it is redone: {leased:?}");
    assert_eq!(read_value_manifest(&store, &layout(), 1).await.unwrap().unwrap().attempt, 2);
    assert_eq!(metric(&server, "iro_outputs_rejected_total{problem=\"missing\"}").await, 1.0);
    server.shutdown().await;
}

/// The inode of every manifest in a local store: a rewrite (staged, then renamed into place) changes it.
fn manifest_inodes(objects: &Path) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for t in ["rollout", "value", "eval"] {
        let path = objects.join(format!("runs/itest/iter-1/{t}/manifest.json"));
        found.push((t.to_owned(), std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap())));
    }
    found
}

#[tokio::test]
async fn a_fresh_state_folder_over_a_store_holding_the_run_is_refused_unless_forced() {
    let (state, objects) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = ManualClock::new(T0);
    let server = serve(manifest_config(state.path(), objects.path(), &clock)).await.unwrap();
    let store = Store::open(&objects.path().display().to_string()).unwrap();
    work_until_finished(&server, &clock, &store, &mut |_, _| {}).await;
    assert_eq!(server.run_over().await, iro_coordinator::state::RunStatus::Finished);
    server.shutdown().await;
    let accepted = layout().shard(1, ShardedPhase::Rollout, 0, 1);
    let bytes = store.get(&accepted).await.unwrap();
    let inodes = manifest_inodes(objects.path());

    // The state folder is lost (a new PVC, a typo in --state-dir): starting over would lease attempt 1 again.
    let lost = tempfile::tempdir().unwrap();
    match serve(manifest_config(lost.path(), objects.path(), &clock)).await {
        Err(e @ iro_coordinator::error::Error::RunExists { .. }) => {
            let text = e.to_string();
            assert!(text.contains("runs/itest/iter-1/rollout/manifest.json"), "names what it found: {text}");
            assert!(text.contains("--force-fresh-state"), "names the way out: {text}");
        }
        other => panic!("expected the store to be refused, got {:?}", other.map(|s| s.grpc_addr())),
    }
    assert_eq!(store.get(&accepted).await.unwrap(), bytes, "nothing was overwritten");

    // The state folder the run ran with resumes it, and publishes nothing again: every manifest is there.
    let server = serve(manifest_config(state.path(), objects.path(), &clock)).await.unwrap();
    assert_eq!(server.run_over().await, iro_coordinator::state::RunStatus::Finished);
    assert_eq!(manifest_inodes(objects.path()), inodes, "identical manifests are not written again");
    server.shutdown().await;

    // Forced, an empty state folder starts the run over.
    let mut forced = manifest_config(lost.path(), objects.path(), &clock);
    forced.force_fresh_state = true;
    let server = serve(forced).await.unwrap();
    assert_eq!(status(&server).await.overall_tasks.done, 0);
    server.shutdown().await;
}
