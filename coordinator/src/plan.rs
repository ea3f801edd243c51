//! How a run is cut into work: iterations × phases (rollout → train → eval) × shards.

use iro_common::RunConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Rollout,
    Train,
    Eval,
}

/// Number of shards for `prompts` prompts cut into shards of `shard_size` (the last one may be short).
pub fn shard_count(prompts: usize, shard_size: usize) -> usize {
    prompts.div_ceil(shard_size.max(1))
}

/// The tasks of one phase of one iteration: rollout and eval are sharded by prompts, training is one gang task.
pub fn tasks_in_phase(config: &RunConfig, phase: Phase) -> usize {
    match phase {
        Phase::Rollout => shard_count(config.data.prompts_per_iteration, config.cluster.shard_size),
        Phase::Train => 1,
        Phase::Eval => shard_count(config.data.test_prompts, config.cluster.shard_size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_prompt() {
        assert_eq!(shard_count(8192, 64), 128);
        assert_eq!(shard_count(300, 64), 5);
        assert_eq!(shard_count(0, 64), 0);
    }

    #[test]
    fn phases_of_the_default_config() {
        let c = RunConfig::default();
        assert_eq!(tasks_in_phase(&c, Phase::Rollout), 128);
        assert_eq!(tasks_in_phase(&c, Phase::Train), 1);
        assert_eq!(tasks_in_phase(&c, Phase::Eval), 5);
    }
}
