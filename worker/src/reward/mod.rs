//! Rewards r(x, y) that score rollout candidates (iro.md step 2) and evaluation outputs: one scalar per
//! (prompt, response) pair. `Reward` is the interface the pipeline holds; the sentence-embedding
//! similarity to a reference answer is one implementation, a scalar-head reward model another.

pub mod encoder;
pub mod model;
pub mod similarity;

pub use encoder::{SentenceEncoder, TokenBatch};
pub use model::{RewardModel, RewardPrompt};
pub use similarity::EmbeddingSimilarityReward;

use crate::error::Result;

/// One item to score. `reference` is the task's reference answer where it has one (AlpacaEval's GPT-4
/// output, a TL;DR human summary); rewards that need it fail on items without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewardInput<'a> {
    /// The prompt as the policy saw it (its formatter or chat template applied).
    pub prompt: &'a str,
    /// The prompt before any chat template (the instruction; a TL;DR prompt as formatted), for a reward model
    /// that applies its own template.
    pub raw_prompt: &'a str,
    pub response: &'a str,
    pub reference: Option<&'a str>,
}

/// Scores items in batches; higher is better.
pub trait Reward {
    /// One score per item, in the order given.
    fn score(&self, items: &[RewardInput<'_>]) -> Result<Vec<f64>>;

    /// A short stable label for logs and reports, e.g. `embedding_similarity`.
    fn name(&self) -> &'static str;
}
