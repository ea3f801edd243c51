//! The sample-efficiency benchmark (`iro bench search`): on a run's test prompts and seeds, the training reward
//! of the answer against the tokens sampled for it, for Best-of-N at several N and for CBS at W·K = N guided
//! by three scorers:
//! - `constant`: every row scores the same, so selection keeps the first distinct rows — CBS's structure with
//!   no guidance (the null);
//! - `value`: the run's trained Σ V_i/β_i (i ≤ t), as IRO decodes;
//! - `oracle`: the training reward itself on the partial text — what a perfect prefix scorer would be allowed
//!   to know at each chunk boundary; it bounds what any value function can do at that W, K, L.
//!
//! Every method's final pick is the reward argmax over its rows, as in the report's IRO rows, and every row of a
//! prompt starts from the same seeds (CBS's first chunk equals Best-of-N's first tokens), so the differences are
//! paired by prompt.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Pipeline;
use super::data::PromptItem;
use super::report::{Estimate, estimate};
use super::scoring::TextRewardScorer;
use crate::error::{Error, Result};
use crate::search::{self, CbsParams, best_of_n, chunk_beam_search};

/// Which guidance a CBS row used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guide {
    Constant,
    Value,
    Oracle,
}

impl Guide {
    pub fn name(self) -> &'static str {
        match self {
            Guide::Constant => "constant",
            Guide::Value => "value",
            Guide::Oracle => "oracle",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EfficiencySpec {
    /// V_1..V_t guide the `value` rows (0: no value rows).
    pub iteration: u32,
    /// The first this many test prompts.
    pub prompts: usize,
    /// Best-of-N's N.
    pub best_of: Vec<usize>,
    /// CBS shapes (W, K).
    pub shapes: Vec<(usize, usize)>,
    pub chunk_lengths: Vec<usize>,
    pub guides: Vec<Guide>,
}

/// One point of the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficiencyRow {
    /// `best_of_n` or `cbs`.
    pub method: String,
    /// The CBS scorer; `None` for Best-of-N.
    pub guide: Option<Guide>,
    pub beams: usize,
    pub successors: usize,
    /// `None` for Best-of-N.
    pub chunk_length: Option<usize>,
    /// Rows per prompt: N, or W·K.
    pub rows: usize,
    pub prompts: usize,
    pub reward: Estimate,
    pub tokens_per_prompt: f64,
    /// Paired difference to Best-of-N with as many rows per prompt, where that N was run.
    pub diff_vs_best_of_n: Option<Estimate>,
}

impl EfficiencyRow {
    pub fn label(&self) -> String {
        match (self.guide, self.chunk_length) {
            (Some(g), Some(l)) => format!("cbs {} W{} K{} L{}", g.name(), self.beams, self.successors, l),
            _ => format!("best-of-{}", self.rows),
        }
    }
}

impl Pipeline {
    /// Runs the benchmark; `progress(done, total)` after each method.
    pub fn sample_efficiency(
        &mut self,
        spec: &EfficiencySpec,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<EfficiencyRow>> {
        if spec.iteration > 0 {
            self.ensure_values(spec.iteration)?;
        } else if spec.guides.contains(&Guide::Value) {
            return Err(Error::InvalidRequest("the `value` guide needs --iteration ≥ 1 (a trained V_t)".into()));
        }
        let picked: Vec<usize> = self.data.test_prompts().iter().copied().take(spec.prompts).collect();
        let items = self.test_items(&picked)?;
        let total = spec.best_of.len() + spec.shapes.len() * spec.chunk_lengths.len() * spec.guides.len();
        let mut done = 0;
        let mut rows = Vec::new();
        let mut bon: HashMap<usize, Vec<f64>> = HashMap::new();
        for &n in &spec.best_of {
            let (rewards, tokens) = self.bench_best_of(&items, n)?;
            rows.push(row("best_of_n", None, (1, n), None, &rewards, tokens, None));
            bon.insert(n, rewards);
            done += 1;
            progress(done, total);
        }
        for &(w, k) in &spec.shapes {
            for &l in &spec.chunk_lengths {
                for &guide in &spec.guides {
                    let (rewards, tokens) = self.bench_cbs(&items, w, k, l, guide, spec.iteration)?;
                    rows.push(row("cbs", Some(guide), (w, k), Some(l), &rewards, tokens, bon.get(&(w * k))));
                    done += 1;
                    progress(done, total);
                }
            }
        }
        Ok(rows)
    }

    /// Per prompt, the reward of Best-of-N's answer; and the tokens sampled in all.
    fn bench_best_of(&self, items: &[PromptItem], n: usize) -> Result<(Vec<f64>, u64)> {
        let (mut rewards, mut tokens) = (Vec::new(), 0u64);
        for batch in items.chunks((self.config.sampling.batch_size / n).max(1)) {
            let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
            let seeds: Vec<u64> = batch.iter().map(|p| p.seed).collect();
            let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
            for b in best_of_n(&self.policy, &prompts, &seeds, n, &self.generate_options(), &mut reward)? {
                tokens += b.candidates.iter().map(|c| c.generation.tokens.len() as u64).sum::<u64>();
                rewards.push(b.candidates[b.best].score);
            }
        }
        Ok((rewards, tokens))
    }

    fn bench_cbs(
        &self,
        items: &[PromptItem],
        w: usize,
        k: usize,
        l: usize,
        guide: Guide,
        t: u32,
    ) -> Result<(Vec<f64>, u64)> {
        let params = CbsParams { beams: w, successors: k, chunk_len: l, ..self.cbs_params() };
        let (mut rewards, mut tokens) = (Vec::new(), 0u64);
        for batch in items.chunks((self.config.sampling.batch_size / (w * k)).max(1)) {
            let prompts: Vec<Vec<i64>> = batch.iter().map(|p| p.ids.clone()).collect();
            let seeds: Vec<u64> = batch.iter().map(|p| p.seed).collect();
            let found = match guide {
                Guide::Constant => {
                    let mut constant = |_: &[Vec<i64>], r: &[Vec<i64>], _: &[bool]| Ok(vec![0.0; r.len()]);
                    chunk_beam_search(&self.policy, &prompts, &seeds, &params, &mut constant)?
                }
                Guide::Value => {
                    let mut scorer = self.value_scorer(t)?;
                    chunk_beam_search(&self.policy, &prompts, &seeds, &params, scorer.as_mut())?
                }
                Guide::Oracle => {
                    let mut oracle = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
                    chunk_beam_search(&self.policy, &prompts, &seeds, &params, &mut oracle)?
                }
            };
            tokens += found.sampled.iter().sum::<u64>();
            let mut reward = TextRewardScorer::new(self.reward.as_ref(), &self.tokenizer, batch);
            // The final pick is the reward argmax (as `pick_final`'s RewardArgmax): keep the winner's reward.
            let all = search::cbs::reward_candidates(&prompts, &found.candidates, &mut reward)?;
            rewards.extend(all.iter().map(|r| r[search::argmax(r)]));
        }
        Ok((rewards, tokens))
    }
}

fn row(
    method: &str,
    guide: Option<Guide>,
    (beams, successors): (usize, usize),
    chunk_length: Option<usize>,
    rewards: &[f64],
    tokens: u64,
    bon: Option<&Vec<f64>>,
) -> EfficiencyRow {
    EfficiencyRow {
        method: method.into(),
        guide,
        beams,
        successors,
        chunk_length,
        rows: beams * successors,
        prompts: rewards.len(),
        reward: estimate(rewards),
        tokens_per_prompt: tokens as f64 / rewards.len().max(1) as f64,
        diff_vs_best_of_n: bon.map(|b| estimate(&rewards.iter().zip(b).map(|(a, b)| a - b).collect::<Vec<_>>())),
    }
}

/// The rows as pretty JSON.
pub fn efficiency_json(rows: &[EfficiencyRow]) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(rows).map_err(|e| Error::InvalidRequest(format!("cannot encode the benchmark rows: {e}")))
}

/// The benchmark as a Markdown table.
pub fn efficiency_markdown(rows: &[EfficiencyRow]) -> String {
    let mut s = String::from(
        "| method | rows/prompt | prompts | reward | tokens/prompt | Δ vs best-of-N, same rows (paired) |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} ± {:.4} | {:.1} | {} |\n",
            r.label(),
            r.rows,
            r.prompts,
            r.reward.mean,
            r.reward.se,
            r.tokens_per_prompt,
            r.diff_vs_best_of_n.map_or("n/a".into(), |d| format!("{:+.4} ± {:.4}", d.mean, d.se)),
        ));
    }
    s
}

/// The benchmark as a PNG: Best-of-N as a line, each CBS guide (all its shapes and chunk lengths) as points.
pub fn efficiency_png(rows: &[EfficiencyRow]) -> Vec<u8> {
    let mut series: Vec<super::report::Series> = Vec::new();
    let mut push =
        |label: String, point: (f64, f64, f64), line: bool| match series.iter_mut().find(|s| s.label == label) {
            Some(s) => s.points.push(point),
            None => series.push(super::report::Series { label, points: vec![point], line }),
        };
    for r in rows {
        let point = (r.tokens_per_prompt, r.reward.mean, r.reward.se);
        match r.guide {
            None => push("best-of-n".into(), point, true),
            Some(g) => push(format!("cbs {}", g.name()), point, false),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    super::report::efficiency_plot("reward vs tokens sampled: best-of-n and cbs", &series)
}
