//! What the report says about each value function: how well V_t (and the guiding sum Σ V_i/β_i) ranks held-out
//! candidates the way the reward does. The candidates are each test prompt's N plain samples, drawn with
//! Best-of-N's seeds (so at iteration 1 they are Best-of-N's own candidates, and every iteration sees the same
//! ones), scored complete and cut after the first chunk (what CBS's first selection compares).

use std::collections::HashMap;

use iro_common::records::ValueDiagnostics;
use tch::Tensor;

use super::Pipeline;
use super::data::PromptItem;
use super::scoring::TextRewardScorer;
use crate::error::Result;
use crate::generate::left_pad;
use crate::model::positions_from_valid;
use crate::search::{Candidate, PrefixScorer, best_of_n};
use crate::train::pool_columns;
use iro_common::config::ValuePooling;

impl Pipeline {
    /// Per prompt of `items`, its diagnostics at iteration `t` (V_1..V_t loaded), from `baselines.best_of_n`
    /// candidates each. `drawn` holds candidates already sampled by this process (Best-of-N's, by prompt id); the
    /// others are sampled here.
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
            let ((mut v, mut g), (mut vp, mut gp)) = if value.reads_policy_hidden() && guide.reads_policy_hidden() {
                // Heads on the policy's backbone: one forward over the complete rows per scorer serves its two scores
                // (the backbone is causal, so the states up to the first chunk's last token are the cut row's own),
                // read at the scorer's depth and pooled as it pools.
                let both = |s: &mut Box<dyn PrefixScorer + '_>| -> Result<_> {
                    let (depth, pooling) = (s.feature_depth(), s.feature_pooling());
                    let (at_full, at_cut) = self.policy_states(&prompts, &full, &done, prefix, depth, pooling)?;
                    Ok((s.score_policy_hidden(&at_full)?.into_iter(), s.score_policy_hidden(&at_cut)?.into_iter()))
                };
                let ((v, vp), (g, gp)) = (both(&mut value)?, both(&mut guide)?);
                ((v, g), (vp, gp))
            } else {
                let cut: Vec<Vec<i64>> = full.iter().map(|r| r[..r.len().min(prefix)].to_vec()).collect();
                // A cut row is finished only when the whole response fit in the prefix.
                let cut_done: Vec<bool> = full.iter().zip(&done).map(|(r, &d)| d && r.len() <= prefix).collect();
                let score = |s: &mut Box<dyn PrefixScorer + '_>, r: &[Vec<i64>], d: &[bool]| {
                    s.reset();
                    s.score(&prompts, r, d).map(Vec::into_iter)
                };
                (
                    (score(&mut value, &full, &done)?, score(&mut guide, &full, &done)?),
                    (score(&mut value, &cut, &cut_done)?, score(&mut guide, &cut, &cut_done)?),
                )
            };
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

    /// The policy's final hidden states [B, H] at each row's last token, as the guiding scorer reads a complete
    /// row (a finished row gets EOS appended unless it ends in one), and at the last token of its first `prefix`
    /// response tokens (the whole row when it finished inside them). One forward pass.
    fn policy_states(
        &self,
        prompts: &[Vec<i64>],
        responses: &[Vec<i64>],
        finished: &[bool],
        prefix: usize,
        depth: Option<usize>,
        pooling: ValuePooling,
    ) -> Result<(Tensor, Tensor)> {
        let seqs: Vec<Vec<i64>> = prompts
            .iter()
            .zip(responses)
            .zip(finished)
            .map(|((p, r), &done)| {
                let eos = (done && !r.last().is_some_and(|t| self.eos.contains(t))).then_some(self.eos[0]);
                p.iter().chain(r).copied().chain(eos).collect()
            })
            .collect();
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
        // Left padding: row i's token j sits in column width − len_i + j.
        let cut_columns: Vec<i64> = seqs
            .iter()
            .zip(prompts.iter().zip(responses).zip(finished))
            .map(|(s, ((p, r), &done))| {
                let last = if done && r.len() <= prefix { s.len() } else { p.len() + r.len().min(prefix) };
                (width - s.len() + last - 1) as i64
            })
            .collect();
        let _g = tch::no_grad_guard();
        let device = self.policy.backbone.device();
        let (ids, valid) = left_pad(&seqs, width, 0, device);
        let hidden = self.policy.backbone.forward_to_depth(&ids, &valid, &positions_from_valid(&valid), None, depth);
        // The prompt's last token: the first state a pooled head averages.
        let starts: Vec<i64> = seqs.iter().zip(prompts).map(|(s, p)| (width - s.len() + p.len() - 1) as i64).collect();
        let ends = vec![width as i64 - 1; seqs.len()];
        Ok((pool_columns(&hidden, &starts, &ends, pooling), pool_columns(&hidden, &starts, &cut_columns, pooling)))
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use iro_common::RunConfig;
    use iro_common::config::{DataFormat, RewardKind};
    use tch::Device;

    use super::*;
    use crate::model::ScalarModel;
    use crate::model::heads::{Head, MlpHead};
    use crate::search::PolicyHeadEnsemble;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// The one-forward path reads, for complete and cut rows, the scores the guiding scorer gives those rows on
    /// its own: rows of different prompt lengths, finished with and without a trailing EOS, inside and past the
    /// first chunk, and cut at the token limit.
    #[test]
    fn one_forward_scores_complete_and_cut_rows_as_the_scorer_does() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = RunConfig::default();
        c.run.device = "cpu".into();
        c.run.store = tmp.path().join("store").display().to_string();
        c.policy.model = fixture("llama_gqa_tied");
        c.data.format = DataFormat::Tldr;
        c.data.train = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/tests/fixtures/tldr_sample.jsonl");
        c.data.test_prompts = 4;
        c.reward.kind = RewardKind::Model;
        c.reward.model = fixture("llama_seqcls");
        let p = Pipeline::open(c, None, &tmp.path().join("work")).unwrap();
        let hidden = p.policy.config.hidden_size();
        // Every depth and pooling a head can read: the last layer's states and the first layer's, each as they are,
        // averaged, and both.
        for depth in [None, Some(1)] {
            for pooling in [ValuePooling::Last, ValuePooling::Mean, ValuePooling::LastMean] {
                let model = ScalarModel {
                    config: p.policy.config.clone(),
                    backbone: p.policy.backbone.clone(),
                    head: Head::Mlp(MlpHead::new(hidden * pooling.blocks(), 8, 7, Device::Cpu)),
                    depth,
                    pooling,
                };
                let scorer: Box<dyn PrefixScorer> =
                    Box::new(PolicyHeadEnsemble::new(&p.policy, vec![(&model, 1.0)], p.eos.clone()).unwrap());
                one_forward_matches(&p, scorer);
            }
        }
    }

    fn one_forward_matches(p: &Pipeline, mut scorer: Box<dyn PrefixScorer + '_>) {
        let (depth, pooling) = (scorer.feature_depth(), scorer.feature_pooling());
        let eos = p.eos[0];
        let prompts = vec![vec![5, 6, 7], vec![8, 9, 10, 11, 12, 13], vec![14, 15], vec![16, 17, 18, 19]];
        let responses = vec![
            vec![20, 21, 22, 23, 24, 25, 26, eos], // finished past the prefix, ends in EOS
            vec![27, 28],                          // finished inside the prefix, no EOS yet
            vec![29, 30, 31, 32, 33, 34, 35, 36],  // cut at the token limit, past the prefix
            vec![37, 38, 39],                      // unfinished, shorter than the prefix
        ];
        let done = [true, true, false, false];
        let prefix = 4;
        let (at_full, at_cut) = p.policy_states(&prompts, &responses, &done, prefix, depth, pooling).unwrap();
        let fast_full = scorer.score_policy_hidden(&at_full).unwrap();
        let fast_cut = scorer.score_policy_hidden(&at_cut).unwrap();
        let slow_full = scorer.score(&prompts, &responses, &done).unwrap();
        let cut: Vec<Vec<i64>> = responses.iter().map(|r| r[..r.len().min(prefix)].to_vec()).collect();
        let cut_done: Vec<bool> = responses.iter().zip(&done).map(|(r, &d)| d && r.len() <= prefix).collect();
        let slow_cut = scorer.score(&prompts, &cut, &cut_done).unwrap();
        for (fast, slow) in [(&fast_full, &slow_full), (&fast_cut, &slow_cut)] {
            for (a, b) in fast.iter().zip(slow.iter()) {
                assert!((a - b).abs() < 1e-4, "{depth:?} {pooling:?}: one forward {fast:?}, scorer {slow:?}");
            }
        }
        assert!(fast_full.iter().zip(&fast_cut).any(|(a, b)| (a - b).abs() > 1e-6), "cut rows must read other states");
    }
}
