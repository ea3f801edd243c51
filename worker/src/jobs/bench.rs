//! `iro bench generate`: tokens/second of batched sampling against transformers' `generate` on the same
//! weights, prompts, batch sizes and token counts, in one run, with the ratio printed. Both sides run
//! libtorch on the same threads; the difference is per-token overhead and cache handling. The sides take
//! turns, one round each per repeat, and each keeps its best round: a slow spell of a shared machine then
//! hits both alike instead of whichever side happened to run during it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::generate::sampler::{SamplingParams, row_seed};
use crate::generate::{GenerateOptions, generate};
use crate::model::CausalLm;
use crate::text::{Tokenizer, prompt};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: PathBuf,
    pub batch_sizes: Vec<usize>,
    pub new_tokens: usize,
    /// The dtype of both sides (the baseline loads the folder in the same one).
    pub kind: tch::Kind,
    pub threads: usize,
    pub repeats: usize,
    pub sampling: SamplingParams,
    /// Python with torch + transformers for the baseline; `None` runs only our side.
    pub python: Option<PathBuf>,
    pub baseline_script: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub batch: usize,
    pub ours_tokens_per_second: f64,
    pub baseline_tokens_per_second: Option<f64>,
}

/// Fixed instruction prompts of varied length, chat-templated, so both sides see identical token ids.
const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give three tips for staying healthy.",
    "Explain why the sky is blue to a ten year old child in a few sentences.",
    "List five uses of a paperclip.",
    "How do I make a cup of tea?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
];

pub fn run(cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let max_batch = *cfg.batch_sizes.iter().max().ok_or_else(|| Error::InvalidRequest("no batch sizes".into()))?;
    tch::set_num_threads(cfg.threads as i32);
    let tokenizer = Tokenizer::load(&cfg.model)?;
    let prompts: Vec<Vec<i64>> = (0..max_batch)
        .map(|i| {
            let text = prompt::chat_prompt(iro_common::config::PromptFormat::Chatml, PROMPTS[i % PROMPTS.len()], None)?;
            tokenizer.encode(&text, false)
        })
        .collect::<Result<_>>()?;
    let lm = CausalLm::load(&cfg.model, cfg.kind, tch::Device::Cpu)?;
    // No EOS: every row generates exactly `new_tokens`, as the baseline's min_new_tokens forces.
    let opts = GenerateOptions {
        max_new_tokens: cfg.new_tokens,
        sampling: cfg.sampling,
        eos_token_ids: vec![],
        pad_token_id: lm.config.pad_token_id.unwrap_or(0),
    };
    let seeds: Vec<Vec<u64>> =
        cfg.batch_sizes.iter().map(|&b| (0..b as u64).map(|i| row_seed(0, i)).collect()).collect();
    let mut ours = vec![0.0f64; cfg.batch_sizes.len()];
    let mut baseline = cfg.python.as_ref().map(|_| vec![0.0f64; cfg.batch_sizes.len()]);
    for round in 0..cfg.repeats.max(1) {
        for (i, &b) in cfg.batch_sizes.iter().enumerate() {
            let start = Instant::now();
            let out = generate(&lm, &prompts[..b], &seeds[i], &opts)?;
            let tps = (b * cfg.new_tokens) as f64 / start.elapsed().as_secs_f64();
            debug_assert!(out.iter().all(|g| g.tokens.len() == cfg.new_tokens));
            tracing::info!(round, batch = b, tokens_per_second = format!("{tps:.1}"), "iro");
            ours[i] = ours[i].max(tps);
        }
        if let (Some(py), Some(best)) = (&cfg.python, baseline.as_mut()) {
            let tps = run_baseline(py, &cfg.baseline_script, cfg, &prompts)?;
            tracing::info!(round, tokens_per_second = ?tps, "transformers");
            for (b, t) in best.iter_mut().zip(tps) {
                *b = b.max(t);
            }
        }
    }
    Ok(cfg
        .batch_sizes
        .iter()
        .enumerate()
        .map(|(i, &batch)| BenchRow {
            batch,
            ours_tokens_per_second: ours[i],
            baseline_tokens_per_second: baseline.as_ref().map(|b| b[i]),
        })
        .collect())
}

/// The baseline's name for `kind`.
fn torch_dtype(kind: tch::Kind) -> Result<&'static str> {
    match kind {
        tch::Kind::Float => Ok("float32"),
        tch::Kind::BFloat16 => Ok("bfloat16"),
        tch::Kind::Half => Ok("float16"),
        other => Err(Error::InvalidRequest(format!("no transformers dtype for {other:?}"))),
    }
}

/// One round of the baseline: a fresh process (the model load is not timed), each batch size once.
fn run_baseline(python: &Path, script: &Path, cfg: &BenchConfig, prompts: &[Vec<i64>]) -> Result<Vec<f64>> {
    let request = json!({
        "model": cfg.model, "prompts": prompts, "batch_sizes": cfg.batch_sizes, "new_tokens": cfg.new_tokens,
        "threads": cfg.threads, "temperature": cfg.sampling.temperature, "top_k": cfg.sampling.top_k,
        "top_p": cfg.sampling.top_p, "repeats": 1, "dtype": torch_dtype(cfg.kind)?,
    });
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(Error::io(python))?;
    child.stdin.take().expect("piped stdin").write_all(request.to_string().as_bytes()).map_err(Error::io(python))?;
    let out = child.wait_with_output().map_err(Error::io(python))?;
    if !out.status.success() {
        return Err(Error::InvalidRequest(format!("baseline {} exited with {}", script.display(), out.status)));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::InvalidRequest(format!("baseline printed no JSON result: {e}")))?;
    tracing::info!(versions = %v["versions"], "transformers baseline");
    v["results"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["tokens_per_second"].as_f64()).collect::<Vec<_>>())
        .filter(|r| r.len() == cfg.batch_sizes.len())
        .ok_or_else(|| Error::InvalidRequest("baseline result lacks tokens_per_second per batch size".into()))
}
