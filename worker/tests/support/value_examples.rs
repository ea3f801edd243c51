//! Value-training examples for tests and device checks: prompts of random tokens, responses of varying length
//! (1 to 5 tokens), a reward fixed by the index. Included by path from worker/tests/value_training.rs,
//! worker/tests/collective.rs and worker/examples/nccl_check.rs.

use iro_common::data::SplitMix64;
use iro_worker::train::ValueExample;

pub fn examples(n: usize, seed: u64) -> Vec<ValueExample> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|i| {
            let prompt: Vec<i64> = (0..3 + i % 3).map(|_| 4 + rng.below(500) as i64).collect();
            let response: Vec<i64> = (0..1 + (i * 7) % 5).map(|_| 4 + rng.below(500) as i64).collect();
            ValueExample { prompt, response, reward: [1.0, -1.0, 2.0, 0.5][i % 4] }
        })
        .collect()
}
