//! `iro coordinator` and `iro status`: the control plane as a separate process, and its operator view.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use iro_common::RunConfig;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_coordinator::driver::routing::split_list;
use iro_coordinator::driver::{ClientTls, ClusterToken, CoordinatorConfig, ServerTls, TOKEN_ENV, serve};
use iro_coordinator::state::RunStatus;
use iro_coordinator::status::client::{fetch_status_from, render_table};
use iro_worker::pipeline::report;

use super::limits::LimitArgs;

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
    /// Two lines: both tokens are accepted (rotation; workers send the first line of theirs).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve gRPC and the status endpoint over TLS with this PEM certificate (chain); needs --tls-key.
    /// Without it both listen in plaintext.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// mTLS: gRPC callers must present a client certificate issued by this PEM CA (the status endpoint asks
    /// for none; close it with --status-requires-token).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the read-only status token (two lines while rotating): with --status-requires-token it
    /// opens /status, /metrics and the progress page, and nothing on gRPC.
    #[arg(long, requires = "status_requires_token")]
    pub status_token_file: Option<PathBuf>,
    /// Answer 401 on /status, /metrics and the progress page without the status token or the cluster token
    /// (`Authorization: Bearer ...`); /livez and /readyz stay open for the kubelet.
    #[arg(long)]
    pub status_requires_token: bool,
    /// After the run is over (and the report written), keep serving until SIGTERM/ctrl-c: workers still
    /// learn that the run finished, operators still see the final status, and a Kubernetes StatefulSet does
    /// not restart the process in a loop.
    #[arg(long)]
    pub linger: bool,
    #[command(flatten)]
    pub raft: super::replica::RaftArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut run = RunConfig::load(&args.config)?;
    if let Some(store) = args.store {
        run.run.store = store;
    }
    let (store_url, run_id, iterations) = (run.run.store.clone(), run.run.id.clone(), run.run.iterations);
    let replicated = args.raft.raft_id.is_some();
    // A replica keeps serving after the run: its peers may need it for a quorum, and a worker that asks
    // late must still hear that the run finished.
    let linger = args.linger || replicated;
    let exit_grace = std::time::Duration::from_secs(2 * run.cluster.heartbeat_interval_s.max(1));
    let mut config = CoordinatorConfig::new(run)?;
    config.listen = args.listen;
    config.status_listen = args.status_listen;
    config.state_dir = Some(args.state_dir);
    config.force_fresh_state = args.force_fresh_state;
    config.token = ClusterToken::load(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    config.status_token =
        args.status_token_file.as_deref().map(|path| ClusterToken::from_file(path, "status_token_file")).transpose()?;
    config.status_requires_token = args.status_requires_token;
    config.limits = args.limits.to_limits();
    config.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::load(cert, key, args.tls_client_ca.as_deref())?),
        _ => None,
    };
    config.raft = args.raft.options(args.listen, config.tls.is_some())?;
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
        // A replica's run_over resolves once it leads and has published every manifest: the leader writes
        // the report (a later leader writes the same again).
        if finished {
            if replicated {
                tracing::info!("this replica leads at the end of the run: writing the report");
            }
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
    /// The coordinator's status URL, e.g. http://127.0.0.1:8080, or a comma-separated list of every replica's
    /// (each serves /status): tried in order until one answers.
    #[arg(long, value_name = "URL[,URL...]")]
    pub coordinator: String,
    /// Status token (or cluster token) file, when the status endpoint requires one; the first line is sent.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// For an https:// URL: the PEM CA the coordinator's certificate chains to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Check the coordinator's certificate against this name instead of the URL's host.
    #[arg(long, requires = "tls_ca")]
    pub tls_domain: Option<String>,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let token = ClusterToken::load(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    let tls = client_tls(args.tls_ca.as_deref(), None, None, args.tls_domain)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let urls = split_list(&args.coordinator).map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    let report = rt.block_on(fetch_status_from(&urls, token.as_ref(), tls.as_ref()))?;
    print!("{}", render_table(&report));
    Ok(())
}

/// The client side's TLS from its flags: None without a CA (plaintext).
pub fn client_tls(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    domain: Option<String>,
) -> anyhow::Result<Option<ClientTls>> {
    let Some(ca) = ca else {
        if cert.is_some() || key.is_some() {
            anyhow::bail!("--tls-cert and --tls-key need --tls-ca: the CA to verify the coordinator with");
        }
        return Ok(None);
    };
    let tls = ClientTls::load(ca, cert, key)?;
    Ok(Some(match domain {
        Some(domain) => tls.with_domain(domain),
        None => tls,
    }))
}
