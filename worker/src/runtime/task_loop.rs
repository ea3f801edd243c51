//! The worker's task loop: register with the coordinator, build the task runner once (models stay
//! loaded across tasks), then lease tasks until the run is over or a shutdown signal arrives. What
//! happens to one leased task (gang rendezvous, heartbeats, the report) lives in `execute`.

use std::time::Duration;

use iro_common::RunConfig;
use iro_coordinator::driver::{ClientTls, ClusterToken};
use iro_proto as pb;
use pb::lease_task_response::Outcome;
use tokio_util::sync::CancellationToken;

use super::client::{CallContext, Coordinator, Timeouts};
use super::execute::TaskEnd;
use super::task::TaskRunner;
use crate::error::{Error, Result};

/// Heartbeat period when the coordinator names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// Everything a worker needs besides its runner: where the coordinator is, how to authenticate, and
/// what to tell it about this machine.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The coordinator's gRPC URL, e.g. `http://coordinator:50051`, or a comma-separated list of its
    /// replicas' (`driver::routing::parse_urls`); a follower's hint at the leader is followed either way.
    pub coordinator: String,
    /// The cluster token; None when the coordinator runs without one (loopback only).
    pub token: Option<ClusterToken>,
    /// How to verify an `https://` coordinator (and the client certificate for mTLS); None: plaintext.
    pub tls: Option<ClientTls>,
    /// Operator-facing name (a pod or host name), shown on the status page.
    pub name: String,
    /// Register under this id (e.g. a stable pod name) so a restarted process takes over from its
    /// predecessor at once; None: the coordinator picks a fresh one.
    pub worker_id: Option<String>,
    /// What the worker computes on: `cpu`, `cuda:0`, ...
    pub device: String,
    /// Device memory (host memory on CPU), for placement; 0 when unknown.
    pub memory_bytes: u64,
    /// Model folders already loaded or on local disk.
    pub cached_models: Vec<String>,
    pub timeouts: Timeouts,
    /// After a shutdown signal, how long to wait for the running task to stop before exiting anyway. Its
    /// lease is given back first, so waiting only lets the runner clean up.
    pub shutdown_grace: Duration,
}

impl WorkerOptions {
    pub fn new(coordinator: impl Into<String>, name: impl Into<String>, device: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            token: None,
            tls: None,
            name: name.into(),
            worker_id: None,
            device: device.into(),
            memory_bytes: 0,
            cached_models: Vec::new(),
            timeouts: Timeouts::default(),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Why a worker's loop ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// The coordinator says the run is complete.
    RunFinished,
    /// The coordinator says the run failed, for this reason.
    RunFailed { reason: String },
    /// The shutdown signal fired; a lease held then was given back.
    Shutdown,
}

/// One registered worker: its connection, identity and runner.
pub(super) struct Session {
    pub(super) coordinator: Coordinator,
    pub(super) worker_id: String,
    pub(super) heartbeat: Duration,
    pub(super) shutdown: CancellationToken,
    pub(super) shutdown_grace: Duration,
    pub(super) runner: RunnerSlot,
}

/// The runner between calls; empty while a blocking call has it, or after it panicked. A mutex only
/// so that the session is `Sync` (its futures move between threads); it is never held across an await.
#[derive(Default)]
pub(super) struct RunnerSlot(std::sync::Mutex<Option<Box<dyn TaskRunner>>>);

impl RunnerSlot {
    pub(super) fn take(&self) -> Result<Box<dyn TaskRunner>> {
        let mut slot = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.take().ok_or_else(|| Error::Runner("lost after an earlier panic".into()))
    }

