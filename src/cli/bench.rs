//! `iro bench generate`: our batched sampling against transformers' `generate`, ratio printed.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use iro_worker::generate::sampler::SamplingParams;
use iro_worker::jobs::bench::{self, BenchConfig};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Tokens/second of batched sampling vs transformers' generate on the same weights and token counts.
    Generate(BenchGenerateArgs),
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[arg(long, default_value = "assets/smollm2-135m-instruct")]
    pub model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Weights and activations on both sides: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// libtorch intra-op threads, the same for both sides.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Best of this many runs per batch size.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Python with torch + transformers for the baseline (made by scripts/assets/check_smollm2.sh).
    #[arg(long, default_value = ".deps/pycheck/bin/python")]
    pub python: PathBuf,
    /// Skip the transformers baseline.
    #[arg(long)]
    pub no_baseline: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Generate(a) = cmd;
    let python = (!a.no_baseline).then_some(a.python.clone());
    if let Some(p) = &python {
        anyhow::ensure!(
            p.exists(),
            "baseline python {} not found: run scripts/assets/check_smollm2.sh to create it, or pass --no-baseline",
            p.display()
        );
    }
    let cfg = BenchConfig {
        model: a.model,
        batch_sizes: a.batch_sizes,
        new_tokens: a.new_tokens,
        kind: iro_worker::device::parse_dtype(&a.dtype, tch::Device::Cpu)?,
        threads: a.threads,
        repeats: a.repeats,
        sampling: SamplingParams { temperature: 0.7, top_k: 50, top_p: 1.0 },
        python,
        baseline_script: PathBuf::from("scripts/bench/hf_generate.py"),
    };
    let rows = bench::run(&cfg)?;
    println!(
        "batched sampling, {} new tokens/row, {:?}, {} threads, top-k 50, T 0.7 (best of {} alternating rounds)",
        cfg.new_tokens, cfg.kind, cfg.threads, cfg.repeats
    );
    println!("{:>6} {:>14} {:>18} {:>8}", "batch", "iro tok/s", "transformers tok/s", "ratio");
    for r in rows {
        match r.baseline_tokens_per_second {
            Some(b) => println!(
                "{:>6} {:>14.1} {:>18.1} {:>7.2}x",
                r.batch,
                r.ours_tokens_per_second,
                b,
                r.ours_tokens_per_second / b
            ),
            None => println!("{:>6} {:>14.1} {:>18} {:>8}", r.batch, r.ours_tokens_per_second, "-", "-"),
        }
    }
    Ok(())
}
