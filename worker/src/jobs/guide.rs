//! `iro guide`: test-time decoding with trained value functions (the paper's `run_guiding` step). Chunk-level
//! beam search on the frozen policy, guided by `Σ_i V_i / beta_i`, answers every prompt of a JSONL file; each
//! prompt's answer is picked from its W·K final rows by a reward model, the guiding score, or row 0.

use std::path::{Path, PathBuf};
use std::time::Instant;

use iro_common::RunConfig;
use iro_common::config::{self, PromptFormat, RewardKind};
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use serde_json::{Value, json};

use super::generate::{pad_token, stop_tokens};
use super::jsonl::{Rows, write_rows_atomic};
use super::{Placement, Progress};
use crate::error::{Error, Result};
use crate::generate::sampler::{SamplingParams, row_seed};
use crate::model::CausalLm;
use crate::pipeline::values::{self, LoadedValue};
use crate::reward::{Reward, RewardInput, RewardModel, RewardPrompt};
use crate::search::cbs::argmax;
use crate::search::{Candidate, CbsParams, FinalPick, chunk_beam_search, pick_final};
use crate::text::{Tokenizer, prompt};

/// One value function of the ensemble: its folder (either kind, as `iro run` publishes it) and its beta.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueSpec {
    pub dir: PathBuf,
    pub beta: f64,
}

#[derive(Debug, Clone)]
pub struct GuideJob {
    pub policy: PathBuf,
    /// V_1..V_t, summed as `Σ_i V_i / beta_i`.
    pub values: Vec<ValueSpec>,
    /// A scalar-head reward model (HF `*ForSequenceClassification` or the TL;DR `ScalarModel`); needed by
    /// `FinalPick::RewardArgmax`, unused otherwise.
    pub reward: Option<PathBuf>,
    pub prompts: PathBuf,
    pub output: PathBuf,
    /// W, K, L.
    pub beams: usize,
    pub successors: usize,
    pub chunk_len: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub final_pick: FinalPick,
    pub seed: u64,
    /// `raw`: each `prompt` as given; a chat format wraps it as one user turn; `tldr` formats a row's
    /// `subreddit`/`title`/`post` (a row with a `prompt` instead is taken as an already formatted TL;DR prompt).
    pub prompt_format: PromptFormat,
    /// `tldr` only: a post is cut at its last newline until the prompt fits this many tokens.
    pub max_prompt_tokens: usize,
    pub placement: Placement,
    /// Prompts per search; each runs W·K rows.
    pub batch_size: usize,
    /// Write every final row of each prompt under `candidates`.
    pub all_candidates: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GuideSummary {
    pub rows: usize,
    /// Tokens sampled, pruned rows included.
    pub sampled_tokens: u64,
    pub seconds: f64,
}

impl GuideJob {
    /// The job a run config describes for `prompts`: its policy, prompt format, sampling and search settings,
    /// seed, placement, and its reward model when `reward.kind = "model"` (the reward `search.final =
    /// "reward_argmax"` picks with). The values are left empty: `published_values` fetches V_1..V_t.
    pub fn from_run(config: &RunConfig, prompts: PathBuf, output: PathBuf) -> Self {
        let (s, search) = (&config.sampling, &config.search);
        let beams_rows = (search.beams * search.successors).max(1);
        Self {
            policy: config.policy.model.clone(),
            values: Vec::new(),
            reward: (config.reward.kind == RewardKind::Model).then(|| config.reward.model.clone()),
            prompts,
            output,
            beams: search.beams,
            successors: search.successors,
            chunk_len: search.chunk_length,
            max_new_tokens: s.max_new_tokens,
            sampling: SamplingParams { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p },
            final_pick: match search.final_pick {
                config::FinalPick::RewardArgmax => FinalPick::RewardArgmax,
                config::FinalPick::ValueArgmax => FinalPick::ValueArgmax,
                config::FinalPick::First => FinalPick::First,
            },
            seed: config.run.seed,
            prompt_format: config.policy.prompt_format,
            max_prompt_tokens: config.policy.max_prompt_tokens,
            placement: Placement { device: config.run.device.clone(), dtype: config.run.dtype.clone() },
            // The run's rows per forward batch, as its evaluation divides them.
            batch_size: (s.batch_size / beams_rows).max(1),
            all_candidates: false,
        }
    }
}

/// Publishes the files of the folder `dir` as V_`t` of the run, the way an accepted train task is: as attempt 1's
/// folder with its `files.json`, then the value manifest naming it. For a V trained elsewhere, and for tests.
pub fn publish_value_folder(config: &RunConfig, t: u32, dir: &Path) -> Result<()> {
    let store = Store::open(&config.run.store)?;
    let layout = RunLayout::new(&config.run.id)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        if path.is_file() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.push((name, std::fs::read(&path).map_err(Error::io(&path))?));
        }
    }
    files.sort();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRequest(format!("cannot start an async runtime for the store: {e}")))?;
    rt.block_on(async {
        let (_, sha) = iro_common::values::write_value_folder(&store, &layout, t, 1, files).await?;
        let manifest = iro_common::values::ValueManifest::new(&layout, &config.run.id, t, 1, &sha);
        iro_common::values::write_value_manifest(&store, &layout, &manifest).await
    })?;
    Ok(())
}

