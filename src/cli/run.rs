//! `iro run CONFIG`: the whole IRO run on this machine — T iterations of rollout → train → eval plus the
//! baselines — with a progress bar per phase, resuming a killed run where it stopped, then the results table.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use iro_common::RunConfig;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_worker::pipeline::{Pipeline, local, report};
use iro_worker::runtime::{self, CancellationToken, SharedRunnerFactory};
use std::sync::Arc;

use super::progress::{Bar, StageBars};

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
    /// 0: run the tasks in this process, one after another, with a progress bar per phase. N ≥ 1: start a
    /// coordinator and N workers in this process, talking gRPC over loopback as a cluster does (its status
    /// page URL is logged); the coordinator's log in the work dir resumes the run. Resume a run in the mode
    /// it was started in.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = RunConfig::load(&args.config)?;
    pin_config(&config, &args.config)?;
    if args.workers > 0 {
        return run_embedded(config, args);
    }
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

/// The cluster's code path in one process: coordinator + N workers over loopback gRPC.
fn run_embedded(config: RunConfig, args: RunArgs) -> anyhow::Result<()> {
    let device = args.device.clone().unwrap_or_else(|| config.run.device.clone());
    let state_dir = args.work_dir.join("coordinator").join(&config.run.id);
    let work_dir = args.work_dir.clone();
    let factory: SharedRunnerFactory = Arc::new(move |c: &RunConfig| {
        super::worker::make_runner(c, &device, &work_dir).map_err(|e| iro_worker::Error::Runner(format!("{e:#}")))
    });
    let rt = tokio::runtime::Runtime::new()?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("interrupted: giving leases back; run again to resume");
            stop.cancel();
        }
    });
    let (store, layout) = (Store::open(&config.run.store)?, RunLayout::new(&config.run.id)?);
    let (id, iterations) = (config.run.id.clone(), config.run.iterations);
    let summary = rt.block_on(async {
        let mut bars = StageBars::default();
        let progress: runtime::ProgressFn = Box::new(move |status| bars.show(status));
        runtime::run_embedded_with_progress(config, args.workers, &state_dir, factory, shutdown, Some(progress))
            .await?;
        report::write_report(&store, &layout, &id, iterations).await
    })?;
    println!("{}", report::markdown(&summary));
    println!("report: {}", store.describe(&layout.report_dir()));
    Ok(())
}
