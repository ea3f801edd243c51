//! Writes `worker/tests/fixtures/dpo_policy/`: the llama_gqa_tied fixture after DPO here (`train::dpo::train_dpo`,
//! 6 seeded preference pairs, 3 epochs), published as the trainer publishes it. Then
//! `scripts/fixtures/make_dpo_policy_reference.py` loads it with transformers' `AutoModelForCausalLM` and records its
//! greedy continuations, which `worker/tests/dpo.rs` compares with iro's greedy decoding of the same folder.
//!
//!     cargo run --release -p iro-worker --example dpo_policy_fixture [-- OUT_DIR]

#[path = "../tests/support/dpo_pairs.rs"]
mod dpo_pairs;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use iro_worker::train::dpo::train_dpo;

fn main() -> iro_worker::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = std::env::args().nth(1).map_or_else(|| root.join("dpo_policy"), PathBuf::from);
    let scratch = tempfile::tempdir().map_err(|e| iro_worker::Error::InvalidRequest(e.to_string()))?;
    let report = train_dpo(
        &dpo_pairs::config(0),
        &dpo_pairs::pairs(6),
        &root.join("llama_gqa_tied"),
        scratch.path(),
        false,
        |_, _, _| ControlFlow::Continue(()),
    )?;
    std::fs::create_dir_all(&out).map_err(|e| iro_worker::Error::InvalidRequest(format!("{}: {e}", out.display())))?;
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(report.checkpoint.join(name), out.join(name))
            .map_err(|e| iro_worker::Error::InvalidRequest(format!("{name}: {e}")))?;
    }
    println!("{} steps, losses {:?}: wrote {}", report.steps, report.losses, out.display());
    Ok(())
}
