//! The pipeline on a real S3-compatible store (moto_server, see common/tests/support/moto.rs): shards,
//! manifests, the published value function and its training checkpoints all land in the bucket; a worker with
//! an empty work dir resumes V_1's training from the checkpoints there and publishes the same weights.
//!
//! One test in this binary on purpose: it sets the AWS_* environment variables.

#[path = "../../common/tests/support/moto.rs"]
mod moto;
#[path = "support/tiny_run.rs"]
mod tiny_run;

use std::path::Path;

use iro_common::RunConfig;
use iro_common::config::Baseline;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_worker::pipeline::{Pipeline, local};

/// The shared tiny run on an S3 store, one iteration, smaller still.
fn config(store: &str) -> RunConfig {
    let mut c = tiny_run::tiny_run("s3run", store, 1);
    c.run.seed = 3;
    c.data.test_prompts = 2;
    c.sampling.max_new_tokens = 5;
    c.value.batch_size = 2;
    c.value.micro_batch_size = 1;
    c.value.head_width = 8;
    c.search.chunk_length = 2;
    c.baselines.methods = vec![Baseline::Base];
    c.cluster.shard_size = 2;
    c.validate(Path::new("test")).unwrap();
    c
}

#[test]
fn a_run_on_s3_keeps_everything_in_the_bucket_and_resumes_training_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = moto::MotoServer::start(dir.path());
    server.create_bucket("iro-pipeline");
    // SAFETY: this binary runs this one test; no other thread reads the environment meanwhile.
    unsafe { server.export_env() };

    let c = config("s3://iro-pipeline/exp");
    let mut p = Pipeline::open(c.clone(), None, &dir.path().join("work-a")).unwrap();
    let summary = local::run_local(&mut p, &mut |_, _, _| {}).unwrap();
    assert_eq!(summary.rows.len(), 2, "base and iro iter 1");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = Store::open("s3://iro-pipeline/exp").unwrap();
    let keys = rt.block_on(store.list("runs/s3run")).unwrap();
    for want in [
        "runs/s3run/iter-1/rollout/manifest.json",
        "runs/s3run/iter-1/eval/manifest.json",
        "runs/s3run/iter-1/value/manifest.json",
        "runs/s3run/iter-1/value/attempt-1/model/model.safetensors",
        "runs/s3run/iter-1/value/attempt-1/model/files.json",
        "runs/s3run/report/summary.json",
        "runs/s3run/report/reward.png",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} missing from {keys:?}");
    }
    // 4 examples, batch 2, 2 epochs: 4 steps, a checkpoint after each, the newest complete in the bucket.
    let marker = "runs/s3run/iter-1/value/attempt-1/train/checkpoint-00000004/train_state.json";
    assert!(keys.iter().any(|k| k == marker), "{keys:?}");
    let published = rt.block_on(store.get("runs/s3run/iter-1/value/attempt-1/model/model.safetensors")).unwrap();

    // V_1 was never accepted (its value manifest is gone); a worker on another machine (empty work dir) trains it
    // as attempt 2, fetches attempt 1's newest checkpoint from the bucket, finds training complete, and publishes
    // the same weights in attempt 2's own folder.
    rt.block_on(store.delete("runs/s3run/iter-1/value/manifest.json")).unwrap();
    let work_b = dir.path().join("work-b");
    let mut q = Pipeline::open(c, None, &work_b).unwrap();
    local::run_local(&mut q, &mut |_, _, _| {}).unwrap();
    let found: Vec<_> = walk(&work_b);
    assert!(
        work_b.join("runs/s3run/iter-1/value/attempt-2/train/checkpoint-00000004/train_state.json").exists(),
        "{found:#?}"
    );
    let again = rt.block_on(store.get("runs/s3run/iter-1/value/attempt-2/model/model.safetensors")).unwrap();
    assert_eq!(published, again);
    let accepted = rt.block_on(iro_common::values::read_value_manifest(&store, &RunLayout::new("s3run").unwrap(), 1));
    assert_eq!(accepted.unwrap().unwrap().attempt, 2);
    drop(server);
}

fn walk(d: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
