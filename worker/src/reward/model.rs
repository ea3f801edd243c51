//! A reward model: a scalar head on a causal LM read at the last real token of prompt ⊕ response (iro.md step
//! 2), in either head convention `ScalarModel` loads (HF `*ForSequenceClassification`, the TL;DR `scalar_head`).

use std::path::Path;

use iro_common::config::PromptFormat;
use tch::{Device, Kind};

use super::{Reward, RewardInput};
use crate::error::Result;
use crate::generate::left_pad;
use crate::model::ScalarModel;
use crate::text::{Tokenizer, prompt};

/// Which prompt text a reward model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardPrompt {
    /// `RewardInput::prompt`, as the policy saw it. `add_special`: whether the tokenizer adds its special tokens
    /// (BOS) itself; false when that text already carries them (chat templates).
    Policy { add_special: bool },
    /// `RewardInput::raw_prompt` formatted with the reward model's own chat template (a reward model trained on
    /// another template than the policy's).
    Own(PromptFormat),
}

impl RewardPrompt {
    /// `reward_format` of the config (`None`: the policy's) for a policy formatting with `policy_format`.
    pub fn resolve(reward_format: Option<PromptFormat>, policy_format: PromptFormat) -> Self {
        match reward_format {
            Some(f) if f != policy_format => RewardPrompt::Own(f),
            _ => RewardPrompt::Policy { add_special: !prompt::has_special_tokens(policy_format) },
        }
    }
}

pub struct RewardModel {
    model: ScalarModel,
    tokenizer: Tokenizer,
    prompt: RewardPrompt,
    batch_size: usize,
}

impl RewardModel {
    pub fn load(dir: &Path, kind: Kind, device: Device, prompt: RewardPrompt) -> Result<Self> {
        Ok(Self {
            model: ScalarModel::load(dir, kind, device)?,
            tokenizer: Tokenizer::load(dir)?,
            prompt,
            batch_size: 16,
        })
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Prompt ⊕ response as this reward model reads it.
    fn text(&self, it: &RewardInput<'_>) -> Result<String> {
        let prompt = match self.prompt {
            RewardPrompt::Policy { .. } => it.prompt.to_owned(),
            RewardPrompt::Own(format) => prompt::chat_prompt(format, it.raw_prompt, None)?,
        };
        Ok(prompt + it.response)
    }
}

impl Reward for RewardModel {
    /// The prompt as `RewardPrompt` says, with the response appended.
    fn score(&self, items: &[RewardInput<'_>]) -> Result<Vec<f64>> {
        let texts: Vec<String> = items.iter().map(|it| self.text(it)).collect::<Result<_>>()?;
        let add_special = match self.prompt {
            RewardPrompt::Policy { add_special } => add_special,
            RewardPrompt::Own(format) => !prompt::has_special_tokens(format),
        };
        let ids = self.tokenizer.encode_batch(&texts, add_special)?;
        let pad = self.model.config.pad_token_id.unwrap_or(0);
        let device = self.model.backbone.device();
        let _guard = tch::no_grad_guard();
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(self.batch_size) {
            let width = batch.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let (t, valid) = left_pad(batch, width, pad, device);
            let scores = self.model.score(&t, &valid).to_kind(Kind::Double).to_device(Device::Cpu);
            out.extend(Vec::<f64>::try_from(scores)?);
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "reward_model"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(prompt: RewardPrompt) -> RewardModel {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_seqcls");
        RewardModel::load(&dir, Kind::Float, Device::Cpu, prompt).unwrap()
    }

    fn input<'a>(prompt: &'a str, raw_prompt: &'a str) -> RewardInput<'a> {
        RewardInput { prompt, raw_prompt, response: " The Nile.", reference: None }
    }

    #[test]
    fn a_reward_model_with_its_own_template_scores_the_raw_prompt_formatted_with_it() {
        let raw = "Name a river.";
        let policy_text = prompt::chat_prompt(PromptFormat::Llama3, raw, None).unwrap();
        let own_text = prompt::chat_prompt(PromptFormat::Chatml, raw, None).unwrap();
        let own = load(RewardPrompt::resolve(Some(PromptFormat::Chatml), PromptFormat::Llama3));
        assert_eq!(own.prompt, RewardPrompt::Own(PromptFormat::Chatml));
        let as_policy = load(RewardPrompt::Policy { add_special: false });

        let got = own.score(&[input(&policy_text, raw)]).unwrap()[0];
        // The score of the ChatML-formatted prompt, not of the Llama-3 one the policy saw.
        assert_eq!(got, as_policy.score(&[input(&own_text, raw)]).unwrap()[0]);
        assert_ne!(got, as_policy.score(&[input(&policy_text, raw)]).unwrap()[0]);
    }

    #[test]
    fn an_unset_or_equal_reward_format_reads_the_policys_text() {
        for (reward, policy, add_special) in [
            (None, PromptFormat::Llama3, false),
            (Some(PromptFormat::Chatml), PromptFormat::Chatml, false),
            (None, PromptFormat::Tldr, true),
        ] {
            assert_eq!(RewardPrompt::resolve(reward, policy), RewardPrompt::Policy { add_special });
        }
        assert_eq!(
            RewardPrompt::resolve(Some(PromptFormat::Raw), PromptFormat::Tldr),
            RewardPrompt::Own(PromptFormat::Raw)
        );
    }
}
