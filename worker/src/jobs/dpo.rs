//! `iro dpo`: DPO of a causal LM on a JSON Lines file of preference pairs (`train::dpo`), resumable, with progress.
//!
//! A row is `{"prompt": "...", "chosen": "...", "rejected": "..."}`, or UltraFeedback-binarized's layout, where
//! `chosen` and `rejected` are message lists (`[{"role": "user", ...}, {"role": "assistant", "content": ...}]`): the
//! completion is then the last assistant message. The prompt is formatted with the chat template given; each
//! completion is its text's tokens followed by the policy's first stop token, as a sampled answer ends.

use std::ops::ControlFlow;
use std::path::PathBuf;

use serde_json::Value;

use super::generate::{pad_token, stop_tokens};
use super::jsonl::Rows;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::text::{Tokenizer, prompt};
use crate::train::TrainReport;
use crate::train::dpo::{DpoConfig, PreferencePair, train_dpo};
use iro_common::config::PromptFormat;

#[derive(Debug, Clone)]
pub struct DpoJob {
    pub policy: PathBuf,
    pub pairs: PathBuf,
    /// Checkpoints and the trained policy (its newest `checkpoint-*` folder) go here; a rerun resumes.
    pub out: PathBuf,
    pub prompt_format: PromptFormat,
    /// `pad_id` is taken from the policy; the rest as given.
    pub config: DpoConfig,
}

/// The completion text of `field` in row `i`: a string, or the last assistant message of a message list.
fn completion(rows: &Rows, i: usize, field: &str) -> Result<String> {
    match rows.rows[i].get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(messages)) => messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .and_then(|m| m.get("content").and_then(Value::as_str))
            .map(str::to_owned)
            .ok_or_else(|| rows.row_error(i, format!("`{field}` has no assistant message with a string `content`"))),
        Some(_) => Err(rows.row_error(i, format!("`{field}` must be a string or a list of messages"))),
        None => Err(rows.row_error(i, format!("missing `{field}`"))),
    }
}

/// Tokenises the pairs of `job.pairs` with the policy's tokenizer.
pub fn read_pairs(job: &DpoJob, tokenizer: &Tokenizer, eos: i64) -> Result<Vec<PreferencePair>> {
    let rows = Rows::read(&job.pairs)?;
    let add_special = !prompt::has_special_tokens(job.prompt_format);
    (0..rows.rows.len())
        .map(|i| {
            let text = prompt::chat_prompt(job.prompt_format, rows.str_field(i, "prompt")?, None)?;
            let answer = |field: &str| -> Result<Vec<i64>> {
                let mut ids = tokenizer.encode(&completion(&rows, i, field)?, false)?;
                ids.push(eos);
                Ok(ids)
            };
            Ok(PreferencePair {
                prompt: tokenizer.encode(&text, add_special)?,
                chosen: answer("chosen")?,
                rejected: answer("rejected")?,
            })
        })
        .collect()
}

/// Trains; `progress(step, total, loss)` after every optimizer step.
pub fn run(job: &DpoJob, progress: &mut dyn FnMut(usize, usize, f64)) -> Result<TrainReport> {
    let model = ModelConfig::load(&job.policy)?;
    let eos = stop_tokens(&job.policy, &model)?;
    let first = *eos.first().ok_or_else(|| Error::Checkpoint {
        path: job.policy.clone(),
        message: "the policy names no EOS token (config.json / generation_config.json `eos_token_id`)".into(),
    })?;
    let tokenizer = Tokenizer::load(&job.policy)?;
    let pairs = read_pairs(job, &tokenizer, first)?;
    let config = DpoConfig { pad_id: pad_token(&model, &eos), ..job.config.clone() };
    train_dpo(&config, &pairs, &job.policy, &job.out, true, |step, total, loss| {
        progress(step, total, loss);
        ControlFlow::Continue(())
    })
}
