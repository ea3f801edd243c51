//! An eval shard (iro.md step 5): held-out prompts decoded with pi_t (CBS guided by V_1..V_t, the final row
//! picked as `search.final` says) and, at iteration 1, with every configured baseline on the same prompts and
//! seeds. Each answer is scored by the evaluation reward; the report aggregates the rows.

use std::time::Instant;

use iro_common::config::{Baseline, FinalPick};
use iro_common::layout::ShardedPhase;
use iro_common::records::{EvalRecord, ShardAttempt, write_shard};

use super::Pipeline;
use super::data::{self, PromptItem, phase_seed, prompt_items};
use super::scoring::TextRewardScorer;
use crate::error::{Error, Result};
use crate::generate::generate;
use crate::model::CausalLm;
use crate::reward::RewardInput;
use crate::runtime::{TaskControl, TaskOutput};
use crate::search::{self, ArgsParams, ImplicitReward, args_decode, best_of_n, chunk_beam_search, pick_final};

/// A decoding method under evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Iro,
    Base(Baseline),
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Iro => "iro",
            Method::Base(Baseline::Base) => "base",
            Method::Base(Baseline::BestOfN) => "best_of_n",
            Method::Base(Baseline::Args) => "args",
            Method::Base(Baseline::WeakToStrong) => "weak_to_strong",
        }
    }
}

/// One prompt's answer and what producing it cost.
struct Answer {
    tokens: Vec<i64>,
    /// Tokens sampled for this prompt, every candidate included.
    sampled: u64,
    kl_bound: Option<f64>,
    /// Every candidate the method drew (kept from Best-of-N for the value diagnostics).
    candidates: Option<Vec<search::Candidate>>,
}

impl Pipeline {
    pub(super) fn eval(&mut self, t: u32, shard: u32, attempt: u32, control: &TaskControl) -> Result<TaskOutput> {
        let picked = data::shard_of(self.data.test_prompts(), shard, self.config.cluster.shard_size)?.to_vec();
        let items = self.test_items(&picked)?;
        self.ensure_values(t)?;
        let mut methods = vec![Method::Iro];
        if t == 1 {
            methods.extend(self.config.baselines.methods.iter().map(|&b| Method::Base(b)));
        }
        if methods.contains(&Method::Base(Baseline::WeakToStrong)) && self.w2s.is_none() {
            let b = &self.config.baselines;
            let load = |dir: &std::path::Path| CausalLm::load(dir, self.kind, self.device);
            self.w2s = Some((load(&b.w2s_tuned)?, load(&b.w2s_untuned)?));
        }
        let reference_rewards = self.reference_rewards(&items)?;
        let total = (methods.len() * items.len()) as u64;
        let mut records = Vec::new();
        let mut tokens = 0u64;
        control.set_progress(0, total);
        for &method in &methods {
            let per_batch = self.eval_batch(method);
            let mut answers = Vec::with_capacity(items.len());
            let mut seconds = Vec::with_capacity(items.len());
            for batch in items.chunks(per_batch) {
                control.check("eval shard")?;
                let start = Instant::now();
                answers.extend(self.answer(method, t, batch)?);
                seconds.extend(std::iter::repeat_n(start.elapsed().as_secs_f64() / batch.len() as f64, batch.len()));
                control.set_progress((records.len() + answers.len()) as u64, total);
            }
            let texts: Vec<String> =
                answers.iter().map(|a| self.tokenizer.decode(&a.tokens, true)).collect::<Result<_>>()?;
            let inputs: Vec<RewardInput<'_>> = items
                .iter()
                .zip(&texts)
                .map(|(p, r)| RewardInput {
                    prompt: &p.text,
                    raw_prompt: &p.display,
                    response: r,
                    reference: p.reference.as_deref(),
                })
                .collect();
            let rewards = self.eval_reward().score(&inputs)?;
            for (i, ((item, mut answer), output)) in items.iter().zip(answers).zip(texts).enumerate() {
                tokens += answer.sampled;
                if let Some(c) = answer.candidates.take() {
                    self.drawn.insert(item.id.clone(), c);
                }
                records.push(EvalRecord {
                    instruction: item.display.clone(),
                    output,
                    generator: if method == Method::Iro { format!("iro/iter-{t}") } else { method.name().into() },
                    dataset: item.dataset.clone(),
                    prompt_id: item.id.clone(),
                    method: method.name().into(),
                    iteration: t,
                    reward: Some(rewards[i]),
                    tokens: answer.sampled,
                    length: answer.tokens.len() as u64,
                    reference: item.reference.clone(),
                    reference_reward: reference_rewards.as_ref().map(|r| r[i]),
                    kl_bound: answer.kl_bound,
                    seconds: seconds[i],
                    diagnostics: None,
                });
            }
            tracing::info!(method = method.name(), prompts = items.len(), "evaluated");
        }
        if self.config.baselines.best_of_n >= 2 {
            // How V_t ranks held-out candidates, on IRO's rows (Best-of-N's own candidates where it ran).
            let found = self.value_diagnostics(t, &items, &self.drawn)?;
            for (r, d) in records.iter_mut().filter(|r| r.method == Method::Iro.name()).zip(found) {
                r.diagnostics = Some(d);
            }
        }
        let at = ShardAttempt { iteration: t, phase: ShardedPhase::Eval, shard, attempt };
        let entry = self.block_on(write_shard(&self.store, &self.layout, at, &records, tokens))?;
        Ok(TaskOutput { key: entry.key, sha256: entry.sha256, records: entry.records, tokens })
    }

