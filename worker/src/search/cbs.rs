//! Chunk-level beam search (Weak-to-Strong Search; IRO's guided rollout): W·K rows per prompt sample L
//! tokens, every row is scored, the W best distinct partial responses per prompt are kept
//! ("diversity-first") and each is replicated K times, with the policy's KV cache (and the scorer's)
//! reordered to match.

use std::collections::{HashMap, HashSet};

use super::{Candidate, PrefixScorer, repeat_prompts, replicated_decoder};
use crate::error::{Error, Result};
use crate::generate::sampler::SamplingParams;
use crate::model::CausalLm;

#[derive(Debug, Clone)]
pub struct CbsParams {
    /// W: beams kept per prompt.
    pub beams: usize,
    /// K: successors sampled from each beam.
    pub successors: usize,
    /// L: tokens per chunk; `usize::MAX` never selects (W = 1, K = N is then Best-of-N).
    pub chunk_len: usize,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
}

/// Which of a prompt's W·K final rows is its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalPick {
    /// The reward model's argmax (the reported IRO number).
    RewardArgmax,
    /// The guiding score's argmax.
    ValueArgmax,
    /// Row 0: the best-scored beam of the last selection.
    First,
}

/// The rows to keep out of one prompt's rows: the `w` best distinct responses by score, then, when fewer
/// than `w` are distinct, the best remaining rows (duplicates of kept ones). Ties go to the lower row
/// index; a NaN score ranks last. Returns row indices in the order picked.
///
/// Copies of one response rank as one: each is ranked by the best score among them, so the lowest-indexed copy
/// goes first. Their true scores are equal, but libtorch can give identical sequences in different batch rows
/// scores that differ in the last bits, and which copy is kept decides whose random stream samples on: ranking
/// by the noise made a prompt's answer depend on the rows it was batched with.
pub fn select_diverse(responses: &[&[i64]], scores: &[f64], w: usize) -> Vec<usize> {
    assert_eq!(responses.len(), scores.len(), "one score per response");
    let raw = |i: usize| if scores[i].is_nan() { f64::NEG_INFINITY } else { scores[i] };
    let mut best: HashMap<&[i64], f64> = HashMap::new();
    for (i, r) in responses.iter().enumerate() {
        let b = best.entry(r).or_insert(f64::NEG_INFINITY);
        *b = b.max(raw(i));
    }
    let key = |i: usize| best[responses[i]];
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable sort: equal scores keep index order.
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
    let mut seen: HashSet<&[i64]> = HashSet::new();
    let mut picked = Vec::with_capacity(w);
    let mut taken = vec![false; scores.len()];
    for &i in &order {
        if picked.len() == w {
            break;
        }
        if seen.insert(responses[i]) {
            picked.push(i);
            taken[i] = true;
        }
    }
    for &i in &order {
        if picked.len() == w {
            break;
        }
        if !taken[i] {
            picked.push(i);
            taken[i] = true;
        }
    }
    picked
}

/// What CBS returns for a batch of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct CbsOutput {
    /// Per prompt, its W·K final rows with their last score.
    pub candidates: Vec<Vec<Candidate>>,
    /// Per prompt, the tokens actually sampled for it: one per live row per decoding step, so pruned rows
    /// count and copies of a finished beam do not.
    pub sampled: Vec<u64>,
}

