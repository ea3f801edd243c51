//! `iro run CONFIG`: the whole IRO run on this machine — T iterations of rollout → train → eval plus the
//! baselines — with a progress bar per phase, resuming a killed run where it stopped, then the results table.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use iro_common::RunConfig;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_worker::pipeline::{Pipeline, local, report};

use super::progress::Bar;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run config (TOML); paths in it are relative to the current directory.
    pub config: PathBuf,
    /// Overrides `run.device`: auto, cpu, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Local scratch space (value checkpoints of a remote store while training).
    #[arg(long, default_value = ".iro-work")]
    pub work_dir: PathBuf,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = RunConfig::load(&args.config)?;
    pin_config(&config, &args.config)?;
    let mut pipeline = Pipeline::open(config, args.device.as_deref(), &args.work_dir)?;
    let mut bar: Option<(String, Bar)> = None;
    let summary = local::run_local(&mut pipeline, &mut |label, done, total| {
        if bar.as_ref().is_none_or(|(l, _)| l != label) {
            if let Some((_, b)) = &bar {
                b.finish();
            }
            bar = Some((label.to_owned(), Bar::new(label)));
        }
        if let Some((_, b)) = &mut bar {
            b.update(done as usize, total as usize);
        }
    })?;
    if let Some((_, b)) = &bar {
        b.finish();
    }
    let layout = pipeline.layout();
    println!("{}", report::markdown(&summary));
    println!("report: {}", pipeline.store().describe(&layout.report_dir()));
    Ok(())
}

/// The first start of a run stores its config; a resumed run must bring the same one, so one run directory
/// never mixes outputs of two configs.
fn pin_config(config: &RunConfig, path: &std::path::Path) -> anyhow::Result<()> {
    let store = Store::open(&config.run.store)?;
    let key = RunLayout::new(&config.run.id)?.config();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let text = toml::to_string(config).context("serialising the run config")?;
    match rt.block_on(store.get_if_exists(&key))? {
        None => rt.block_on(store.put(&key, text.into_bytes()))?,
        Some(stored) => {
            let stored = RunConfig::parse(std::str::from_utf8(&stored)?, std::path::Path::new(&store.describe(&key)))?;
            if &stored != config {
                bail!(
                    "{} differs from the config run `{}` was started with ({}): resume with the same config, or \
                     give the run a new run.id",
                    path.display(),
                    config.run.id,
                    store.describe(&key)
                );
            }
            tracing::info!(run = %config.run.id, "resuming run");
        }
    }
    Ok(())
}