/// V_1..V_`iteration` of a run, as published in its store (the accepted attempt's folder, every file checked
/// against the value manifest), with the run's betas. A remote store's folders are downloaded under `work_dir`
/// on first use.
pub fn published_values(config: &RunConfig, iteration: u32, work_dir: &Path) -> Result<Vec<ValueSpec>> {
    if iteration == 0 {
        return Err(Error::InvalidRequest("iteration must be at least 1: pi_t is guided by V_1..V_t".into()));
    }
    let store = Store::open(&config.run.store)?;
    let layout = RunLayout::new(&config.run.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRequest(format!("cannot start an async runtime for the store: {e}")))?;
    (1..=iteration)
        .map(|t| {
            let dir = rt.block_on(values::published_value_dir(&store, &layout, t, work_dir))?;
            Ok(ValueSpec { dir, beta: config.beta(t as usize) })
        })
        .collect()
}

pub fn run(job: &GuideJob, progress: Progress) -> Result<GuideSummary> {
    check(job)?;
    let start = Instant::now();
    // Everything that can be wrong with the inputs is found before any model is loaded.
    let kinds = job.values.iter().map(|v| values::value_kind(&v.dir)).collect::<Result<Vec<_>>>()?;
    let mut rows = Rows::read(&job.prompts)?;
    let tokenizer = Tokenizer::load(&job.policy)?;
    let texts: Vec<String> =
        (0..rows.rows.len()).map(|i| prompt_text(&rows, i, job, &tokenizer)).collect::<Result<_>>()?;
    // Raw and TL;DR prompts are tokenised as `tokenizer(prompt)` would (its own special tokens added);
    // chat-templated ones already carry theirs.
    let add_special = !prompt::has_special_tokens(job.prompt_format);
    let prompts: Vec<Vec<i64>> = texts.iter().map(|t| tokenizer.encode(t, add_special)).collect::<Result<_>>()?;

    let (device, kind) = job.placement.resolve()?;
    let policy = CausalLm::load(&job.policy, kind, device)?;
    let eos = stop_tokens(&job.policy, &policy.config)?;
    if eos.is_empty() {
        return Err(Error::Checkpoint {
            path: job.policy.clone(),
            message: "no eos_token_id in config.json or generation_config.json: responses could never end".into(),
        });
    }
    let loaded: Vec<LoadedValue> = job
        .values
        .iter()
        .zip(kinds)
        .map(|(v, k)| {
            let loaded = values::load_value(&v.dir, k, &policy, &job.policy, kind, device)?;
            tracing::info!(dir = %v.dir.display(), kind = ?k, beta = v.beta, retokenize = loaded.tokenizer.is_some(), "value function loaded");
            Ok(loaded)
        })
        .collect::<Result<_>>()?;
    let reward = match (job.final_pick, &job.reward) {
        (FinalPick::RewardArgmax, Some(dir)) => {
            Some(RewardModel::load(dir, kind, device, RewardPrompt::Policy { add_special })?)
        }
        _ => None,
    };
    let betas: Vec<f64> = job.values.iter().map(|v| v.beta).collect();
    let mut scorer =
        values::guiding_scorer(&policy, &tokenizer, &loaded, &betas, &eos, job.max_new_tokens, job.prompt_format)?;
    let params = CbsParams {
        beams: job.beams,
        successors: job.successors,
        chunk_len: job.chunk_len,
        sampling: job.sampling,
        max_new_tokens: job.max_new_tokens,
        eos_token_ids: eos.clone(),
        pad_token_id: pad_token(&policy.config, &eos),
    };

    // Batches of similar length waste less compute on padding; a prompt's search depends only on its own seed
    // (its row index), never on the prompts sharing its batch, so the order changes no answer.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let total = order.len();
    let (mut done, mut sampled_tokens) = (0, 0u64);
    progress(0, total);
    for batch in order.chunks(job.batch_size) {
        let batch_prompts: Vec<Vec<i64>> = batch.iter().map(|&i| prompts[i].clone()).collect();
        let seeds: Vec<u64> = batch.iter().map(|&i| row_seed(job.seed, i as u64)).collect();
        let found = chunk_beam_search(&policy, &batch_prompts, &seeds, &params, scorer.as_mut())?;
        sampled_tokens += found.sampled.iter().sum::<u64>();
        let outputs: Vec<Vec<String>> = found
            .candidates
            .iter()
            .map(|cs| cs.iter().map(|c| tokenizer.decode(&c.generation.tokens, true)).collect())
            .collect::<Result<_>>()?;
        let rewards = match &reward {
            Some(r) => Some(candidate_rewards(r, batch.iter().map(|&i| texts[i].as_str()), &outputs)?),
            None => None,
        };
        let chosen = match &rewards {
            Some(rs) => rs.iter().map(|r| argmax(r)).collect(),
            None => pick_final(&batch_prompts, &found.candidates, job.final_pick, None)?,
        };
        for (j, &i) in batch.iter().enumerate() {
            let row_rewards = rewards.as_ref().map(|r| r[j].as_slice());
            write_answer(
                &mut rows.rows[i],
                &found.candidates[j],
                &outputs[j],
                row_rewards,
                chosen[j],
                job.all_candidates,
            );
        }
        done += batch.len();
        progress(done, total);
    }
    write_rows_atomic(&job.output, &rows.rows)?;
    Ok(GuideSummary { rows: total, sampled_tokens, seconds: start.elapsed().as_secs_f64() })
}

