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
        let opts = self.generate_options();
        let per_batch = (self.config.sampling.batch_size / n).max(1);
        let prefix = self.config.search.chunk_length.min(self.config.sampling.max_new_tokens);
        let (mut value, mut guide) = (self.single_value_scorer(t)?, self.value_scorer(t)?);
        let mut rows = Vec::with_capacity(items.len());
        for batch in items.chunks(per_batch) {
            let missing: Vec<&PromptItem> = batch.iter().filter(|p| !drawn.contains_key(&p.id)).collect();
            let mut fresh = HashMap::new();
            if !missing.is_empty() {
                let prompts: Vec<Vec<i64>> = missing.iter().map(|p| p.ids.clone()).collect();
                let seeds: Vec<u64> = missing.iter().map(|p| p.seed).collect();
                let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
                for (p, found) in missing.iter().zip(best_of_n(&self.policy, &prompts, &seeds, n, &opts, &mut reward)?)
                {
                    fresh.insert(p.id.as_str(), found.candidates);
                }
            }
            let candidates: Vec<&[Candidate]> = batch
                .iter()
                .map(|p| drawn.get(&p.id).or_else(|| fresh.get(p.id.as_str())).map_or(&[][..], Vec::as_slice))
                .collect();
            // Every candidate of the batch in one call per scorer and length.
            let all = || batch.iter().zip(&candidates).flat_map(|(p, cs)| cs.iter().map(move |c| (p, c)));
            let prompts: Vec<Vec<i64>> = all().map(|(p, _)| p.ids.clone()).collect();
            let full: Vec<Vec<i64>> = all().map(|(_, c)| c.generation.tokens.clone()).collect();
            let done: Vec<bool> = all().map(|(_, c)| c.generation.stopped_at_eos).collect();
            let cut: Vec<Vec<i64>> = full.iter().map(|r| r[..r.len().min(prefix)].to_vec()).collect();
            // A cut row is finished only when the whole response fit in the prefix.
            let cut_done: Vec<bool> = full.iter().zip(&done).map(|(r, &d)| d && r.len() <= prefix).collect();
            let score = |s: &mut Box<dyn PrefixScorer + '_>, r: &[Vec<i64>], d: &[bool]| {
                s.reset();
                s.score(&prompts, r, d).map(Vec::into_iter)
            };
            let (mut v, mut g) = (score(&mut value, &full, &done)?, score(&mut guide, &full, &done)?);
            let (mut vp, mut gp) = (score(&mut value, &cut, &cut_done)?, score(&mut guide, &cut, &cut_done)?);
            for cs in candidates {
                let n = cs.len();
                rows.push(ValueDiagnostics {
                    // Best-of-N scored its candidates with the training reward.
                    rewards: cs.iter().map(|c| c.score).collect(),
                    value: v.by_ref().take(n).collect(),
                    guide: g.by_ref().take(n).collect(),
                    prefix_tokens: prefix as u32,
                    value_prefix: vp.by_ref().take(n).collect(),
                    guide_prefix: gp.by_ref().take(n).collect(),
                });
            }
        }
        Ok(rows)
    }
}