    /// The test prompts at `picked`, formatted and seeded as every evaluation (and the benchmark) sees them: the
    /// seed depends on the run seed and the prompt only, so every method and iteration shares a prompt's draws.
    pub(super) fn test_items(&self, picked: &[usize]) -> Result<Vec<PromptItem>> {
        let c = &self.config;
        prompt_items(
            &self.data.test,
            picked,
            c.policy.prompt_format,
            c.policy.max_prompt_tokens,
            &self.tokenizer,
            phase_seed(c.run.seed, None),
        )
    }

    /// Prompts per forward batch: searches run W·K (or N) rows per prompt.
    fn eval_batch(&self, method: Method) -> usize {
        let s = &self.config.search;
        let rows = match method {
            Method::Iro | Method::Base(Baseline::WeakToStrong) => s.beams * s.successors,
            Method::Base(Baseline::BestOfN) => self.config.baselines.best_of_n,
            Method::Base(Baseline::Args) => self.config.baselines.args_k,
            Method::Base(Baseline::Base) => 1,
        };
        (self.config.sampling.batch_size / rows.max(1)).max(1)
    }

    /// The evaluation reward of each prompt's reference answer, where a win rate against it means something:
    /// a reward model scores the reference like any response; a similarity-to-reference reward would give
    /// the reference a perfect score by construction.
    fn reference_rewards(&self, items: &[PromptItem]) -> Result<Option<Vec<f64>>> {
        if self.config.reward.kind != iro_common::config::RewardKind::Model {
            return Ok(None);
        }
        let Some(refs) = items.iter().map(|p| p.reference.as_deref()).collect::<Option<Vec<&str>>>() else {
            return Ok(None);
        };
        let inputs: Vec<RewardInput<'_>> = items
            .iter()
            .zip(refs)
            .map(|(p, r)| RewardInput { prompt: &p.text, raw_prompt: &p.display, response: r, reference: Some(r) })
            .collect();
        self.eval_reward().score(&inputs).map(Some)
    }