/// The settings no search could run with, named by flag.
fn check(job: &GuideJob) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    if job.values.is_empty() {
        return bad("guiding needs at least one value function (--value DIR[:BETA])".into());
    }
    if let Some(v) = job.values.iter().find(|v| !(v.beta > 0.0 && v.beta.is_finite())) {
        return bad(format!("value {}: beta must be positive and finite, got {}", v.dir.display(), v.beta));
    }
    for (flag, n) in [
        ("--beams", job.beams),
        ("--successors", job.successors),
        ("--chunk-length", job.chunk_len),
        ("--max-new-tokens", job.max_new_tokens),
        ("--batch-size", job.batch_size),
    ] {
        if n == 0 {
            return bad(format!("{flag} must be at least 1"));
        }
    }
    if job.final_pick == FinalPick::RewardArgmax && job.reward.is_none() {
        return bad("the final pick reward_argmax needs a reward model (--reward DIR, or a run whose reward.kind is \
             \"model\"); pick with --final value_argmax or first otherwise"
            .into());
    }
    Ok(())
}

/// Row `i`'s prompt, formatted as `job.prompt_format` says.
fn prompt_text(rows: &Rows, i: usize, job: &GuideJob, tokenizer: &Tokenizer) -> Result<String> {
    if job.prompt_format != PromptFormat::Tldr {
        return prompt::chat_prompt(job.prompt_format, rows.str_field(i, "prompt")?, None);
    }
    if !rows.rows[i].contains_key("post") {
        return rows.str_field(i, "prompt").map(str::to_owned);
    }
    let post = prompt::TldrPost {
        subreddit: rows.str_field(i, "subreddit")?,
        title: rows.str_field(i, "title")?,
        post: rows.str_field(i, "post")?,
    };
    prompt::tldr_prompt(&post, tokenizer, job.max_prompt_tokens).map_err(|e| rows.row_error(i, e.to_string()))
}

/// The reward of every candidate, per prompt, in one call of the reward model (which reads the prompt as the
/// policy saw it: `iro guide` takes no reward template of its own).
fn candidate_rewards<'a>(
    reward: &RewardModel,
    prompts: impl Iterator<Item = &'a str>,
    outputs: &[Vec<String>],
) -> Result<Vec<Vec<f64>>> {
    let inputs: Vec<RewardInput<'_>> = prompts
        .zip(outputs)
        .flat_map(|(p, os)| {
            os.iter().map(move |o| RewardInput { prompt: p, raw_prompt: p, response: o, reference: None })
        })
        .collect();
    let mut flat = reward.score(&inputs)?.into_iter();
    Ok(outputs.iter().map(|os| flat.by_ref().take(os.len()).collect()).collect())
}

/// Adds the chosen candidate (and, when asked, all of them) to an output row.
fn write_answer(
    row: &mut super::jsonl::Row,
    candidates: &[Candidate],
    outputs: &[String],
    rewards: Option<&[f64]>,
    chosen: usize,
    all: bool,
) {
    let entry = |j: usize| {
        let mut m = serde_json::Map::new();
        m.insert("output".into(), json!(outputs[j]));
        m.insert("token_ids".into(), json!(candidates[j].generation.tokens));
        m.insert("score".into(), json!(candidates[j].score));
        if let Some(r) = rewards {
            m.insert("reward".into(), json!(r[j]));
        }
        m
    };
    row.extend(entry(chosen));
    if all {
        row.insert("candidates".into(), Value::Array((0..candidates.len()).map(|j| Value::Object(entry(j))).collect()));
    }
}