/// Runs CBS for every prompt together (rows = prompts × W·K). `seeds[p]` seeds prompt p's rows. Returns,
/// per prompt, all W·K final rows with their last score.
///
/// Each prompt stops on its own, as the official one-prompt-at-a-time search does (`cbs_modified.py`): at a
/// chunk boundary where all of its rows have finished, where max_new_tokens is reached, or where the W rows
/// the selection would keep have all finished, the prompt is done and returns its W·K rows as they stand,
/// *before* that selection (unfinished ones cut there), so the final pick sees every distinct candidate.
/// A done prompt's rows are never reordered again, so its answer does not depend on the other prompts of
/// its batch. While a prompt runs, row 0 is the best kept beam's first successor.
pub fn chunk_beam_search(
    policy: &CausalLm,
    prompts: &[Vec<i64>],
    seeds: &[u64],
    params: &CbsParams,
    scorer: &mut dyn PrefixScorer,
) -> Result<CbsOutput> {
    let (w, k) = (params.beams, params.successors);
    if w == 0 || k == 0 || params.chunk_len == 0 || params.max_new_tokens == 0 {
        return Err(Error::InvalidRequest(format!(
            "CBS needs W, K, L and max_new_tokens ≥ 1 (W={w}, K={k}, L={}, max_new_tokens={})",
            params.chunk_len, params.max_new_tokens
        )));
    }
    let _g = tch::no_grad_guard();
    let group = w * k;
    // A head on an intermediate layer reads that layer's states: the decoder keeps them beside the logits.
    let tap = if scorer.reads_policy_hidden() { scorer.feature_depth() } else { None };
    let mut dec = replicated_decoder(policy, prompts, seeds, group, params.max_new_tokens, params.pad_token_id, tap)?;
    let row_prompts = repeat_prompts(prompts, group);
    scorer.reset();
    let rows = dec.batch();
    let mut done = vec![false; prompts.len()];
    let mut final_scores = vec![f64::NAN; rows];
    let mut sampled = vec![0u64; prompts.len()];
    let mut generated = 0usize;
    while done.iter().any(|d| !d) {
        let target = generated.saturating_add(params.chunk_len).min(params.max_new_tokens);
        while generated < target && !dec.all_finished() {
            for r in (0..rows).filter(|&r| !dec.is_finished(r)) {
                sampled[r / group] += 1;
            }
            dec.step(&params.sampling, &params.eos_token_ids, params.max_new_tokens);
            generated += 1;
        }
        let responses: Vec<Vec<i64>> = (0..rows).map(|r| dec.tokens(r).to_vec()).collect();
        let scores = if scorer.reads_policy_hidden() {
            // A head on the policy's backbone reads the states the decoder already has: no forward pass of its own.
            let hidden = dec.scoring_features(&params.eos_token_ids, scorer.feature_pooling());
            scorer.score_policy_hidden(&hidden)?
        } else {
            let finished: Vec<bool> = (0..rows).map(|r| dec.is_finished(r)).collect();
            scorer.score(&row_prompts, &responses, &finished)?
        };
        let at_limit = generated >= params.max_new_tokens;
        // Identity for done prompts; the selection, each kept row K times, for the others.
        let mut index: Vec<i64> = (0..rows as i64).collect();
        let mut forks = vec![0u64; rows];
        let mut moved = false;
        let mut stop = Vec::new();
        for g in 0..prompts.len() {
            if done[g] {
                continue;
            }
            let span = g * group..(g + 1) * group;
            let keep = if at_limit || span.clone().all(|r| dec.is_finished(r)) {
                None
            } else {
                let views: Vec<&[i64]> = responses[span.clone()].iter().map(Vec::as_slice).collect();
                let keep = select_diverse(&views, &scores[span.clone()], w);
                // Kept beams that have all finished would only be copied K times: stop before selecting.
                if keep.iter().all(|&i| dec.is_finished(g * group + i)) { None } else { Some(keep) }
            };
            match keep {
                None => {
                    done[g] = true;
                    final_scores[span.clone()].copy_from_slice(&scores[span.clone()]);
                    stop.extend(span.filter(|&r| !dec.is_finished(r)));
                }
                Some(keep) => {
                    moved = true;
                    for (b, kept) in keep.into_iter().enumerate() {
                        for j in 0..k {
                            index[g * group + b * k + j] = (g * group + kept) as i64;
                            forks[g * group + b * k + j] = (b * k + j) as u64;
                        }
                    }
                }
            }
        }
        dec.stop_rows(&stop);
        if moved && done.iter().any(|d| !d) {
            dec.reorder(&index, Some(&forks));
            scorer.reorder(&index);
        }
    }
    let mut candidates: Vec<Vec<Candidate>> = Vec::with_capacity(prompts.len());
    for (r, (generation, score)) in dec.finish().into_iter().zip(final_scores).enumerate() {
        if r % group == 0 {
            candidates.push(Vec::with_capacity(group));
        }
        candidates.last_mut().expect("pushed above").push(Candidate { generation, score });
    }
    Ok(CbsOutput { candidates, sampled })
}

/// Index of the chosen row per prompt. `reward` is required for `RewardArgmax` (scored with EOS appended
/// to rows that stopped at EOS-less cut-offs: every final row counts as finished). Ties go to the lower row.
pub fn pick_final(
    prompts: &[Vec<i64>],
    candidates: &[Vec<Candidate>],
    pick: FinalPick,
    reward: Option<&mut dyn PrefixScorer>,
) -> Result<Vec<usize>> {
    match pick {
        FinalPick::First => Ok(vec![0; candidates.len()]),
        FinalPick::ValueArgmax => {
            Ok(candidates.iter().map(|c| argmax(&c.iter().map(|c| c.score).collect::<Vec<_>>())).collect())
        }
        FinalPick::RewardArgmax => {
            let reward =
                reward.ok_or_else(|| Error::InvalidRequest("final = reward_argmax needs a reward model".into()))?;
            let rewards = reward_candidates(prompts, candidates, reward)?;
            Ok(rewards.iter().map(|r| argmax(r)).collect())
        }
    }
}