    fn answer(&self, method: Method, t: u32, batch: &[PromptItem]) -> Result<Vec<Answer>> {
        let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
        let seeds: Vec<u64> = batch.iter().map(|p| p.seed).collect();
        let max_new_tokens = self.config.sampling.max_new_tokens;
        let opts = self.generate_options();
        match method {
            Method::Base(Baseline::Base) => Ok(generate(&self.policy, &prompts, &seeds, &opts)?
                .into_iter()
                .map(|g| Answer {
                    sampled: g.tokens.len() as u64,
                    tokens: g.tokens,
                    kl_bound: Some(0.0),
                    candidates: None,
                })
                .collect()),
            Method::Base(Baseline::BestOfN) => {
                let n = self.config.baselines.best_of_n;
                let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
                let found = best_of_n(&self.policy, &prompts, &seeds, n, &opts, &mut reward)?;
                // KL(best-of-n ‖ base) ≤ log n − (n − 1)/n (Beirami et al., 2024).
                let bound = (n as f64).ln() - (n as f64 - 1.0) / n as f64;
                Ok(found
                    .into_iter()
                    .map(|b| Answer {
                        sampled: b.candidates.iter().map(|c| c.generation.tokens.len() as u64).sum(),
                        tokens: b.candidates[b.best].generation.tokens.clone(),
                        kl_bound: Some(bound),
                        candidates: Some(b.candidates),
                    })
                    .collect())
            }
            Method::Base(Baseline::Args) => {
                let b = &self.config.baselines;
                let params = ArgsParams {
                    top_k: b.args_k,
                    weight: b.args_weight,
                    weight_unit: b.args_weight_unit,
                    max_new_tokens,
                    eos_token_ids: self.eos.clone(),
                    pad_token_id: self.pad,
                };
                let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
                Ok(args_decode(&self.policy, &prompts, &params, &mut reward)?
                    .into_iter()
                    .map(|g| Answer {
                        sampled: g.tokens.len() as u64,
                        tokens: g.tokens,
                        kl_bound: None,
                        candidates: None,
                    })
                    .collect())
            }
            Method::Base(Baseline::WeakToStrong) => {
                let (tuned, untuned) = self.w2s.as_ref().ok_or_else(|| {
                    Error::InvalidRequest("weak_to_strong needs baselines.w2s_tuned and w2s_untuned".into())
                })?;
                let mut scorer = ImplicitReward::new(tuned, untuned)?;
                let found = chunk_beam_search(&self.policy, &prompts, &seeds, &self.cbs_params(), &mut scorer)?;
                // Weak-to-Strong Search answers with its best beam by its own (implicit) score.
                self.pick(found, batch, FinalPick::ValueArgmax)
            }
            Method::Iro => {
                let mut scorer = self.value_scorer(t)?;
                let found = chunk_beam_search(&self.policy, &prompts, &seeds, &self.cbs_params(), scorer.as_mut())?;
                self.pick(found, batch, self.config.search.final_pick)
            }
        }
    }

    fn pick(&self, found: search::CbsOutput, batch: &[PromptItem], pick: FinalPick) -> Result<Vec<Answer>> {
        let (w, k, l) = (self.config.search.beams, self.config.search.successors, self.config.search.chunk_length);
        let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
        let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
        let search_pick = match pick {
            FinalPick::RewardArgmax => search::FinalPick::RewardArgmax,
            FinalPick::ValueArgmax => search::FinalPick::ValueArgmax,
            FinalPick::First => search::FinalPick::First,
        };
        let chosen = pick_final(&prompts, &found.candidates, search_pick, Some(&mut reward))?;
        let mut out = Vec::with_capacity(found.candidates.len());
        for ((cands, chosen), sampled) in found.candidates.into_iter().zip(chosen).zip(found.sampled) {
            let tokens = cands[chosen].generation.tokens.clone();
            // An answer y of r = ⌈|y|/L⌉ chunks is among at most W·K^r rows that share its prefixes, whatever
            // the selection and the final pick, so log q(y)/p(y) ≤ log(W·K) + (r − 1)·log K (p: the warped
            // sampler). This holds for `first` too: row 0 descends from the best of W·K rows.
            let rounds = tokens.len().div_ceil(l).saturating_sub(1) as f64;
            out.push(Answer { sampled, tokens, kl_bound: Some(cbs_kl_bound(w, k, rounds)), candidates: None });
        }
        Ok(out)
    }
}

/// The KL bound of a CBS answer after `rounds` selections past the first chunk (see `Pipeline::pick`).
pub(super) fn cbs_kl_bound(w: usize, k: usize, rounds: f64) -> f64 {
    ((w * k) as f64).ln() + rounds * (k as f64).ln()
}

#[cfg(test)]
mod tests {
    use super::cbs_kl_bound;

    #[test]
    fn the_cbs_kl_bound_counts_the_first_selection_for_every_pick() {
        // W = 4, K = 1 is best-of-4 by value at every boundary: log 4, never 0.
        assert!((cbs_kl_bound(4, 1, 3.0) - 4f64.ln()).abs() < 1e-12);
        assert!((cbs_kl_bound(2, 2, 0.0) - 4f64.ln()).abs() < 1e-12);
        assert!((cbs_kl_bound(2, 2, 2.0) - 16f64.ln()).abs() < 1e-12);
    }
}
