//! Writes `worker/tests/fixtures/bf16_value/`: a `model`-kind value function trained here in bf16 mixed precision
//! (the llama_seqcls fixture, 20 AdamW steps on the value-training test examples), published as the trainer
//! publishes it. `scripts/fixtures/make_bf16_value_reference.py` then loads that folder with transformers'
//! `AutoModelForSequenceClassification` and records its values, which `worker/tests/value_training.rs` compares
//! with what `iro score` reads from the same folder.
//!
//!     cargo run --release -p iro-worker --example bf16_value_fixture [-- OUT_DIR]

#[path = "../tests/support/value_examples.rs"]
mod value_examples;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use iro_worker::train::{ValueInit, ValueTrainConfig, train_value};
use tch::{Device, Kind};

fn main() -> iro_worker::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = std::env::args().nth(1).map_or_else(|| root.join("bf16_value"), PathBuf::from);
    let cfg = ValueTrainConfig {
        lr: 1e-3,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs: 5,
        batch_size: 4,
        micro_batch_size: 2,
        checkpoint_every: 0,
        seed: 7,
        pad_id: 0,
        sharding: iro_common::config::ValueSharding::None,
        activation_checkpointing: false,
    };
    let init = ValueInit::Model { dir: root.join("llama_seqcls"), kind: Kind::BFloat16, device: Device::Cpu };
    let scratch = tempfile::tempdir().map_err(|e| iro_worker::Error::InvalidRequest(e.to_string()))?;
    let data = value_examples::examples(16, 3);
    let report = train_value(&cfg, &data, &init, scratch.path(), false, |_| ControlFlow::Continue(()))?;
    std::fs::create_dir_all(&out).map_err(|e| iro_worker::Error::InvalidRequest(format!("{}: {e}", out.display())))?;
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(report.checkpoint.join(name), out.join(name))
            .map_err(|e| iro_worker::Error::InvalidRequest(format!("{name}: {e}")))?;
    }
    println!("{} steps, final loss {:.5}: wrote {}", report.steps, report.final_loss, out.display());
    Ok(())
}
