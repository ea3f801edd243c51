//! `iro dpo`: DPO of a causal LM on preference pairs (the paper's DPO baseline as its own command), resumable,
//! with a progress bar.

use std::path::PathBuf;

use clap::Args;
use iro_common::config::PromptFormat;
use iro_worker::jobs::dpo::{self, DpoJob};
use iro_worker::train::dpo::DpoConfig;

use super::generate::ChatTemplate;
use super::progress::Bar;

#[derive(Debug, Args)]
#[command(
    after_help = "Rows are {\"prompt\", \"chosen\", \"rejected\"} with string completions, or UltraFeedback-binarized's \
    layout (chosen / rejected as message lists; the last assistant message is the completion). The trained policy is \
    the newest OUT/checkpoint-* folder, an HF causal-LM folder (config.json, model.safetensors, tokenizer files). \
    Running the same command again resumes from the newest checkpoint."
)]
pub struct DpoArgs {
    /// HF causal LM folder: the policy's start and the frozen reference.
    #[arg(long)]
    pub policy: PathBuf,
    /// JSON Lines of preference pairs (see below).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Checkpoint folder; the trained policy is its newest checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// raw: prompts as given; chatml / llama3: wrapped as one user turn of that chat template.
    #[arg(long, value_enum, default_value = "raw")]
    pub chat_template: ChatTemplate,
    /// The DPO temperature (TRL's default; the paper's TL;DR runs use 0.05).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 5e-7)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Pairs per forward pass (accumulated up to --batch-size).
    #[arg(long, default_value_t = 2)]
    pub micro_batch_size: usize,
    /// A resumable checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto (CUDA when libtorch sees it), cpu, cuda, cuda:N; training runs in f32.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn dpo(a: DpoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.beta > 0.0 && a.beta.is_finite(), "--beta must be a positive number");
    let device = iro_worker::device::parse_device(&a.device)?;
    let job = DpoJob {
        policy: a.policy,
        pairs: a.pairs,
        out: a.out,
        prompt_format: match a.chat_template {
            ChatTemplate::Raw => PromptFormat::Raw,
            ChatTemplate::Chatml => PromptFormat::Chatml,
            ChatTemplate::Llama3 => PromptFormat::Llama3,
        },
        config: DpoConfig {
            beta: a.beta,
            lr: a.lr,
            adam_eps: a.adam_eps,
            weight_decay: a.weight_decay,
            epochs: a.epochs,
            batch_size: a.batch_size,
            micro_batch_size: a.micro_batch_size,
            checkpoint_every: a.checkpoint_every,
            seed: a.seed,
            pad_id: 0,
            device,
        },
    };
    let mut bar = Bar::new("dpo");
    let report = dpo::run(&job, &mut |step, total, _| bar.update(step, total))?;
    bar.finish();
    tracing::info!(
        steps = report.steps,
        first_loss = report.losses.first().copied().unwrap_or(f64::NAN),
        final_loss = report.final_loss,
        policy = %report.checkpoint.display(),
        "DPO done"
    );
    Ok(())
}
