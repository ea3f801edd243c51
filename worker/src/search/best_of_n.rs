//! Best-of-N: N plain samples per prompt, the reward model's argmax answers. Rows are seeded exactly as
//! CBS seeds its first W·K rows, so CBS with W = 1, K = N, L = ∞ returns the same N samples.

use super::cbs::{argmax, reward_candidates};
use super::{Candidate, PrefixScorer, replicated_decoder};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Generation};
use crate::model::CausalLm;

/// One prompt's N samples (scored by the reward) and the index of the chosen one.
#[derive(Debug, Clone, PartialEq)]
pub struct BestOfN {
    pub candidates: Vec<Candidate>,
    pub best: usize,
}

/// N plain samples per prompt, grouped by prompt: replica j of prompt p samples from
/// `RowRng::new(seeds[p]).fork(j)` (Best-of-N's draws, and the first chunk of CBS's).
pub fn sample_replicas(
    policy: &CausalLm,
    prompts: &[Vec<i64>],
    seeds: &[u64],
    n: usize,
    opts: &GenerateOptions,
) -> Result<Vec<Vec<Generation>>> {
    if n == 0 {
        return Err(Error::InvalidRequest("Best-of-N needs N ≥ 1".into()));
    }
    let _g = tch::no_grad_guard();
    let mut dec = replicated_decoder(policy, prompts, seeds, n, opts.max_new_tokens, opts.pad_token_id, None)?;
    while !dec.all_finished() {
        dec.step(&opts.sampling, &opts.eos_token_ids, opts.max_new_tokens);
    }
    let mut rows = dec.finish().into_iter();
    Ok((0..prompts.len()).map(|_| rows.by_ref().take(n).collect()).collect())
}

/// `seeds[p]` seeds prompt p's N rows (replica j samples from `RowRng::new(seeds[p]).fork(j)`).
pub fn best_of_n(
    policy: &CausalLm,
    prompts: &[Vec<i64>],
    seeds: &[u64],
    n: usize,
    opts: &GenerateOptions,
    reward: &mut dyn PrefixScorer,
) -> Result<Vec<BestOfN>> {
    let grouped: Vec<Vec<Candidate>> = sample_replicas(policy, prompts, seeds, n, opts)?
        .into_iter()
        .map(|gs| gs.into_iter().map(|generation| Candidate { generation, score: f64::NAN }).collect())
        .collect();
    let rewards = reward_candidates(prompts, &grouped, reward)?;
    Ok(grouped
        .into_iter()
        .zip(rewards)
        .map(|(mut candidates, r)| {
            for (c, r) in candidates.iter_mut().zip(&r) {
                c.score = *r;
            }
            BestOfN { candidates, best: argmax(&r) }
        })
        .collect())
}
