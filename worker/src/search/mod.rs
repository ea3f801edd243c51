//! Guided decoding on a frozen policy: chunk-level beam search steered by value functions (CBS, the
//! IRO rollout and evaluation decoder) and the baselines it is compared with, Best-of-N and ARGS.
//! Every method takes its guidance through `PrefixScorer`, so value ensembles, reward models and
//! implicit rewards plug in alike.

pub mod args;
pub mod best_of_n;
pub mod cbs;
pub mod implicit;
pub mod scorer;

pub use self::args::{ArgsParams, args_decode};
pub use self::best_of_n::{best_of_n, sample_replicas};
pub use self::cbs::{CbsOutput, CbsParams, FinalPick, argmax, chunk_beam_search, pick_final, select_diverse};
pub use self::implicit::{ImplicitReward, response_logprob};
pub use self::scorer::{CachedValueEnsemble, PolicyHeadEnsemble, PrefixScorer, ValueEnsemble};

use crate::error::Result;
use crate::generate::{Decoder, Generation};
use crate::model::CausalLm;

/// One returned row of a search: the response and the score its method gave it (the guiding score for
/// CBS, the reward for Best-of-N).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub generation: Generation,
    pub score: f64,
}

/// A decoder with `n` rows per prompt (prompt-major: rows `p·n .. (p+1)·n` belong to prompt `p`), each
/// prompt prefilled once and then replicated through the cache. Replica `j` of prompt `p` samples from
/// `RowRng::new(seeds[p]).fork(j)`: CBS and Best-of-N both start here, which is what makes
/// CBS(W = 1, K = N, L = ∞) draw exactly Best-of-N's samples.
pub(crate) fn replicated_decoder<'m>(
    policy: &'m CausalLm,
    prompts: &[Vec<i64>],
    seeds: &[u64],
    n: usize,
    max_new_tokens: usize,
    pad: i64,
    tap: Option<usize>,
) -> Result<Decoder<'m>> {
    let mut dec = Decoder::new_tapped(policy, prompts, seeds, max_new_tokens, pad, tap)?;
    let (index, forks) = replicate_index(prompts.len(), n);
    dec.reorder(&index, Some(&forks));
    Ok(dec)
}

/// Row `p·n + j` comes from row `p`, forked with `j`.
fn replicate_index(groups: usize, n: usize) -> (Vec<i64>, Vec<u64>) {
    let index = (0..groups * n).map(|r| (r / n) as i64).collect();
    let forks = (0..groups * n).map(|r| (r % n) as u64).collect();
    (index, forks)
}

/// Each prompt repeated `n` times, prompt-major, matching `replicated_decoder`'s rows.
pub(crate) fn repeat_prompts(prompts: &[Vec<i64>], n: usize) -> Vec<Vec<i64>> {
    prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), n)).collect()
}
