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

/// What a model on another tokenizer than the policy's reads of a policy row (iro.md: value models may use
/// another tokenizer): the text decoded with the policy's tokenizer, re-encoded with the target's. The one
/// definition for the guiding scorer (`Retokenized`) and for value training, so a value model trains on exactly
/// the ids it is fed while guiding.
#[derive(Clone, Copy)]
pub struct Retokenizer<'a> {
    pub policy: &'a Tokenizer,
    pub target: &'a Tokenizer,
    /// Whether the target tokenizer adds its own special tokens to the prompt.
    pub add_special: bool,
}

impl Retokenizer<'_> {
    /// The prompt's ids. Special tokens are kept: a chat template's markers are part of what the model reads.
    pub fn prompt(&self, ids: &[i64]) -> Result<Vec<i64>> {
        self.target.encode(&self.policy.decode(ids, false)?, self.add_special)
    }

    /// A (partial) response's ids, encoded on its own so the prompt's ids stay a fixed prefix, and without the
    /// policy's EOS (skipped as a special token): the value scorer appends the model's own EOS to finished rows.
    pub fn response(&self, ids: &[i64]) -> Result<Vec<i64>> {
        self.target.encode(&self.policy.decode(ids, true)?, false)
    }
}

/// Lets a scorer that reads another tokenizer guide the policy: every row goes through `Retokenizer`.
/// Re-encoding an extended text usually extends the old ids, so a caching inner scorer keeps its cache; when a
/// token boundary moves, it re-encodes that row (it checks for extension itself).
pub struct Retokenized<'a, S> {
    inner: S,
    retokenizer: Retokenizer<'a>,
    prompt_cache: HashMap<Vec<i64>, Vec<i64>>,
}

impl<'a, S: PrefixScorer> Retokenized<'a, S> {
    pub fn new(inner: S, policy: &'a Tokenizer, target: &'a Tokenizer, add_special: bool) -> Self {
        Self { inner, retokenizer: Retokenizer { policy, target, add_special }, prompt_cache: HashMap::new() }
    }
}

impl<S: PrefixScorer> PrefixScorer for Retokenized<'_, S> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], finished: &[bool]) -> Result<Vec<f64>> {
        let mut p_out = Vec::with_capacity(prompts.len());
        let mut r_out = Vec::with_capacity(prompts.len());
        for (p, r) in prompts.iter().zip(responses) {
            if !self.prompt_cache.contains_key(p) {
                self.prompt_cache.insert(p.clone(), self.retokenizer.prompt(p)?);
            }
            p_out.push(self.prompt_cache[p].clone());
            r_out.push(self.retokenizer.response(r)?);
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
