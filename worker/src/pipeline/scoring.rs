//! Adapters between the text-level `Reward` (which needs the prompt's reference answer) and the token-level
//! `PrefixScorer` that search methods call (Best-of-N's pick, ARGS's per-token reward, CBS's final pick).

use std::collections::HashMap;

use super::data::PromptItem;
use crate::error::{Error, Result};
use crate::reward::{Reward, RewardInput};
use crate::search::PrefixScorer;
use crate::text::Tokenizer;

/// Scores token rows with a text reward: each row's prompt ids are looked up among the task's prompts (for the
/// prompt text and reference) and its response decoded with the policy's tokenizer.
pub struct TextRewardScorer<'a> {
    reward: &'a dyn Reward,
    tokenizer: &'a Tokenizer,
    by_ids: HashMap<&'a [i64], &'a PromptItem>,
}

impl<'a> TextRewardScorer<'a> {
    pub fn new(reward: &'a dyn Reward, tokenizer: &'a Tokenizer, prompts: &'a [PromptItem]) -> Self {
        Self { reward, tokenizer, by_ids: prompts.iter().map(|p| (p.ids.as_slice(), p)).collect() }
    }
}

impl PrefixScorer for TextRewardScorer<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], _finished: &[bool]) -> Result<Vec<f64>> {
        let texts: Vec<String> = responses.iter().map(|r| self.tokenizer.decode(r, true)).collect::<Result<_>>()?;
        let items = prompts
            .iter()
            .zip(&texts)
            .map(|(p, response)| {
                let item = self.by_ids.get(p.as_slice()).ok_or_else(|| {
                    Error::InvalidRequest(format!("scored a row whose prompt ({} tokens) is not in this task", p.len()))
                })?;
                Ok(RewardInput {
                    prompt: &item.text,
                    raw_prompt: &item.display,
                    response,
                    reference: item.reference.as_deref(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.reward.score(&items)
    }
}

/// Lets a scorer that reads another tokenizer guide the policy (iro.md: value models may use another tokenizer):
/// prompt and partial response are decoded to text with the policy's tokenizer and re-encoded with the scorer's.
/// Re-encoding an extended text usually extends the old ids, so a caching inner scorer keeps its cache; when a
/// token boundary moves, it re-encodes that row (it checks for extension itself).
pub struct Retokenized<'a, S> {
    inner: S,
    policy: &'a Tokenizer,
    target: &'a Tokenizer,
    /// Whether the target tokenizer adds its own special tokens to the prompt.
    add_special: bool,
    prompt_cache: HashMap<Vec<i64>, Vec<i64>>,
}

impl<'a, S: PrefixScorer> Retokenized<'a, S> {
    pub fn new(inner: S, policy: &'a Tokenizer, target: &'a Tokenizer, add_special: bool) -> Self {
        Self { inner, policy, target, add_special, prompt_cache: HashMap::new() }
    }
}

impl<S: PrefixScorer> PrefixScorer for Retokenized<'_, S> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let mut p_out = Vec::with_capacity(prompts.len());
        let mut r_out = Vec::with_capacity(prompts.len());
        for (p, r) in prompts.iter().zip(responses) {
            if !self.prompt_cache.contains_key(p) {
                // Keep special tokens: a chat template's markers are part of what the value model was trained on.
                let text = self.policy.decode(p, false)?;
                self.prompt_cache.insert(p.clone(), self.target.encode(&text, self.add_special)?);
            }
            let prompt_ids = self.prompt_cache[p].clone();
            // The response is encoded on its own, without the policy's EOS (skipped as a special token): the
            // prompt's ids stay a fixed prefix, and the inner scorer appends its own EOS to finished rows.
            let text = self.policy.decode(r, true)?;
            let response_ids = self.target.encode(&text, false)?;
            p_out.push(prompt_ids);
            r_out.push(response_ids);
        }
        self.inner.score(&p_out, &r_out, finished)
    }

    fn reorder(&mut self, index: &[i64]) {
        self.inner.reorder(index);
    }

    fn reset(&mut self) {
        self.inner.reset();
    }
}
