//! `iro generate`: sample continuations for a JSONL file of raw prompts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};

use super::jsonl::{Rows, write_rows_atomic};
use super::{Placement, Progress};
use crate::error::{Error, Result};
use crate::generate::sampler::{SamplingParams, row_seed};
use crate::generate::{GenerateOptions, generate};
use crate::model::{CausalLm, ModelConfig};
use crate::text::{Tokenizer, prompt};
use iro_common::config::PromptFormat;

#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub model: PathBuf,
    pub prompts: PathBuf,
    pub output: PathBuf,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub placement: Placement,
    pub batch_size: usize,
    /// `raw` uses each prompt as given; a chat format wraps it as a single user turn first.
    pub prompt_format: PromptFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateSummary {
    pub rows: usize,
    pub new_tokens: usize,
    pub seconds: f64,
}

/// Token ids that end a response: `generation_config.json`'s `eos_token_id` (Llama-3-Instruct lists
/// `<|eot_id|>` there) together with config.json's.
pub fn stop_tokens(dir: &Path, config: &ModelConfig) -> Result<Vec<i64>> {
    let mut ids = config.eos_token_ids.clone();
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint { path: path.clone(), message: format!("malformed JSON: {e}") })?;
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => ids.extend(n.as_i64()),
            Some(Value::Array(a)) => ids.extend(a.iter().filter_map(Value::as_i64)),
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Pad id for batching: the config's, else the first EOS (padding is masked, its value never matters).
pub fn pad_token(config: &ModelConfig, eos: &[i64]) -> i64 {
    config.pad_token_id.or(eos.first().copied()).unwrap_or(0)
}

pub fn run(job: &GenerateJob, progress: Progress) -> Result<GenerateSummary> {
    if job.batch_size == 0 || job.max_new_tokens == 0 {
        return Err(Error::InvalidRequest("batch size and max new tokens must be at least 1".into()));
    }
    let start = Instant::now();
    let (device, kind) = job.placement.resolve()?;
    let lm = CausalLm::load(&job.model, kind, device)?;
    let tokenizer = Tokenizer::load(&job.model)?;
    let eos = stop_tokens(&job.model, &lm.config)?;
    let opts = GenerateOptions {
        max_new_tokens: job.max_new_tokens,
        sampling: job.sampling,
        eos_token_ids: eos.clone(),
        pad_token_id: pad_token(&lm.config, &eos),
    };
    let mut rows = Rows::read(&job.prompts)?;
    // Raw prompts are used as given, tokenised as `tokenizer(prompt)` would (its own special tokens added);
    // chat-templated ones already carry theirs.
    let add_special = !prompt::has_special_tokens(job.prompt_format);
    let prompts: Vec<Vec<i64>> = (0..rows.rows.len())
        .map(|i| {
            let text = prompt::chat_prompt(job.prompt_format, rows.str_field(i, "prompt")?, None)?;
            tokenizer.encode(&text, add_special)
        })
        .collect::<Result<_>>()?;
    // Batches of similar length waste less compute on padding; each row's seed depends only on its index,
    // so the order changes nothing in the samples.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let total = order.len();
    let mut done = 0;
    let mut new_tokens = 0;
    progress(0, total);
    for batch in order.chunks(job.batch_size) {
        let batch_prompts: Vec<Vec<i64>> = batch.iter().map(|&i| prompts[i].clone()).collect();
        let seeds: Vec<u64> = batch.iter().map(|&i| row_seed(job.seed, i as u64)).collect();
        let outs = generate(&lm, &batch_prompts, &seeds, &opts)?;
        for (&i, g) in batch.iter().zip(outs) {
            let text = tokenizer.decode(&g.tokens, true)?;
            new_tokens += g.tokens.len();
            let row = &mut rows.rows[i];
            row.insert("output".into(), json!(text));
            row.insert("token_ids".into(), json!(g.tokens));
            row.insert("logprobs".into(), json!(g.logprobs));
        }
        done += batch.len();
        progress(done, total);
    }
    write_rows_atomic(&job.output, &rows.rows)?;
    Ok(GenerateSummary { rows: total, new_tokens, seconds: start.elapsed().as_secs_f64() })
}