/// Rewards of every candidate, per prompt (one scorer call for the whole batch).
pub fn reward_candidates(
    prompts: &[Vec<i64>],
    candidates: &[Vec<Candidate>],
    reward: &mut dyn PrefixScorer,
) -> Result<Vec<Vec<f64>>> {
    if prompts.len() != candidates.len() {
        return Err(Error::InvalidRequest(format!("{} prompts, {} candidate lists", prompts.len(), candidates.len())));
    }
    let mut row_prompts = Vec::new();
    let mut responses = Vec::new();
    for (p, cs) in prompts.iter().zip(candidates) {
        for c in cs {
            row_prompts.push(p.clone());
            responses.push(c.generation.tokens.clone());
        }
    }
    reward.reset();
    let flat = reward.score(&row_prompts, &responses, &vec![true; responses.len()])?;
    let mut it = flat.into_iter();
    Ok(candidates.iter().map(|cs| it.by_ref().take(cs.len()).collect()).collect())
}

/// First index of the maximum; NaN never wins over a number.
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || (xs[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(items: &[(&[i64], f64)], w: usize) -> Vec<usize> {
        let r: Vec<&[i64]> = items.iter().map(|i| i.0).collect();
        let s: Vec<f64> = items.iter().map(|i| i.1).collect();
        select_diverse(&r, &s, w)
    }

    #[test]
    fn diversity_first_keeps_the_best_distinct_responses() {
        // Rows 0 and 2 are the same text with the top scores: only one of them is kept while others differ.
        let items: [(&[i64], f64); 5] = [(&[1, 2], 0.9), (&[1, 3], 0.5), (&[1, 2], 0.9), (&[4], 0.7), (&[5], 0.1)];
        assert_eq!(sel(&items, 3), vec![0, 3, 1]);
    }

    #[test]
    fn fewer_distinct_than_w_fills_with_the_best_duplicates() {
        let items: [(&[i64], f64); 4] = [(&[7], 0.2), (&[8], 0.8), (&[8], 0.6), (&[7], 0.3)];
        // Distinct: [8] (row 1), [7] (row 0, its first copy, ranked by its copies' best 0.3); then the
        // remaining copies, [8]'s before [7]'s.
        assert_eq!(sel(&items, 4), vec![1, 0, 2, 3]);
        assert_eq!(sel(&items, 3), vec![1, 0, 2]);
    }

    #[test]
    fn copies_of_a_response_whose_scores_differ_in_the_last_bits_keep_the_first_copy() {
        // Rows 0 and 2 are one response; its score came out a hair higher in row 2. The pick must not follow
        // that noise: row 0 first, whichever copy scored higher.
        let items: [(&[i64], f64); 4] = [(&[1, 2], 0.5), (&[3], 0.1), (&[1, 2], 0.5 + 1e-9), (&[4], 0.3)];
        assert_eq!(sel(&items, 2), vec![0, 3]);
        assert_eq!(sel(&items, 4), vec![0, 3, 1, 2]);
        let swapped: [(&[i64], f64); 4] = [(&[1, 2], 0.5 + 1e-9), (&[3], 0.1), (&[1, 2], 0.5), (&[4], 0.3)];
        assert_eq!(sel(&swapped, 2), vec![0, 3]);
    }

    #[test]
    fn ties_go_to_the_lower_row_and_nan_ranks_last() {
        let items: [(&[i64], f64); 4] = [(&[1], f64::NAN), (&[2], 0.5), (&[3], 0.5), (&[3], 0.5)];
        assert_eq!(sel(&items, 2), vec![1, 2]);
        assert_eq!(sel(&items, 4), vec![1, 2, 0, 3]);
        // All identical: duplicates in index order.
        let same: [(&[i64], f64); 3] = [(&[9], 1.0), (&[9], 1.0), (&[9], 1.0)];
        assert_eq!(sel(&same, 2), vec![0, 1]);
    }

    #[test]
    fn argmax_prefers_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f64::NAN, 0.0, -1.0]), 1);
    }
}
