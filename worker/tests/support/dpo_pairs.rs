//! Seeded preference pairs and the DPO settings the DPO tests and `examples/dpo_policy_fixture.rs` train with.

use iro_common::data::SplitMix64;
use iro_worker::train::dpo::{DpoConfig, PreferencePair};

pub fn pairs(n: usize) -> Vec<PreferencePair> {
    let mut rng = SplitMix64::new(11);
    let mut tokens = |len: usize| -> Vec<i64> { (0..len).map(|_| 4 + rng.below(500) as i64).collect() };
    (0..n)
        .map(|i| PreferencePair {
            prompt: tokens(3 + i % 3),
            chosen: tokens(2 + i % 4),
            rejected: tokens(1 + (i * 3) % 5),
        })
        .collect()
}

pub fn config(checkpoint_every: usize) -> DpoConfig {
    DpoConfig {
        beta: 0.1,
        lr: 5e-3,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs: 3,
        batch_size: 4,
        micro_batch_size: 2,
        checkpoint_every,
        seed: 5,
        pad_id: 3,
        device: tch::Device::Cpu,
    }
}
