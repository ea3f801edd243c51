//! What the report says about each value function: how well V_t (and the guiding sum Σ V_i/β_i) ranks held-out
//! candidates the way the reward does. The candidates are each test prompt's N plain samples, drawn with
//! Best-of-N's seeds (so at iteration 1 they are Best-of-N's own candidates, and every iteration sees the same
//! ones), scored complete and cut after the first chunk (what CBS's first selection compares).

use std::collections::HashMap;

use iro_common::records::ValueDiagnostics;

use super::Pipeline;
use super::data::PromptItem;
use super::scoring::TextRewardScorer;
use crate::error::Result;
use crate::generate::GenerateOptions;
use crate::search::{Candidate, PrefixScorer, best_of_n};

impl Pipeline {
    /// Per prompt of `items`, its diagnostics at iteration `t` (V_1..V_t loaded), from `baselines.best_of_n`
    /// candidates each. `drawn` holds candidates
    /// already sampled this task (Best-of-N's, by prompt id); the others are sampled here.
    pub(super) fn value_diagnostics(
        &self,
        t: u32,
        items: &[PromptItem],
        drawn: &HashMap<String, Vec<Candidate>>,
    ) -> Result<Vec<ValueDiagnostics>> {
        let n = self.config.baselines.best_of_n;
        let opts = GenerateOptions {
            max_new_tokens: self.config.sampling.max_new_tokens,
            sampling: self.sampling(),
            eos_token_ids: self.eos.clone(),
            pad_token_id: self.pad,
        };
        let per_batch = (self.config.sampling.batch_size / n).max(1);
        let mut candidates: Vec<Vec<Candidate>> = Vec::with_capacity(items.len());
        for batch in items.chunks(per_batch) {
            let missing: Vec<&PromptItem> = batch.iter().filter(|p| !drawn.contains_key(&p.id)).collect();
            let mut fresh = HashMap::new();
            if !missing.is_empty() {
                let prompts: Vec<Vec<i64>> = missing.iter().map(|p| p.ids.clone()).collect();
                let seeds: Vec<u64> = missing.iter().map(|p| p.seed).collect();
                let owned: Vec<PromptItem> = missing.iter().map(|p| (*p).clone()).collect();
                let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, &owned);
                for (p, found) in missing.iter().zip(best_of_n(&self.policy, &prompts, &seeds, n, &opts, &mut reward)?) {
                    fresh.insert(p.id.clone(), found.candidates);
                }
            }
            for p in batch {
                candidates.push(drawn.get(&p.id).or_else(|| fresh.get(&p.id)).cloned().unwrap_or_default());
            }
        }
        let prefix = self.config.search.chunk_length.min(self.config.sampling.max_new_tokens);
        let mut rows = Vec::with_capacity(items.len());
        let (mut value, mut guide) = (self.single_value_scorer(t)?, self.value_scorer(t)?);
        for (item, cands) in items.iter().zip(&candidates) {
            let prompts = vec![item.ids.clone(); cands.len()];
            let full: Vec<Vec<i64>> = cands.iter().map(|c| c.generation.tokens.clone()).collect();
            let done: Vec<bool> = cands.iter().map(|c| c.generation.stopped_at_eos).collect();
            let cut: Vec<Vec<i64>> = full.iter().map(|r| r[..r.len().min(prefix)].to_vec()).collect();
            // A cut row is finished only when the whole response fit in the prefix.
            let cut_done: Vec<bool> = full.iter().zip(&done).map(|(r, &d)| d && r.len() <= prefix).collect();
            let score = |s: &mut Box<dyn PrefixScorer + '_>, r: &[Vec<i64>], d: &[bool]| {
                s.reset();
                s.score(&prompts, r, d)
            };
            rows.push(ValueDiagnostics {
                // Best-of-N scored its candidates with the training reward.
                rewards: cands.iter().map(|c| c.score).collect(),
                value: score(&mut value, &full, &done)?,
                guide: score(&mut guide, &full, &done)?,
                prefix_tokens: prefix as u32,
                value_prefix: score(&mut value, &cut, &cut_done)?,
                guide_prefix: score(&mut guide, &cut, &cut_done)?,
            });
        }
        Ok(rows)
    }
}
