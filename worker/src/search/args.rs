//! ARGS (reward-guided search, greedy): at each step the policy's top-k next tokens are rescored by
//! `log pi(token) + w · term(r(x ⊕ y ⊕ token))` and the argmax is kept. The term is the reward itself
//! (`ArgsWeightUnit::Reward`, Khanov et al.) or, by default, its z-score among the k candidates of the step
//! (`CandidateSd`), so that w means the same against any reward scale (see `reward_terms`). One scorer call per
//! token covers the k candidates of every row; a caching scorer is replicated k-fold before the call and
//! collapsed onto the chosen candidate after it, so it only ever feeds one new token per row.

use iro_common::config::ArgsWeightUnit;
use tch::{Device, Kind, Tensor};

use super::PrefixScorer;
use crate::error::{Error, Result};
use crate::generate::{Generation, left_pad};
use crate::model::{CausalLm, positions_from_valid};

#[derive(Debug, Clone)]
pub struct ArgsParams {
    /// k: candidate tokens per step (the policy's top-k by logit).
    pub top_k: usize,
    /// w: weight of the reward term against the log-probability.
    pub weight: f64,
    /// What w multiplies: the reward, or its z-score among the step's k candidates.
    pub weight_unit: ArgsWeightUnit,
    pub max_new_tokens: usize,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
}

struct Row {
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    finished: bool,
    stopped_at_eos: bool,
}

/// Greedy ARGS for a batch of prompts; `scorer` reads the reward of a prefix (e.g. a `ValueEnsemble`
/// over one reward model). Logprobs are under the unmodified policy, as `generate` reports them.
pub fn args_decode(
    policy: &CausalLm,
    prompts: &[Vec<i64>],
    params: &ArgsParams,
    scorer: &mut dyn PrefixScorer,
) -> Result<Vec<Generation>> {
    let vocab = policy.config.vocab_size() as usize;
    if params.top_k == 0 || params.top_k > vocab || prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::InvalidRequest(format!(
            "ARGS needs non-empty prompts and 1 ≤ k ≤ vocab ({vocab}), got k = {} for {} prompts",
            params.top_k,
            prompts.len()
        )));
    }
    let _g = tch::no_grad_guard();
    let k = params.top_k;
    let b = prompts.len();
    let device = policy.backbone.device();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (ids, valid) = left_pad(prompts, width, params.pad_token_id, device);
    let positions = positions_from_valid(&valid);
    let mut cache = policy.backbone.new_cache(b as i64, (width + params.max_new_tokens) as i64);
    let hidden = policy.backbone.forward(&ids, &valid, &positions, Some(&mut cache));
    let mut next_logits = policy.logits(&hidden.select(1, -1));
    let mut next_pos = positions.select(1, -1) + 1;
    let mut rows: Vec<Row> = (0..b)
        .map(|_| Row { tokens: Vec::new(), logprobs: Vec::new(), finished: false, stopped_at_eos: false })
        .collect();
    let cand_prompts: Vec<Vec<i64>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let replicate: Vec<i64> = (0..b * k).map(|r| (r / k) as i64).collect();
    scorer.reset();
    while params.max_new_tokens > 0 && !rows.iter().all(|r| r.finished) {
        let logp = next_logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let (top_lp, top_ids) = logp.topk(k as i64, -1, true, true);
        let top_lp: Vec<f32> = Vec::try_from(top_lp.to_device(Device::Cpu).reshape([-1])).expect("f32 top-k");
        let top_ids: Vec<i64> = Vec::try_from(top_ids.to_device(Device::Cpu).reshape([-1])).expect("i64 top-k");
        let mut responses = Vec::with_capacity(b * k);
        let mut finished = Vec::with_capacity(b * k);
        for (i, row) in rows.iter().enumerate() {
            for j in 0..k {
                let mut y = row.tokens.clone();
                if row.finished {
                    finished.push(true);
                } else {
                    let t = top_ids[i * k + j];
                    y.push(t);
                    finished.push(params.eos_token_ids.contains(&t) || y.len() >= params.max_new_tokens);
                }
                responses.push(y);
            }
        }
        scorer.reorder(&replicate);
        let rewards = scorer.score(&cand_prompts, &responses, &finished)?;
        let mut chosen = Vec::with_capacity(b);
        let mut fed = Vec::with_capacity(b);
        let mut live = Vec::with_capacity(b);
        for (i, row) in rows.iter_mut().enumerate() {
            if row.finished {
                chosen.push((i * k) as i64);
                fed.push(params.pad_token_id);
                live.push(false);
                continue;
            }
            // Ties go to the higher-logit candidate (top-k order).
            let terms = reward_terms(&rewards[i * k..(i + 1) * k], params.weight_unit);
            let mut best = 0;
            let mut best_score = f64::NEG_INFINITY;
            for j in 0..k {
                let s = top_lp[i * k + j] as f64 + params.weight * terms[j];
                if s > best_score {
                    best = j;
                    best_score = s;
                }
            }
            let t = top_ids[i * k + best];
            chosen.push((i * k + best) as i64);
            row.tokens.push(t);
            row.logprobs.push(top_lp[i * k + best]);
            row.stopped_at_eos = params.eos_token_ids.contains(&t);
            row.finished = finished[i * k + best];
            fed.push(t);
            live.push(true);
        }
        scorer.reorder(&chosen);
        if rows.iter().all(|r| r.finished) {
            break;
        }
        let ids = Tensor::from_slice(&fed).to_device(device).unsqueeze(1);
        let valid = Tensor::from_slice(&live).to_device(device).unsqueeze(1);
        let hidden = policy.backbone.forward(&ids, &valid, &next_pos.unsqueeze(1), Some(&mut cache));
        next_logits = policy.logits(&hidden.select(1, 0));
        next_pos = &next_pos + 1;
    }
    Ok(rows
        .into_iter()
        .map(|r| Generation { tokens: r.tokens, logprobs: r.logprobs, stopped_at_eos: r.stopped_at_eos })
        .collect())
}