    pub(super) fn put(&self, runner: Box<dyn TaskRunner>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(runner);
    }
}

/// Runs one worker until the run is over or `shutdown` fires. `runner_factory` is called once, on a
/// blocking thread, with the run config the coordinator sent; the worker heartbeats meanwhile, so a
/// slow model load does not get it declared dead.
pub async fn run_worker<F>(options: WorkerOptions, runner_factory: F, shutdown: CancellationToken) -> Result<WorkerExit>
where
    F: FnOnce(&RunConfig) -> Result<Box<dyn TaskRunner>> + Send + 'static,
{
    let coordinator =
        Coordinator::new(&options.coordinator, options.token.as_ref(), options.tls.as_ref(), options.timeouts)?;
    let registered = match register(&coordinator, &options, &shutdown).await {
        Ok(registered) => registered,
        Err(Error::Cancelled(_)) => return Ok(WorkerExit::Shutdown),
        Err(e) => return Err(e),
    };
    let config: RunConfig = serde_json::from_str(&registered.run_config_json).map_err(|e| {
        Error::Coordinator(format!(
            "RegisterWorker from {}: the run config it sent does not parse (is this worker older than the \
             coordinator?): {e}",
            coordinator.url()
        ))
    })?;
    let heartbeat = match registered.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    tracing::info!(
        worker_id = registered.worker_id,
        run_id = registered.run_id,
        coordinator = coordinator.url(),
        device = options.device,
        heartbeat_ms = heartbeat.as_millis() as u64,
        "registered with the coordinator"
    );
    let coordinator = coordinator.in_session(&registered.session);
    let session = Session {
        coordinator,
        worker_id: registered.worker_id,
        heartbeat,
        shutdown,
        shutdown_grace: options.shutdown_grace,
        runner: RunnerSlot::default(),
    };
    match session.build_runner(runner_factory, config).await? {
        Some(runner) => session.runner.put(runner),
        None => return Ok(WorkerExit::Shutdown),
    }
    let exit = session.lease_loop().await;
    match &exit {
        Ok(exit) => tracing::info!(worker_id = session.worker_id, ?exit, "worker loop ended"),
        Err(e) => tracing::error!(worker_id = session.worker_id, error = %e, "worker loop failed"),
    }
    exit
}

async fn register(
    coordinator: &Coordinator,
    options: &WorkerOptions,
    shutdown: &CancellationToken,
) -> Result<pb::RegisterWorkerResponse> {
    let request = pb::RegisterWorkerRequest {
        name: options.name.clone(),
        resources: Some(pb::WorkerResources {
            device: options.device.clone(),
            memory_bytes: options.memory_bytes,
            cached_models: options.cached_models.clone(),
        }),
        worker_id: options.worker_id.clone().unwrap_or_default(),
    };
    let worker_id = options.worker_id.as_deref().unwrap_or("");
    let context = CallContext { call: "RegisterWorker", worker_id, task_id: "", attempt: 0 };
    coordinator
        .call(context, coordinator.retry_forever(Some(shutdown)), |mut client| {
            let request = request.clone();
            async move { client.register_worker(request).await }
        })
        .await
}

impl Session {
    /// Builds the runner on a blocking thread while heartbeating; None when shutdown fired first (the
    /// half-built runner is left to finish and be dropped in the background).
    async fn build_runner<F>(&self, factory: F, config: RunConfig) -> Result<Option<Box<dyn TaskRunner>>>
    where
        F: FnOnce(&RunConfig) -> Result<Box<dyn TaskRunner>> + Send + 'static,
    {
        let mut build = tokio::task::spawn_blocking(move || factory(&config));
        let mut ticker = tokio::time::interval(self.heartbeat);
        loop {
            tokio::select! {
                built = &mut build => {
                    return match built {
                        Ok(Ok(runner)) => Ok(Some(runner)),
                        Ok(Err(e)) => {
                            tracing::error!(worker_id = self.worker_id, error = %e, "cannot build the task runner");
                            Err(e)
                        }
                        Err(e) => Err(Error::Runner(format!("building it panicked: {}", panic_message(e)))),
                    };
                }
                _ = ticker.tick() => self.idle_heartbeat().await,
                () = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// Liveness without a lease; a failure is only logged (the next one may get through).
    async fn idle_heartbeat(&self) {
        let request = pb::HeartbeatRequest { worker_id: self.worker_id.clone(), ..Default::default() };
        let sent =
            self.coordinator.once("Heartbeat", |mut client| async move { client.heartbeat(request).await }).await;
        if let Err(e) = sent {
            tracing::warn!(worker_id = self.worker_id, error = %e, "heartbeat failed");
        }
    }

    async fn lease_loop(&self) -> Result<WorkerExit> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(WorkerExit::Shutdown);
            }
            let request = pb::LeaseTaskRequest { worker_id: self.worker_id.clone() };
            let context = CallContext { call: "LeaseTask", worker_id: &self.worker_id, task_id: "", attempt: 0 };
            // Idle: wait for the coordinator as long as it takes (it may be rescheduling).
            let retry = self.coordinator.retry_forever(Some(&self.shutdown));
            let reply = self
                .coordinator
                .call(context, retry, |mut client| {
                    let request = request.clone();
                    async move { client.lease_task(request).await }
                })
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(Error::Cancelled(_)) => return Ok(WorkerExit::Shutdown),
                Err(e) => return Err(e),
            };
            match reply.outcome {
                Some(Outcome::Task(spec)) => {
                    if let TaskEnd::Shutdown = self.execute(spec).await? {
                        return Ok(WorkerExit::Shutdown);
                    }
                }
                Some(Outcome::RetryAfterMs(ms)) => {
                    tracing::debug!(
                        worker_id = self.worker_id,
                        ms,
                        reason = reply.retry_reason,
                        "nothing to lease yet"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(u64::from(ms.max(1)))) => {}
                        () = self.shutdown.cancelled() => return Ok(WorkerExit::Shutdown),
                    }
                }
                Some(Outcome::RunFinished(_)) => return Ok(WorkerExit::RunFinished),
                Some(Outcome::RunFailed(reason)) => return Ok(WorkerExit::RunFailed { reason }),
                None => {
                    return Err(Error::Coordinator(format!(
                        "LeaseTask from {} answered without an outcome (a newer coordinator?)",
                        self.coordinator.url()
                    )));
                }
            }
        }
    }
}

/// The text a panicking task left, for the report.
pub(super) fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(error) => error.to_string(),
    }
}
