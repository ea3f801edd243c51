//! Best-of-N: N plain samples per prompt, the reward model's argmax answers. Rows are seeded exactly as
//! CBS seeds its first W·K rows, so CBS with W = 1, K = N, L = ∞ returns the same N samples.

use super::cbs::{argmax, reward_candidates};
use super::{Candidate, PrefixScorer, replicated_decoder};
use crate::error::{Error, Result};
use crate::generate::GenerateOptions;
use crate::model::CausalLm;

/// One prompt's N samples (scored by the reward) and the index of the chosen one.
#[derive(Debug, Clone, PartialEq)]
pub struct BestOfN {
    pub candidates: Vec<Candidate>,
    pub best: usize,
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
    if n == 0 {
        return Err(Error::InvalidRequest("Best-of-N needs N ≥ 1".into()));
    }
    let generations = {
        let _g = tch::no_grad_guard();
        let mut dec = replicated_decoder(policy, prompts, seeds, n, opts.max_new_tokens, opts.pad_token_id)?;
        while !dec.all_finished() {
            dec.step(&opts.sampling, &opts.eos_token_ids, opts.max_new_tokens);
        }
        dec.finish()
    };
    let mut grouped: Vec<Vec<Candidate>> = Vec::with_capacity(prompts.len());
    for (r, generation) in generations.into_iter().enumerate() {
        if r % n == 0 {
            grouped.push(Vec::with_capacity(n));
        }
        grouped.last_mut().expect("pushed above").push(Candidate { generation, score: f64::NAN });
    }
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
