//! A rollout shard (iro.md steps 1-3): sample from pi_{t-1} (plain sampling at t = 1, CBS guided by
//! V_1..V_{t-1} after), score every candidate with the training reward, and mark the ones value training learns
//! from. Every candidate is kept in the shard, selected or not, so the data behind V_t can be inspected.

use std::time::Instant;

use iro_common::layout::ShardedPhase;
use iro_common::records::{RolloutRecord, ShardAttempt, write_shard};

use super::data::{self, PromptItem, phase_seed, prompt_items};
use super::{Pipeline, select};
use crate::error::Result;
use crate::generate::{Generation, generate};
use crate::reward::RewardInput;
use crate::runtime::{TaskControl, TaskOutput};
use crate::search::{CbsParams, chunk_beam_search, sample_replicas};

/// A prompt's candidates, each with its guiding score (None for plain samples).
type Candidates = Vec<(Generation, Option<f64>)>;

/// Keeps the resampling draws independent of the sampling streams of the same prompt.
const SELECT_SALT: u64 = 0x5E1E_C7ED;

impl Pipeline {
    pub(super) fn rollout(&mut self, t: u32, shard: u32, attempt: u32, control: &TaskControl) -> Result<TaskOutput> {
        let start = Instant::now();
        let c = &self.config;
        let indices = self.data.rollout_prompts(c, t)?;
        let picked = data::shard_of(&indices, shard, c.cluster.shard_size)?.to_vec();
        let items = prompt_items(
            &self.data.train,
            &picked,
            c.policy.prompt_format,
            c.policy.max_prompt_tokens,
            &self.tokenizer,
            phase_seed(c.run.seed, Some(t)),
        )?;
        if t > 1 {
            self.ensure_values(t - 1)?;
        }
        let c = &self.config;
        let group = if t == 1 { c.select.first_samples } else { c.search.beams * c.search.successors };
        let per_batch = (self.config.sampling.batch_size / group).max(1);
        let mut records = Vec::new();
        let mut tokens = 0u64;
        control.set_progress(0, items.len() as u64);
        for (b, batch) in items.chunks(per_batch).enumerate() {
            control.check("rollout shard")?;
            let (candidates, sampled) = self.sample_candidates(t, batch)?;
            tokens += sampled;
            records.extend(self.score_and_select(t, batch, candidates)?);
            let done = (b * per_batch + batch.len()) as u64;
            control.set_progress(done, items.len() as u64);
        }
        let at = ShardAttempt { iteration: t, phase: ShardedPhase::Rollout, shard, attempt };
        let entry = self.block_on(write_shard(&self.store, &self.layout, at, &records, tokens))?;
        tracing::info!(
            prompts = items.len(), candidates = records.len(), tokens, seconds = start.elapsed().as_secs_f64(),
            key = %entry.key, "rollout shard written"
        );
        Ok(TaskOutput { key: entry.key, sha256: entry.sha256, records: entry.records, tokens })
    }

    /// Each prompt's candidates with the guiding score (None for plain samples), and the tokens sampled.
    fn sample_candidates(&self, t: u32, batch: &[PromptItem]) -> Result<(Vec<Candidates>, u64)> {
        let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
        let seeds: Vec<u64> = batch.iter().map(|p| p.seed).collect();
        if t == 1 {
            let opts = self.generate_options();
            let n = self.config.select.first_samples;
            let grouped: Vec<Vec<Generation>> = if n == 1 {
                generate(&self.policy, &prompts, &seeds, &opts)?.into_iter().map(|g| vec![g]).collect()
            } else {
                // Seeded as Best-of-N seeds its rows: replica j of a prompt samples from its seed forked with j.
                sample_replicas(&self.policy, &prompts, &seeds, n, &opts)?
            };
            let sampled = grouped.iter().flatten().map(|g| g.tokens.len() as u64).sum();
            let grouped = grouped.into_iter().map(|gs| gs.into_iter().map(|g| (g, None)).collect()).collect();
            return Ok((grouped, sampled));
        }
        let mut scorer = self.value_scorer(t - 1)?;
        let found = chunk_beam_search(&self.policy, &prompts, &seeds, &self.cbs_params(), scorer.as_mut())?;
        let sampled = found.sampled.iter().sum();
        let candidates =
            found.candidates.into_iter().map(|cs| cs.into_iter().map(|c| (c.generation, Some(c.score))).collect());
        Ok((candidates.collect(), sampled))
    }

    pub(super) fn cbs_params(&self) -> CbsParams {
        let s = &self.config.search;
        CbsParams {
            beams: s.beams,
            successors: s.successors,
            chunk_len: s.chunk_length,
            sampling: self.sampling(),
            max_new_tokens: self.config.sampling.max_new_tokens,
            eos_token_ids: self.eos.clone(),
            pad_token_id: self.pad,
        }
    }

    fn score_and_select(
        &self,
        t: u32,
        batch: &[PromptItem],
        candidates: Vec<Candidates>,
    ) -> Result<Vec<RolloutRecord>> {
        let texts: Vec<Vec<String>> = candidates
            .iter()
            .map(|cs| cs.iter().map(|(g, _)| self.tokenizer.decode(&g.tokens, true)).collect::<Result<_>>())
            .collect::<Result<_>>()?;
        let inputs: Vec<RewardInput<'_>> = batch
            .iter()
            .zip(&texts)
            .flat_map(|(p, ts)| {
                ts.iter().map(|r| RewardInput {
                    prompt: &p.text,
                    raw_prompt: &p.display,
                    response: r,
                    reference: p.reference.as_deref(),
                })
            })
            .collect();
        let mut rewards = self.reward.score(&inputs)?.into_iter();
        let mut out = Vec::new();
        for ((item, cs), ts) in batch.iter().zip(candidates).zip(texts) {
            let r: Vec<f64> = rewards.by_ref().take(cs.len()).collect();
            let picks = select::select(&r, &self.config.select, item.seed ^ SELECT_SALT);
            for (j, ((g, score), text)) in cs.into_iter().zip(ts).enumerate() {
                out.push(RolloutRecord {
                    prompt_id: item.id.clone(),
                    prompt: item.text.clone(),
                    iteration: t,
                    method: if t == 1 { "sample".into() } else { "cbs".into() },
                    seed: item.seed,
                    candidate: j as u32,
                    response: text,
                    token_ids: g.tokens.iter().map(|&x| x as u32).collect(),
                    logprobs: g.logprobs,
                    finished: g.stopped_at_eos,
                    reward: Some(r[j]),
                    value_score: score,
                    selected: picks[j],
                });
            }
        }
        Ok(out)
    }
}