/// What w multiplies for one row's k candidate rewards. `Reward`: the rewards as they are. `CandidateSd`:
/// (r_j − mean) / sd with the mean and population sd of the k rewards (NaNs left out, and kept as NaN so they
/// are never picked): the candidates' ranking by reward, in units of their own spread. The shift by the mean
/// changes no argmax. When the rewards do not differ (sd ≤ 1e-6 · (1 + |mean|), which also absorbs f32 noise
/// between candidates whose texts score the same), every term is 0: nothing to choose between, and noise
/// blown up to ±1 would override the log-probability.
pub fn reward_terms(rewards: &[f64], unit: ArgsWeightUnit) -> Vec<f64> {
    match unit {
        ArgsWeightUnit::Reward => rewards.to_vec(),
        ArgsWeightUnit::CandidateSd => {
            let numbers: Vec<f64> = rewards.iter().copied().filter(|r| !r.is_nan()).collect();
            let n = numbers.len().max(1) as f64;
            let mean = numbers.iter().sum::<f64>() / n;
            let sd = (numbers.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
            if sd <= 1e-6 * (1.0 + mean.abs()) {
                return rewards.iter().map(|r| if r.is_nan() { f64::NAN } else { 0.0 }).collect();
            }
            rewards.iter().map(|r| (r - mean) / sd).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_sd_terms_are_z_scores_and_vanish_when_the_rewards_do_not_differ() {
        let z = reward_terms(&[0.60, 0.62, 0.70, f64::NAN], ArgsWeightUnit::CandidateSd);
        let (mean, sd) = (0.64, (0.0056f64 / 3.0).sqrt());
        for (got, r) in z.iter().zip([0.60, 0.62, 0.70]) {
            assert!((got - (r - mean) / sd).abs() < 1e-9, "{z:?}");
        }
        assert!(z[3].is_nan(), "a NaN reward stays NaN, so it is never the argmax");
        // The same spread on another scale gives the same terms.
        let stretched = reward_terms(&[6.0, 6.2, 7.0], ArgsWeightUnit::CandidateSd);
        for (a, b) in z.iter().zip(&stretched) {
            assert!((a - b).abs() < 1e-9);
        }
        assert_eq!(reward_terms(&[0.3, 0.3 + 1e-8, 0.3], ArgsWeightUnit::CandidateSd), vec![0.0; 3]);
        assert_eq!(reward_terms(&[2.5], ArgsWeightUnit::CandidateSd), vec![0.0]);
        assert_eq!(reward_terms(&[0.3, 0.7], ArgsWeightUnit::Reward), vec![0.3, 0.7]);
    }
}
