//! `iro generate` and `iro score`: file-to-file jobs on one model, with a progress bar.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use iro_common::config::PromptFormat;
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::jobs::{self, Placement};

use super::progress::Bar;

#[derive(Debug, Args)]
pub struct PlacementArgs {
    /// auto (CUDA when libtorch sees it), cpu, cuda, cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16, f16
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Rows per forward batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

impl PlacementArgs {
    fn placement(&self) -> Placement {
        Placement { device: self.device.clone(), dtype: self.dtype.clone() }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChatTemplate {
    Raw,
    Chatml,
    Llama3,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// HF model folder (config.json, model.safetensors or an index, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON Lines with a `prompt` field per row (raw text, used as given).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSON Lines: the input rows plus `output`, `token_ids`, `logprobs`.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Greedy decoding (overrides the sampling flags).
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// raw: each prompt as given; chatml / llama3: wrapped as one user turn of that chat template.
    #[arg(long, value_enum, default_value = "raw")]
    pub chat_template: ChatTemplate,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = if args.greedy {
        SamplingParams::GREEDY
    } else {
        anyhow::ensure!(args.temperature > 0.0, "--temperature must be > 0 (use --greedy for greedy decoding)");
        anyhow::ensure!(args.top_p > 0.0 && args.top_p <= 1.0, "--top-p must be in (0, 1]");
        SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p }
    };
    let job = jobs::generate::GenerateJob {
        model: args.model,
        prompts: args.prompts,
        output: args.output,
        max_new_tokens: args.max_new_tokens,
        sampling,
        seed: args.seed,
        placement: args.placement.placement(),
        batch_size: args.placement.batch_size,
        prompt_format: match args.chat_template {
            ChatTemplate::Raw => PromptFormat::Raw,
            ChatTemplate::Chatml => PromptFormat::Chatml,
            ChatTemplate::Llama3 => PromptFormat::Llama3,
        },
    };
    let mut bar = Bar::new("generate");
    let summary = jobs::generate::run(&job, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    tracing::info!(
        rows = summary.rows,
        new_tokens = summary.new_tokens,
        seconds = format!("{:.1}", summary.seconds),
        tokens_per_second = format!("{:.1}", summary.new_tokens as f64 / summary.seconds.max(1e-9)),
        output = %job.output.display(),
        "generation done"
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// HF scalar-head checkpoint (reward model).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON Lines with `prompt` and `output` fields.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSON Lines: the input rows plus `score`.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

pub fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let job = jobs::score::ScoreJob {
        model: args.model,
        input: args.input,
        output: args.output,
        placement: args.placement.placement(),
        batch_size: args.placement.batch_size,
    };
    let mut bar = Bar::new("score");
    let rows = jobs::score::run(&job, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    tracing::info!(rows, output = %job.output.display(), "scoring done");
    Ok(())
}
