//! The object store, JSON Lines records and the manifest hand-off, on the in-memory store and a local folder.

mod support;

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{
    EvalRecord, Manifest, RolloutRecord, ShardAttempt, decode_jsonl, encode_jsonl, read_accepted, read_manifest,
    read_shard, write_manifest, write_shard,
};
use iro_common::store::{Store, sha256_hex};
use support::{basic_contract, manifest_round_trip, rollout};

#[tokio::test]
async fn in_memory_store_keeps_the_store_contract() {
    basic_contract(&Store::in_memory()).await;
}

#[tokio::test]
async fn local_folder_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    basic_contract(&Store::open(dir.path().to_str().unwrap()).unwrap()).await;
}

#[tokio::test]
async fn local_folder_is_created_and_objects_are_plain_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("new/store");
    let store = Store::open(root.to_str().unwrap()).unwrap();
    store.put("runs/r/config.toml", "x = 1\n").await.unwrap();
    assert_eq!(std::fs::read_to_string(root.join("runs/r/config.toml")).unwrap(), "x = 1\n");

    // A second handle (another process, in a real run) sees the same objects; file:// URLs work too.
    let again = Store::open(&format!("file://{}", root.display())).unwrap();
    assert_eq!(again.list("runs").await.unwrap(), ["runs/r/config.toml"]);

    // Deleting the last object of a folder removes the empty folders, as on S3 where folders do not exist.
    store.delete("runs/r/config.toml").await.unwrap();
    assert!(!root.join("runs/r").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_put_is_atomic_readers_never_see_a_partial_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let a = vec![b'a'; 1 << 20];
    let b = vec![b'b'; (1 << 20) + 17];
    store.put("obj", a.clone()).await.unwrap();

    let writer = {
        let (store, a, b) = (store.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..40 {
                store.put("obj", if i % 2 == 0 { b.clone() } else { a.clone() }).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() {
        let got = store.get("obj").await.unwrap();
        assert!(got.as_ref() == a.as_slice() || got.as_ref() == b.as_slice(), "torn read of {} bytes", got.len());
        reads += 1;
    }
    writer.await.unwrap();
    assert!(reads > 0);
    // No staging files are left behind or listed.
    assert_eq!(store.list("").await.unwrap(), ["obj"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[tokio::test]
async fn manifest_reader_reads_only_accepted_attempts_in_memory() {
    manifest_round_trip(&Store::in_memory()).await;
}

#[tokio::test]
async fn manifest_reader_reads_only_accepted_attempts_on_a_local_folder() {
    let dir = tempfile::tempdir().unwrap();
    manifest_round_trip(&Store::open(dir.path().to_str().unwrap()).unwrap()).await;
}

#[tokio::test]
async fn a_corrupted_accepted_object_is_a_checksum_error_naming_the_key() {
    let store = Store::in_memory();
    let layout = RunLayout::new("r").unwrap();
    let entry = write_shard(
        &store,
        &layout,
        ShardAttempt { iteration: 1, phase: ShardedPhase::Eval, shard: 0, attempt: 0 },
        &[rollout("p", 0, 1.0)],
        3,
    )
    .await
    .unwrap();
    let mut manifest = Manifest::new("r", 1, ShardedPhase::Eval, 1);
    manifest.accept(entry.clone()).unwrap();
    store.put(&entry.key, "{}\n").await.unwrap();

    let err = read_accepted::<RolloutRecord>(&store, &manifest).await.unwrap_err();
    assert_eq!(err.kind(), "checksum_mismatch");
    let text = err.to_string();
    assert!(text.contains(&entry.key) && text.contains(&entry.sha256) && text.contains("memory://"), "{text}");
}

#[tokio::test]
async fn a_missing_accepted_object_is_an_error_naming_the_key() {
    let store = Store::in_memory();
    let layout = RunLayout::new("r").unwrap();
    let entry = write_shard(
        &store,
        &layout,
        ShardAttempt { iteration: 1, phase: ShardedPhase::Rollout, shard: 0, attempt: 2 },
        &[rollout("p", 0, 1.0)],
        3,
    )
    .await
    .unwrap();
    store.delete(&entry.key).await.unwrap();
    let err = read_shard::<RolloutRecord>(&store, &entry).await.unwrap_err();
    assert_eq!(err.kind(), "object_missing");
    assert!(err.to_string().contains("shard-00000.attempt-2.jsonl"), "{err}");
}

#[tokio::test]
async fn a_record_count_that_disagrees_with_the_manifest_is_refused() {
    let store = Store::in_memory();
    let layout = RunLayout::new("r").unwrap();
    let mut entry = write_shard(
        &store,
        &layout,
        ShardAttempt { iteration: 1, phase: ShardedPhase::Rollout, shard: 0, attempt: 0 },
        &[rollout("p", 0, 1.0)],
        3,
    )
    .await
    .unwrap();
    entry.records = 2;
    let err = read_shard::<RolloutRecord>(&store, &entry).await.unwrap_err();
    assert_eq!(err.kind(), "manifest_invalid");
    assert!(err.to_string().contains("manifest says 2 records, object holds 1"), "{err}");
}

#[tokio::test]
async fn an_incomplete_manifest_is_not_read() {
    let store = Store::in_memory();
    let layout = RunLayout::new("r").unwrap();
    let entry = write_shard(
        &store,
        &layout,
        ShardAttempt { iteration: 1, phase: ShardedPhase::Rollout, shard: 1, attempt: 0 },
        &[rollout("p", 0, 1.0)],
        3,
    )
    .await
    .unwrap();
    let mut manifest = Manifest::new("r", 1, ShardedPhase::Rollout, 3);
    manifest.accept(entry).unwrap();
    assert!(!manifest.is_complete());
    assert_eq!(manifest.missing(), [0, 2]);
    let err = read_accepted::<RolloutRecord>(&store, &manifest).await.unwrap_err();
    assert_eq!(err.kind(), "manifest_invalid");
    assert!(err.to_string().contains("[0, 2]"), "{err}");
}

#[test]
fn the_first_accepted_attempt_wins_and_a_repeat_is_a_no_op() {
    let entry = |attempt: u32| iro_common::records::ShardEntry {
        shard: 0,
        attempt,
        key: RunLayout::new("r").unwrap().shard(1, ShardedPhase::Rollout, 0, attempt),
        sha256: sha256_hex(attempt.to_string().as_bytes()),
        records: 1,
        tokens: 1,
        bytes: 1,
    };
    let mut m = Manifest::new("r", 1, ShardedPhase::Rollout, 1);
    m.accept(entry(1)).unwrap();
    m.accept(entry(1)).unwrap();
    let err = m.accept(entry(2)).unwrap_err();
    assert_eq!(err.kind(), "manifest_invalid");
    assert!(err.to_string().contains("already has accepted attempt 1; attempt 2 refused"), "{err}");
    assert_eq!(m.entry(0).unwrap().attempt, 1);
    let mut out_of_range = entry(1);
    out_of_range.shard = 1;
    assert_eq!(m.accept(out_of_range).unwrap_err().kind(), "manifest_invalid");
}

#[tokio::test]
async fn a_manifest_that_points_outside_its_layout_is_refused() {
    let store = Store::in_memory();
    let layout = RunLayout::new("r").unwrap();
    let entry = write_shard(
        &store,
        &layout,
        ShardAttempt { iteration: 1, phase: ShardedPhase::Rollout, shard: 0, attempt: 0 },
        &[rollout("p", 0, 1.0)],
        3,
    )
    .await
    .unwrap();
    let mut manifest = Manifest::new("r", 1, ShardedPhase::Rollout, 1);
    manifest.accept(entry).unwrap();
    write_manifest(&store, &manifest).await.unwrap();

    // Tampered key: points at another run's object.
    let mut bad = manifest.clone();
    bad.shards[0].key = "runs/other/iter-1/rollout/shard-00000.attempt-0.jsonl".into();
    assert_eq!(write_manifest(&store, &bad).await.unwrap_err().kind(), "manifest_invalid");
    store.put_json(&layout.manifest(1, ShardedPhase::Rollout), &bad).await.unwrap();
    let err = read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap_err();
    assert_eq!(err.kind(), "manifest_invalid");
    let text = err.to_string();
    assert!(text.contains("runs/r/iter-1/rollout/manifest.json") && text.contains("memory://"), "{text}");

    // A manifest of iteration 1 copied to iteration 2's key.
    store.put_json(&layout.manifest(2, ShardedPhase::Rollout), &manifest).await.unwrap();
    let err = read_manifest(&store, &layout, 2, ShardedPhase::Rollout).await.unwrap_err();
    assert!(err.to_string().contains("iteration 1"), "{err}");

    // Unknown version, unknown field, missing manifest.
    let mut future = manifest.clone();
    future.version = 99;
    store.put_json(&layout.manifest(1, ShardedPhase::Rollout), &future).await.unwrap();
    assert_eq!(read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap_err().kind(), "manifest_invalid");
    let mut extra = serde_json::to_value(&manifest).unwrap();
    extra["surprise"] = serde_json::json!(1);
    store.put_json(&layout.manifest(1, ShardedPhase::Rollout), &extra).await.unwrap();
    assert_eq!(read_manifest(&store, &layout, 1, ShardedPhase::Rollout).await.unwrap_err().kind(), "malformed_json");
    let err = read_manifest(&store, &layout, 3, ShardedPhase::Eval).await.unwrap_err();
    assert_eq!(err.kind(), "object_missing");
}

#[test]
fn manifest_json_is_readable_and_stable() {
    let mut m = Manifest::new("r", 1, ShardedPhase::Eval, 1);
    m.accept(iro_common::records::ShardEntry {
        shard: 0,
        attempt: 0,
        key: "runs/r/iter-1/eval/shard-00000.attempt-0.jsonl".into(),
        sha256: sha256_hex(b""),
        records: 2,
        tokens: 40,
        bytes: 0,
    })
    .unwrap();
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["phase"], "eval");
    assert_eq!(v["shards"][0]["attempt"], 0);
    assert_eq!(serde_json::from_value::<Manifest>(v).unwrap(), m);
}

#[test]
fn rollout_records_round_trip_through_json_lines() {
    let records =
        vec![rollout("p0", 0, 1.5), RolloutRecord { reward: None, value_score: None, ..rollout("p0", 1, 0.0) }];
    let bytes = encode_jsonl(&records).unwrap();
    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 2);
    assert_eq!(decode_jsonl::<RolloutRecord>(&bytes, "mem").unwrap(), records);
    // Optional fields may be absent in older or hand-written rows.
    let line = r#"{"prompt_id":"x","prompt":"p","iteration":1,"method":"sample","seed":1,"candidate":0,"response":"r","token_ids":[1],"logprobs":[-0.1],"finished":false,"reward":null}"#;
    let rec: Vec<RolloutRecord> = decode_jsonl(line.as_bytes(), "mem").unwrap();
    assert_eq!((rec[0].selected, rec[0].value_score, rec[0].reward), (0, None, None));
}

#[test]
fn a_malformed_json_line_names_the_location_and_line() {
    let good = String::from_utf8(encode_jsonl(&[rollout("p", 0, 1.0)]).unwrap()).unwrap();
    let text = format!("{good}\n{{\"prompt_id\": 3}}\n");
    let err = decode_jsonl::<RolloutRecord>(text.as_bytes(), "`runs/r/x.jsonl` in store memory://").unwrap_err();
    assert_eq!(err.kind(), "malformed_json");
    let msg = err.to_string();
    assert!(msg.contains("runs/r/x.jsonl") && msg.contains("line 3"), "{msg}");

    let err = decode_jsonl::<RolloutRecord>(b"\xff\xfe\n", "f.jsonl").unwrap_err();
    assert!(err.to_string().contains("f.jsonl line 1"), "{err}");
}

#[test]
fn eval_rows_carry_alpaca_eval_fields() {
    let row = EvalRecord {
        instruction: "Say hi".into(),
        output: "Hi!".into(),
        generator: "iro/iter-2".into(),
        dataset: Some("helpful_base".into()),
        prompt_id: "0".into(),
        method: "iro".into(),
        iteration: 2,
        reward: Some(0.25),
        tokens: 3,
        length: 3,
        reference: None,
        reference_reward: None,
        kl_bound: Some(0.0),
        seconds: 0.5,
        diagnostics: None,
    };
    let bytes = encode_jsonl(std::slice::from_ref(&row)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    for field in ["instruction", "output", "generator", "dataset", "prompt_id", "reward", "method", "tokens"] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert!(v.get("reference").is_none());
    assert_eq!(decode_jsonl::<EvalRecord>(&bytes, "mem").unwrap(), [row]);
}
