//! The run config every end-to-end test starts from: the tiny fixtures (policy `llama_gqa_tied`, reward model
//! `llama_seqcls`, weak-to-strong pair `llama_gqa_tied` / `llama_untied_scaled`) on the 12 hand-written TL;DR
//! posts (4 held out for evaluation, 4 fresh ones per iteration), short responses, a small search. Included by
//! path from worker/tests/pipeline.rs, worker/tests/pipeline_s3.rs and tests/support/mod.rs; each adjusts what
//! it tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use iro_common::RunConfig;
use iro_common::config::{Baseline, DataFormat, PromptFormat, RewardKind, ValueKind};

/// The workspace root, from any crate of it.
fn workspace() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("worker").is_dir() { here.to_owned() } else { here.join("..") }
}

pub fn fixture(name: &str) -> PathBuf {
    workspace().join("worker/tests/fixtures").join(name)
}

pub fn tiny_run(run_id: &str, store: &str, iterations: u32) -> RunConfig {
    let posts = workspace().join("common/tests/fixtures/tldr_sample.jsonl");
    let mut c = RunConfig::default();
    c.run.id = run_id.into();
    c.run.seed = 7;
    c.run.iterations = iterations;
    c.run.store = store.into();
    c.run.device = "cpu".into();
    c.policy.model = fixture("llama_gqa_tied");
    c.policy.prompt_format = PromptFormat::Tldr;
    // The tiny byte-level BPE spends many tokens on a post; the longest title alone needs about 70.
    c.policy.max_prompt_tokens = 160;
    c.data.format = DataFormat::Tldr;
    c.data.train = posts.clone();
    c.data.test = posts;
    c.data.prompts_per_iteration = 4;
    c.data.test_prompts = 4;
    c.sampling.max_new_tokens = 6;
    c.sampling.batch_size = 8;
    c.reward.kind = RewardKind::Model;
    c.reward.model = fixture("llama_seqcls");
    c.value.kind = ValueKind::Head;
    c.value.lr = 1e-3;
    c.value.epochs = 2;
    c.value.batch_size = 4;
    c.value.micro_batch_size = 2;
    c.value.head_width = 16;
    c.value.checkpoint_every = 1;
    c.search.beams = 2;
    c.search.successors = 2;
    c.search.chunk_length = 3;
    c.baselines.methods = vec![Baseline::Base, Baseline::BestOfN, Baseline::Args, Baseline::WeakToStrong];
    c.baselines.best_of_n = 4;
    c.baselines.args_k = 3;
    c.baselines.w2s_tuned = fixture("llama_gqa_tied");
    c.baselines.w2s_untuned = fixture("llama_untied_scaled");
    c.cluster.shard_size = 3;
    c
}
