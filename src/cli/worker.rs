//! `iro worker`: one worker process of a cluster. It learns the run from the coordinator, keeps its
//! models loaded across tasks, and on SIGTERM or ctrl-c gives its lease back before exiting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use iro_common::RunConfig;
use iro_coordinator::driver::routing::parse_urls;
use iro_coordinator::driver::{ClusterToken, TOKEN_ENV};
use iro_worker::pipeline::Pipeline;
use iro_worker::runtime::{CancellationToken, TaskRunner, WorkerExit, WorkerOptions, run_worker};

/// How long the process waits, after the loop ended, for a task thread that does not stop.
const EXIT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The coordinator's gRPC URL, e.g. http://coordinator:50051. For a replicated coordinator, a comma-separated
    /// list of every replica's (calls go to the leader; a replica that does not answer is passed over for the
    /// next), or any one of them: a replica that is not the leader names it, and the worker follows.
    #[arg(long, value_name = "URL[,URL...]", value_parser = coordinator_urls)]
    pub coordinator: String,
    /// auto (CUDA when libtorch sees it), cpu, cuda, cuda:N
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// File holding the cluster token (else the IRO_CLUSTER_TOKEN variable; none for a loopback coordinator).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The PEM CA the coordinator's certificate chains to; needed for an https:// --coordinator, which is
    /// then verified against it (never against the system roots).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// mTLS: this worker's PEM client certificate (needs --tls-key and --tls-ca).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the coordinator's certificate against this name instead of the URL's host.
    #[arg(long, requires = "tls_ca")]
    pub tls_domain: Option<String>,
    /// Name shown on the status page (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Register under this id (e.g. the pod name) so a restarted process takes over its predecessor's
    /// lease at once instead of leaving it to expire; default: the coordinator picks one.
    #[arg(long, env = "IRO_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Local scratch space (value checkpoints while training against a remote store, downloaded values).
    #[arg(long, default_value = ".iro-work")]
    pub work_dir: PathBuf,
}

/// `--coordinator`'s list, checked and normalized (`parse_urls`), comma-separated again for `WorkerOptions`.
fn coordinator_urls(list: &str) -> Result<String, String> {
    parse_urls(list).map(|urls| urls.join(","))
}

/// The task runner this binary runs tasks with: the IRO pipeline, built once per process from the run
/// config the coordinator sends (models stay loaded across tasks).
pub fn make_runner(config: &RunConfig, device: &str, work_dir: &Path) -> anyhow::Result<Box<dyn TaskRunner>> {
    Ok(Box::new(Pipeline::open(config.clone(), Some(device), work_dir)?))
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let token = ClusterToken::load(args.token_file.as_deref(), std::env::var(TOKEN_ENV).ok())?;
    let device = match iro_worker::device::parse_device(&args.device)? {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    };
    let name = args.name.unwrap_or_else(host_name);
    let mut options = WorkerOptions::new(args.coordinator, name, device.clone());
    options.token = token;
    options.tls = super::cluster::client_tls(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_domain,
    )?;
    options.worker_id = args.worker_id;
    options.memory_bytes = if device == "cpu" { host_memory_bytes() } else { 0 };

    let rt = tokio::runtime::Runtime::new()?;
    let shutdown = CancellationToken::new();
    rt.spawn(stop_on_signal(shutdown.clone()));
    let work_dir = args.work_dir;
    let factory = move |config: &RunConfig| {
        make_runner(config, &device, &work_dir).map_err(|e| iro_worker::Error::Runner(format!("{e:#}")))
    };
    let exit = rt.block_on(run_worker(options, factory, shutdown));
    // A task thread that ignores cancellation must not keep the process alive: its lease is back already.
    rt.shutdown_timeout(EXIT_GRACE);
    match exit? {
        WorkerExit::RunFinished => Ok(()),
        WorkerExit::Shutdown => {
            // Stopped before the run was over (a drain, an eviction, ctrl-c): a success here would mark a
            // Kubernetes Job index complete and the worker would never be replaced.
            tracing::info!(
                code = EXIT_STOPPED,
                "stopped before the run finished; exiting so a Job replaces this worker"
            );
            std::process::exit(EXIT_STOPPED)
        }
        WorkerExit::RunFailed { reason } => anyhow::bail!("the run failed: {reason}"),
    }
}

/// Exit status of a worker stopped by a signal while the run goes on: EX_TEMPFAIL (sysexits.h), "try again".
pub const EXIT_STOPPED: i32 = 75;

/// Cancels `shutdown` on SIGTERM (Kubernetes stopping the pod) or ctrl-c.
async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: giving the lease back and exiting"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: giving the lease back and exiting"),
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); only ctrl-c stops the worker cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

/// MemTotal from /proc/meminfo; 0 (unknown) where there is none.
fn host_memory_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
