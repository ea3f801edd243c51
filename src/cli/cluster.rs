//! `iro coordinator` and `iro status`: the control plane as a separate process, and its operator view.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use iro_common::RunConfig;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_coordinator::driver::{ClusterToken, CoordinatorConfig, TOKEN_ENV, serve};
use iro_coordinator::state::RunStatus;
use iro_coordinator::status::client::{fetch_status, render_table};
use iro_worker::pipeline::report;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// The run config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// gRPC address workers connect to.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// HTTP address of /status, /metrics and the progress page.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub status_listen: SocketAddr,
    /// Object store URL (a folder or s3://bucket/prefix); overrides the config's run.store.
    #[arg(long)]
    pub store: Option<String>,
    /// Where the command log lives; restarting on the same folder resumes the run.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Start from an empty --state-dir even though the store already holds this run's manifests, writing over
    /// the outputs they name. Without it such a start is refused: the run was started before, and the state
    /// folder it ran with is what resumes it.
    #[arg(long)]
    pub force_fresh_state: bool,
    /// File holding the cluster token (else the IRO_CLUSTER_TOKEN variable; without either, loopback only).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// After the run is over (and the report written), keep serving until SIGTERM/ctrl-c: workers still
    /// learn that the run finished, operators still see the final status, and a Kubernetes StatefulSet does
    /// not restart the process in a loop.
    #[arg(long)]
    pub linger: bool,
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut run = RunConfig::load(&args.config)?;
    if let Some(store) = args.store {
        run.run.store = store;
    }
    let (store_url, run_id, iterations) = (run.run.store.clone(), run.run.id.clone(), run.run.iterations);
    let linger = args.linger;
    let exit_grace = std::time::Duration::from_secs(2 * run.cluster.heartbeat_interval_s.max(1));
    let mut config = CoordinatorConfig::new(run)?;
    config.listen = args.listen;
    config.status_listen = args.status_listen;
    config.state_dir = Some(args.state_dir);
    config.force_fresh_state = args.force_fresh_state;
    config.token = ClusterToken::load(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let server = serve(config).await?;
        tracing::info!(grpc = %server.grpc_url(), status = %server.status_url(), "coordinator serving");
        let finished = tokio::select! {
            status = server.run_over() => {
                if status == RunStatus::Running {
                    tracing::error!("the coordinator driver ended before the run was over");
                } else {
                    tracing::info!(?status, "run over");
                }
                status == RunStatus::Finished
            }
            () = stop_signal() => {
                tracing::info!("stopped by a signal; shutting down (restart on the same state dir resumes)");
                false
            }
        };
        if finished {
            // The results table of a finished run, from the accepted eval shards (the manifests are written).
            let store = Store::open(&store_url)?;
            let layout = RunLayout::new(&run_id)?;
            let summary = report::write_report(&store, &layout, &run_id, iterations).await?;
            println!("{}", report::markdown(&summary));
            tracing::info!(report = %store.describe(&layout.report_dir()), "report written");
            if linger {
                tracing::info!("run over; serving its final status until SIGTERM/ctrl-c (--linger)");
                stop_signal().await;
            } else {
                // Idle workers poll about once a heartbeat: keep answering for two, so each hears "run finished"
                // and exits cleanly instead of retrying a vanished coordinator.
                tokio::select! {
                    () = tokio::time::sleep(exit_grace) => {}
                    () = stop_signal() => {}
                }
            }
        }
        // A failed command log write ends the driver (and `run_over` with it): exit non-zero, so that
        // Kubernetes restarts the pod and the restart replays the log.
        server.close().await?;
        anyhow::Ok(())
    })
}

/// SIGTERM (Kubernetes stopping the pod) or ctrl-c.
async fn stop_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The coordinator's status URL, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub coordinator: String,
    /// Cluster token file, when the status endpoint requires it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let token = ClusterToken::load(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt.block_on(fetch_status(&args.coordinator, token.as_ref()))?;
    print!("{}", render_table(&report));
    Ok(())
}
