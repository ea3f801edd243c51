//! A reward model: a scalar head on a causal LM read at the last real token of prompt ⊕ response (iro.md step
//! 2), in either head convention `ScalarModel` loads (HF `*ForSequenceClassification`, the TL;DR `scalar_head`).

use std::path::Path;

use tch::{Device, Kind};

use super::{Reward, RewardInput};
use crate::error::Result;
use crate::generate::left_pad;
use crate::model::ScalarModel;
use crate::text::Tokenizer;

pub struct RewardModel {
    model: ScalarModel,
    tokenizer: Tokenizer,
    /// Whether the tokenizer adds its special tokens (BOS) itself: false when the prompt text already carries
    /// them (chat templates), as the policy's own prompts do.
    add_special: bool,
    batch_size: usize,
}

impl RewardModel {
    pub fn load(dir: &Path, kind: Kind, device: Device, add_special: bool) -> Result<Self> {
        Ok(Self {
            model: ScalarModel::load(dir, kind, device)?,
            tokenizer: Tokenizer::load(dir)?,
            add_special,
            batch_size: 16,
        })
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }
}

impl Reward for RewardModel {
    /// The prompt is read exactly as the policy saw it (already formatted) and the response appended.
    fn score(&self, items: &[RewardInput<'_>]) -> Result<Vec<f64>> {
        let texts: Vec<String> = items.iter().map(|it| format!("{}{}", it.prompt, it.response)).collect();
        let ids = self.tokenizer.encode_batch(&texts, self.add_special)?;
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
