//! Checks shared by the store tests: the same contract is exercised on the in-memory store, a local folder
//! and a real S3-compatible server.
#![allow(dead_code)]

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{
    Manifest, RolloutRecord, ShardAttempt, read_accepted, read_manifest, write_manifest, write_shard,
};
use iro_common::store::Store;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub name: String,
    pub count: u32,
}

/// put / get / get_if_exists / exists / list / delete / json on any store.
pub async fn basic_contract(store: &Store) {
    store.put("a/b/one.txt", "first").await.unwrap();
    store.put("a/b/two.txt", b"second".to_vec()).await.unwrap();
    store.put("a/bc/three.txt", "third").await.unwrap();
    store.put("top.txt", "top").await.unwrap();

    assert_eq!(store.get("a/b/one.txt").await.unwrap().as_ref(), b"first");
    assert!(store.exists("a/b/two.txt").await.unwrap());
    assert!(!store.exists("a/b/none.txt").await.unwrap());
    assert_eq!(store.get_if_exists("a/b/none.txt").await.unwrap(), None);
    assert_eq!(store.get_if_exists("top.txt").await.unwrap().unwrap().as_ref(), b"top");

    // Overwrite replaces.
    store.put("a/b/one.txt", "first, again").await.unwrap();
    assert_eq!(store.get("a/b/one.txt").await.unwrap().as_ref(), b"first, again");

    // Prefixes match whole segments, results are sorted, trailing '/' is accepted.
    assert_eq!(store.list("a/b").await.unwrap(), ["a/b/one.txt", "a/b/two.txt"]);
    assert_eq!(store.list("a/b/").await.unwrap(), ["a/b/one.txt", "a/b/two.txt"]);
    assert_eq!(store.list("a").await.unwrap(), ["a/b/one.txt", "a/b/two.txt", "a/bc/three.txt"]);
    assert_eq!(store.list("").await.unwrap(), ["a/b/one.txt", "a/b/two.txt", "a/bc/three.txt", "top.txt"]);
    assert!(store.list("nothing/here").await.unwrap().is_empty());

    // Missing objects name the key and the store.
    let err = store.get("a/b/none.txt").await.unwrap_err();
    assert_eq!(err.kind(), "object_missing");
    let text = err.to_string();
    assert!(text.contains("a/b/none.txt") && text.contains(store.url()), "{text}");

    // JSON helpers round-trip; malformed JSON names key, store and line.
    let note = Note { name: "x".into(), count: 3 };
    store.put_json("notes/x.json", &note).await.unwrap();
    assert_eq!(store.get_json::<Note>("notes/x.json").await.unwrap(), note);
    store.put("notes/bad.json", "{\n  \"name\": \"x\",\n  \"count\": \"three\"\n}").await.unwrap();
    let err = store.get_json::<Note>("notes/bad.json").await.unwrap_err();
    assert_eq!(err.kind(), "malformed_json");
    let text = err.to_string();
    assert!(text.contains("notes/bad.json") && text.contains(store.url()) && text.contains("line 3"), "{text}");

    // Delete, and deleting again is fine.
    store.delete("a/b/two.txt").await.unwrap();
    store.delete("a/b/two.txt").await.unwrap();
    assert!(!store.exists("a/b/two.txt").await.unwrap());
    assert_eq!(store.list("a/b").await.unwrap(), ["a/b/one.txt"]);
}

pub fn rollout(prompt_id: &str, candidate: u32, reward: f64) -> RolloutRecord {
    RolloutRecord {
        prompt_id: prompt_id.into(),
        prompt: format!("SUBREDDIT: r/test\n\nTITLE: {prompt_id}\n\nPOST: ...\n\nTL;DR:"),
        iteration: 2,
        method: "cbs".into(),
        seed: 42,
        candidate,
        response: format!(" answer {candidate}"),
        token_ids: vec![10, 20 + candidate, 2],
        logprobs: vec![-0.5, -1.25, -0.125],
        finished: true,
        reward: Some(reward),
        value_score: Some(reward / 2.0),
        selected: u32::from(candidate == 0),
    }
}

/// The rollout hand-off: workers write attempt-specific shards, the coordinator accepts one attempt per shard in
/// the manifest, and the reader sees exactly the accepted attempts. A late attempt left in the store is ignored.
pub async fn manifest_round_trip(store: &Store) {
    let layout = RunLayout::new("run-7").unwrap();
    let t = 2;
    let phase = ShardedPhase::Rollout;
    let shard0 = vec![rollout("p0", 0, 1.0), rollout("p0", 1, -1.0)];
    let shard1_first = vec![rollout("p1", 0, 0.5)];
    let shard1_late = vec![rollout("p1", 0, 9.0), rollout("p9", 0, 9.0)];

    let e0 = write_shard(store, &layout, ShardAttempt { iteration: t, phase, shard: 0, attempt: 0 }, &shard0, 12)
        .await
        .unwrap();
    // Shard 1: attempt 0 stalled without reporting; attempt 1 was accepted; attempt 0 then wrote late.
    let e1 = write_shard(store, &layout, ShardAttempt { iteration: t, phase, shard: 1, attempt: 1 }, &shard1_first, 5)
        .await
        .unwrap();
    write_shard(store, &layout, ShardAttempt { iteration: t, phase, shard: 1, attempt: 0 }, &shard1_late, 7)
        .await
        .unwrap();
    assert_eq!(e0.key, "runs/run-7/iter-2/rollout/shard-00000.attempt-0.jsonl");
    assert_eq!((e0.records, e0.tokens), (2, 12));

    let mut manifest = Manifest::new("run-7", t, phase, 2);
    manifest.accept(e1.clone()).unwrap();
    manifest.accept(e0.clone()).unwrap();
    write_manifest(store, &manifest).await.unwrap();

    let read = read_manifest(store, &layout, t, phase).await.unwrap();
    assert_eq!(read, manifest);
    assert_eq!(read.shards.iter().map(|e| e.shard).collect::<Vec<_>>(), [0, 1]);
    assert_eq!((read.total_records(), read.total_tokens()), (3, 17));

    let records: Vec<RolloutRecord> = read_accepted(store, &read).await.unwrap();
    let mut want = shard0.clone();
    want.extend(shard1_first.clone());
    assert_eq!(records, want);

    // Every attempt is in the store; only the accepted ones were read.
    assert_eq!(store.list(&format!("{}/rollout", layout.iteration(t))).await.unwrap().len(), 4);
}
