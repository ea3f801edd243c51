//! What one rank holds of weights, gradients and AdamW state at the optimizer step, for `[value] sharding` =
//! none / optimizer / full at R = 2 and R = 4 ranks (thread-ranks on a loopback TCP ring training the tiny
//! llama_seqcls fixture for one epoch), next to ZeRO's expectation for P f32 parameters: 16·P, 4·P + 12·P/R and
//! 16·P/R bytes. The bytes are counted from the tensors the trainer holds at the step (`Progress::memory`). Prints
//! a Markdown table (the README's).
//!
//!     cargo run --release -p iro-worker --example zero_memory
#[path = "../tests/support/value_examples.rs"]
mod value_examples;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use iro_common::config::ValueSharding;
use iro_worker::collective::{RingOptions, TcpRing};
use iro_worker::train::{DataParallel, StepMemory, TrainableValue, ValueInit, ValueTrainConfig, train_value_ranked};
use tch::{Device, Kind};

fn main() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_seqcls");
    let params: u64 = TrainableValue::model_from_dir(&fixture, Kind::Float, Device::Cpu, 0)
        .expect("the llama_seqcls fixture loads")
        .params()
        .iter()
        .map(|p| p.numel() as u64)
        .sum();
    let data = value_examples::examples(16, 5);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!("P = {params} f32 parameters (llama_seqcls), 16 examples, batch 8, micro-batch 1, 64 KiB buckets; {cpu}");
    println!();
    println!("| sharding | R | params | grads | AdamW m+v | total | total / P | expected | expected bytes |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for world in [2usize, 4] {
        for mode in [ValueSharding::None, ValueSharding::Optimizer, ValueSharding::Full] {
            let m = measure(world, mode, &data, &fixture);
            let (r, p) = (world as f64, params as f64);
            let (formula, per_param) = match mode {
                ValueSharding::None => ("16·P".to_owned(), 16.0),
                ValueSharding::Optimizer => (format!("4·P + 12·P/{world}"), 4.0 + 12.0 / r),
                ValueSharding::Full => (format!("16·P/{world}"), 16.0 / r),
            };
            println!(
                "| {} | {world} | {} | {} | {} | {} | {:.3} | {formula} = {per_param:.3}·P | {:.0} |",
                mode.as_str(),
                m.params,
                m.grads,
                m.optimizer,
                m.total(),
                m.total() as f64 / p,
                per_param * p
            );
        }
    }
}

/// Rank 0's memory at the last step of a one-epoch training of `world` ranks.
fn measure(world: usize, mode: ValueSharding, data: &[iro_worker::train::ValueExample], fixture: &Path) -> StepMemory {
    let cfg = ValueTrainConfig {
        lr: 1e-3,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs: 1,
        batch_size: 8,
        micro_batch_size: 1,
        checkpoint_every: 0,
        seed: 7,
        pad_id: 0,
        sharding: mode,
        activation_checkpointing: false,
    };
    let out = std::env::temp_dir().join(format!("iro-zero-memory-{}-{world}-{}", std::process::id(), mode.as_str()));
    let listeners: Vec<_> = (0..world).map(|_| TcpRing::bind("127.0.0.1:0").expect("bind")).collect();
    let endpoints: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let seen = Mutex::new(StepMemory::default());
    std::thread::scope(|s| {
        for (rank, listener) in listeners.into_iter().enumerate() {
            let (endpoints, cfg, out, seen) = (endpoints.clone(), &cfg, &out, &seen);
            s.spawn(move || {
                let opts = RingOptions { deadline: Duration::from_secs(60), ..RingOptions::default() };
                let mut ring = TcpRing::connect(rank, endpoints, listener, opts).expect("ring");
                let init = ValueInit::Model { dir: fixture.to_owned(), kind: Kind::Float, device: Device::Cpu };
                let gang = DataParallel { collective: &mut ring, bucket_bytes: 64 * 1024 };
                train_value_ranked(cfg, data, &init, out, false, gang, |p| {
                    if rank == 0 {
                        *seen.lock().unwrap() = p.memory;
                    }
                    ControlFlow::Continue(())
                })
                .expect("training");
            });
        }
    });
    let _ = std::fs::remove_dir_all(&out);
    seen.into_inner().unwrap()
}
