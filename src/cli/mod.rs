//! The subcommands. Each one parses its arguments and calls into a crate.

mod bench;
mod cluster;
mod dpo;
mod generate;
mod guide;
mod info;
mod limits;
mod progress;
mod replica;
mod run;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "iro", version, about = "Align frozen language models with Iterative Reweight-then-Optimize")]
pub struct Cli {
    /// Log format: human-readable, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "human", env = "IRO_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what libtorch sees on this machine (threads, CUDA devices) and the build's versions.
    Info,
    /// Run IRO end to end on this machine (rollout, reward, select, value training, evaluation, baselines).
    Run(run::RunArgs),
    /// Sample continuations of raw prompts (JSON Lines with a `prompt` field) with a frozen model.
    Generate(generate::GenerateArgs),
    /// Decode prompts with the frozen policy guided by trained value functions (chunk-level beam search), from
    /// explicit folders or a run's published V_1..V_t.
    Guide(guide::GuideArgs),
    /// DPO of a causal LM on preference pairs (the DPO baseline as its own command); resumable.
    Dpo(dpo::DpoArgs),
    /// Score `prompt` + `output` rows with a reward model's scalar head.
    Score(generate::ScoreArgs),
    /// Benchmarks against the Python reference implementations.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the coordinator: leases the run's tasks to workers over gRPC, serves /status and /metrics.
    Coordinator(cluster::CoordinatorArgs),
    /// Print a coordinator's status as a table.
    Status(cluster::StatusArgs),
    /// Run a worker: lease tasks from a coordinator until the run is over (SIGTERM gives the lease back).
    Worker(worker::WorkerArgs),
    /// Validate a run config, print it with every default filled in, and print its memory plan (per phase,
    /// the bytes a worker's device needs); refuses a config that cannot fit `cluster.device_memory_gib`.
    CheckConfig {
        /// The run config (TOML).
        config: PathBuf,
        /// Judge the plan against devices of this many GiB instead of `cluster.device_memory_gib`.
        #[arg(long)]
        device_memory_gib: Option<f64>,
        /// Folder of `<model folder name>.json` HF configs, for models whose folder is not on this machine
        /// (default: the nearest `configs/model-shapes` above the config file, or under the current folder).
        #[arg(long)]
        model_shapes: Option<PathBuf>,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info => info::run(),
        Command::Run(args) => run::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Status(args) => cluster::status(args),
        Command::Worker(args) => worker::worker(args),
        Command::Generate(args) => generate::generate(args),
        Command::Guide(args) => guide::guide(args),
        Command::Dpo(args) => dpo::dpo(args),
        Command::Score(args) => generate::score(args),
        Command::CheckConfig { config, device_memory_gib, model_shapes } => {
            info::check_config(&config, device_memory_gib, model_shapes.as_deref())
        }
    }
}
