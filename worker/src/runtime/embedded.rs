//! The single-machine mode (`iro run CONFIG --workers N`): a coordinator and N worker loops in one
//! process, talking gRPC over loopback exactly as a cluster does, only smaller. The coordinator keeps
//! its command log in `state_dir`, so running again on the same folder resumes the run.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use iro_common::RunConfig;
use iro_coordinator::driver::{CoordinatorConfig, serve};
use iro_coordinator::state::RunStatus;
use iro_coordinator::status::{StatusReport, report};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::task::TaskRunner;
use super::task_loop::{WorkerOptions, run_worker};
use crate::error::{Error, Result};

/// Builds one worker's runner; called once per worker, each on its own blocking thread.
pub type SharedRunnerFactory = Arc<dyn Fn(&RunConfig) -> Result<Box<dyn TaskRunner>> + Send + Sync>;

/// Shown the coordinator's status about once a second while the run goes on (the CLI draws bars from it).
pub type ProgressFn = Box<dyn FnMut(&StatusReport) + Send>;

/// After the run is over, how long workers get to notice (their next LeaseTask says so) before they are
/// told to stop.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(15);

/// Runs `config` to the end with `workers` in-process workers. Returns once the run finished (Ok), failed
/// (`Error::Coordinator` with the reason), every worker stopped without finishing it (their first
/// error), or `shutdown` fired (`Error::Cancelled`; leases are given back and the state folder resumes
/// the run next time).
pub async fn run_embedded(
    config: RunConfig,
    workers: usize,
    state_dir: &Path,
    runner_factory: SharedRunnerFactory,
    shutdown: CancellationToken,
) -> Result<()> {
    run_embedded_with_progress(config, workers, state_dir, runner_factory, shutdown, None).await
}

/// `run_embedded`, calling `progress` with the coordinator's status report about once a second.
pub async fn run_embedded_with_progress(
    config: RunConfig,
    workers: usize,
    state_dir: &Path,
    runner_factory: SharedRunnerFactory,
    shutdown: CancellationToken,
    mut progress: Option<ProgressFn>,
) -> Result<()> {
    if workers == 0 {
        return Err(Error::InvalidRequest("the embedded mode needs at least one worker".into()));
    }
    let run_id = config.run.id.clone();
    let device = config.run.device.clone();
    let coordinator_error = |e: iro_coordinator::error::Error| Error::Coordinator(e.to_string());
    let mut coordinator = CoordinatorConfig::new(config).map_err(coordinator_error)?;
    // Ephemeral loopback ports: several embedded runs can share a machine, and without a token the
    // coordinator only listens on loopback anyway.
    let loopback = "127.0.0.1:0".parse().map_err(|e| Error::InvalidRequest(format!("loopback address: {e}")))?;
    coordinator.listen = loopback;
    coordinator.status_listen = loopback;
    coordinator.state_dir = Some(state_dir.to_owned());
    coordinator.token = None;
    let server = serve(coordinator).await.map_err(coordinator_error)?;
    tracing::info!(run = run_id, workers, status = %server.status_url(), "embedded run started");

    let stop_workers = shutdown.child_token();
    let mut loops = JoinSet::new();
    for i in 0..workers {
        let mut options = WorkerOptions::new(server.grpc_url(), format!("embedded-{i}"), device.clone());
        // Stable ids: a resumed run takes over its own workers' records instead of adding new ones.
        options.worker_id = Some(format!("embedded-{i}"));
        let factory = runner_factory.clone();
        loops.spawn(run_worker(options, move |config: &RunConfig| factory(config), stop_workers.clone()));
    }

    let mut first_error: Option<Error> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            status = server.run_over() => break Some(status),
            _ = tick.tick(), if progress.is_some() => {
                let id = run_id.clone();
                // A read fails only when the driver stopped, which `run_over` reports next.
                if let (Ok(status), Some(show)) = (server.handle().read(move |v| report(&id, v)).await, progress.as_mut()) {
                    show(&status);
                }
            }
            () = shutdown.cancelled() => break None,
            joined = loops.join_next() => match joined {
                Some(Ok(Ok(exit))) => tracing::info!(?exit, "an embedded worker stopped"),
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "an embedded worker failed");
                    first_error.get_or_insert(e);
                }
                Some(Err(e)) => {
                    first_error.get_or_insert(Error::Runner(format!("an embedded worker panicked: {e}")));
                }
                None => {
                    let why = first_error.take().map_or_else(|| "no error".to_owned(), |e| e.to_string());
                    server.shutdown().await;
                    return Err(Error::Runner(format!(
                        "all {workers} embedded workers stopped before run `{run_id}` was over; the first said: {why}"
                    )));
                }
            },
        }
    };

    // The run is over (workers see it at their next lease) or we are interrupted (the token stops them,
    // and each gives its lease back).
    if outcome.is_none() {
        stop_workers.cancel();
    }
    let drained = tokio::time::timeout(WORKER_EXIT_GRACE, async { while loops.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        stop_workers.cancel();
        while loops.join_next().await.is_some() {}
    }
    server.shutdown().await;
    match outcome {
        Some(RunStatus::Finished) => {
            tracing::info!(run = run_id, "embedded run finished");
            Ok(())
        }
        Some(RunStatus::Failed { reason }) => Err(Error::Coordinator(format!("run `{run_id}` failed: {reason}"))),
        Some(RunStatus::Running) => Err(Error::Coordinator(format!("the coordinator of run `{run_id}` stopped early"))),
        None => {
            Err(Error::Cancelled(format!("run `{run_id}` interrupted; run again on the same state folder to resume")))
        }
    }
}
