//! One leased task, from lease to report: a train rank first meets its gang through JoinGang; then the
//! runner works on a blocking thread while this side heartbeats with its progress. A heartbeat answered
//! "stop" (lease expired, gang aborted) cancels the runner and its result is dropped; a shutdown signal
//! cancels it and gives the lease back at once (FailTask released=true), so another worker can take the
//! task without waiting for the lease to expire. Otherwise the outcome is reported: CompleteTask with the
//! output's key, checksum and counts, or FailTask (AbortGang for a failed collective) with the error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iro_proto as pb;
use pb::join_gang_response::Outcome as JoinOutcome;
use tokio::task::JoinHandle;

use super::client::{CallContext, Retry};
use super::task::{TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner};
use super::task_loop::{Session, panic_message};
use crate::error::{Error, Result};

/// What the task loop does after a task.
pub(super) enum TaskEnd {
    /// Lease the next one.
    Continue,
    /// The shutdown signal fired; the lease has been given back.
    Shutdown,
}

/// How a running task ended, from the loop's side.
enum Watched {
    Finished(Result<TaskOutput>),
    /// The coordinator took the lease back (the reason it gave); the runner was cancelled.
    LeaseLost(String),
    /// Shutdown: the runner was cancelled and the lease released.
    Released,
    Panicked(String),
}

/// How the gang rendezvous ended.
enum Rendezvous {
    Ready,
    /// The lease is gone (or could not be used); nothing more to do for this task.
    Abandoned,
    /// Shutdown: the lease has been released.
    Released,
}

type Work = JoinHandle<(Box<dyn TaskRunner>, Result<TaskOutput>)>;

/// The shortest time a heartbeat may take before it is given up (the next one comes anyway).
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(5);

impl Session {
    pub(super) async fn execute(&self, spec: pb::TaskSpec) -> Result<TaskEnd> {
        let gang = spec.world > 0;
        let mut task = match task_ref(&spec) {
            Ok(task) => task,
            Err(message) => {
                tracing::error!(
                    worker_id = self.worker_id,
                    task_id = spec.task_id,
                    attempt = spec.attempt,
                    "{message}"
                );
                self.fail(&spec.task_id, spec.attempt, &message, false).await?;
                return Ok(TaskEnd::Continue);
            }
        };
        tracing::info!(
            worker_id = self.worker_id,
            task_id = task.task_id,
            attempt = task.attempt,
            rank = task.rank,
            world = task.world,
            "leased"
        );
        if gang {
            match self.rendezvous(&mut task).await? {
                Rendezvous::Ready => {}
                Rendezvous::Abandoned => return Ok(TaskEnd::Continue),
                Rendezvous::Released => return Ok(TaskEnd::Shutdown),
            }
        }

        let started = Instant::now();
        let control = Arc::new(TaskControl::default());
        let mut runner = self.runner.take()?;
        let work = tokio::task::spawn_blocking({
            let (task, control) = (task.clone(), control.clone());
            move || {
                let result = runner.run(&task, &control);
                (runner, result)
            }
        });
        let watched = self.watch(&task, &control, work).await;
        let seconds = started.elapsed().as_secs_f64();
        match watched {
            Watched::Finished(Ok(output)) => self.complete(&task, output, seconds).await?,
            Watched::Finished(Err(e)) => {
                tracing::warn!(
                    worker_id = self.worker_id,
                    task_id = task.task_id,
                    attempt = task.attempt,
                    error = %e,
                    kind = e.kind(),
                    "task failed"
                );
                if gang && matches!(e, Error::Collective(_)) {
                    self.abort_gang(&task, &e.to_string()).await?;
                } else {
                    self.fail(&task.task_id, task.attempt, &e.to_string(), e.is_infrastructure()).await?;
                }
            }
            Watched::LeaseLost(reason) => tracing::warn!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                attempt = task.attempt,
                "the coordinator took the task back ({reason}); its result is dropped"
            ),
            Watched::Released => return Ok(TaskEnd::Shutdown),
            Watched::Panicked(message) => {
                let message = format!("the task runner panicked: {message}");
                self.fail(&task.task_id, task.attempt, &message, false).await?;
                return Err(Error::Runner(format!("{message} (task {}); this worker cannot go on", task.task_id)));
            }
        }
        Ok(TaskEnd::Continue)
    }

    /// Waits for the runner, heartbeating every interval; cancels it when the lease is lost or on
    /// shutdown.
    async fn watch(&self, task: &TaskRef, control: &TaskControl, mut work: Work) -> Watched {
        let shutdown = self.shutdown.clone();
        let start = tokio::time::Instant::now() + self.heartbeat;
        let mut ticker = tokio::time::interval_at(start, self.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost: Option<String> = None;
        loop {
            tokio::select! {
                joined = &mut work => {
                    return match joined {
                        Ok((runner, result)) => {
                            self.runner.put(runner);
                            match lost {
                                Some(reason) => Watched::LeaseLost(reason),
                                None => Watched::Finished(result),
                            }
                        }
                        Err(e) => Watched::Panicked(panic_message(e)),
                    };
                }
                _ = ticker.tick(), if lost.is_none() => {
                    if let Some(reason) = self.heartbeat(task, control).await {
                        control.cancel();
                        lost = Some(reason);
                    }
                }
                () = shutdown.cancelled() => {
                    control.cancel();
                    if lost.is_none() {
                        self.release(task).await;
                    }
                    self.let_runner_stop(task, work).await;
                    return Watched::Released;
                }
            }
        }
    }

    /// After a shutdown released the lease: waits a little for the cancelled runner, only so that it
    /// stops cleanly and comes back; a runner that does not is left behind.
    async fn let_runner_stop(&self, task: &TaskRef, mut work: Work) {
        match tokio::time::timeout(self.shutdown_grace, &mut work).await {
            Ok(Ok((runner, _))) => self.runner.put(runner),
            Ok(Err(e)) => {
                tracing::warn!(worker_id = self.worker_id, "the runner panicked while stopping: {}", panic_message(e));
            }
            Err(_) => tracing::warn!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                "the task did not stop within {:?} of the shutdown signal; exiting without it",
                self.shutdown_grace
            ),
        }
    }

    /// One heartbeat for the running task; Some(reason) when the coordinator wants it stopped. A
    /// heartbeat that does not get through is only logged: the task goes on, and if the lease is lost
    /// meanwhile, the next heartbeat or the report is told so.
    async fn heartbeat(&self, task: &TaskRef, control: &TaskControl) -> Option<String> {
        let (done, total) = control.progress();
        let request = pb::HeartbeatRequest {
            worker_id: self.worker_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            progress_done: done,
            progress_total: total,
        };
        // Bounded well below the request timeout: while a heartbeat hangs, the loop cannot see the task end.
        let limit = self.heartbeat.max(HEARTBEAT_LIMIT);
        let sent = self.coordinator.once("Heartbeat", |mut client| async move { client.heartbeat(request).await });
        let sent = tokio::time::timeout(limit, sent)
            .await
            .unwrap_or_else(|_| Err(Error::Coordinator(format!("Heartbeat: no answer within {limit:?}"))));
        match sent {
            Ok(reply) if reply.keep_working => None,
            Ok(reply) => Some(fence_text(reply.fence.as_ref())),
            Err(e) => {
                tracing::warn!(
                    worker_id = self.worker_id,
                    task_id = task.task_id,
                    attempt = task.attempt,
                    error = %e,
                    "heartbeat failed; the task goes on"
                );
                None
            }
        }
    }

    /// JoinGang until every rank has published its endpoint; fills `task.endpoints`.
    async fn rendezvous(&self, task: &mut TaskRef) -> Result<Rendezvous> {
        let endpoint = match self.on_runner(task.clone(), |runner, task| runner.gang_endpoint(&task)).await? {
            Ok(endpoint) => endpoint,
            Err(e) => {
                let message = format!("cannot publish this rank's gang endpoint: {e}");
                self.fail(&task.task_id, task.attempt, &message, false).await?;
                return Ok(Rendezvous::Abandoned);
            }
        };
        let request = pb::JoinGangRequest {
            worker_id: self.worker_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            endpoint,
        };
        loop {
            let context = self.context("JoinGang", task);
            let reply = self
                .coordinator
                .call(context, self.coordinator.retry(Some(&self.shutdown)), |mut client| {
                    let request = request.clone();
                    async move { client.join_gang(request).await }
                })
                .await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(Error::Cancelled(_)) => {
                    self.release(task).await;
                    return Ok(Rendezvous::Released);
                }
                Err(e) => return Err(e),
            };
            match reply.outcome {
                Some(JoinOutcome::Ready(ready)) => {
                    tracing::info!(
                        worker_id = self.worker_id,
                        task_id = task.task_id,
                        rank = ready.rank,
                        world = ready.world,
                        "gang ready"
                    );
                    task.endpoints = ready.endpoints;
                    return Ok(Rendezvous::Ready);
                }
                Some(JoinOutcome::Waiting(waiting)) => {
                    tracing::debug!(
                        task_id = task.task_id,
                        joined = waiting.joined,
                        world = waiting.world,
                        "waiting for the gang"
                    );
                    let wait = Duration::from_millis(u64::from(waiting.retry_after_ms.max(1)));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.shutdown.cancelled() => {
                            self.release(task).await;
                            return Ok(Rendezvous::Released);
                        }
                    }
                }
                Some(JoinOutcome::Fence(fence)) => {
                    tracing::warn!(
                        worker_id = self.worker_id,
                        task_id = task.task_id,
                        attempt = task.attempt,
                        "the gang will not start for this rank: {}",
                        fence_text(Some(&fence))
                    );
                    return Ok(Rendezvous::Abandoned);
                }
                None => return Err(Error::Coordinator("JoinGang answered without an outcome".into())),
            }
        }
    }

    async fn complete(&self, task: &TaskRef, output: TaskOutput, seconds: f64) -> Result<()> {
        let request = pb::CompleteTaskRequest {
            worker_id: self.worker_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            output_key: output.key.clone(),
            sha256: output.sha256.clone(),
            records: output.records,
            tokens: output.tokens,
        };
        let reply = self
            .coordinator
            .call(self.context("CompleteTask", task), self.coordinator.retry(Some(&self.shutdown)), |mut client| {
                let request = request.clone();
                async move { client.complete_task(request).await }
            })
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            // Shutting down while the coordinator is unreachable: the lease expires and the task is redone.
            Err(Error::Cancelled(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if reply.accepted {
            tracing::info!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                attempt = task.attempt,
                key = output.key,
                records = output.records,
                tokens = output.tokens,
                seconds,
                "completed"
            );
        } else {
            // A repeated report of an already accepted attempt is fenced as already done: not an error.
            tracing::warn!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                attempt = task.attempt,
                "the coordinator did not use this output: {}",
                fence_text(reply.fence.as_ref())
            );
        }
        Ok(())
    }

    /// Reports a failed attempt; the coordinator retries the task or fails the run at its attempt limit.
    /// `retryable`: the infrastructure failed, not the task (the store did not answer), so the coordinator
    /// retries after a backoff without counting it.
    async fn fail(&self, task_id: &str, attempt: u32, error: &str, retryable: bool) -> Result<()> {
        let request = pb::FailTaskRequest {
            worker_id: self.worker_id.clone(),
            task_id: task_id.to_owned(),
            attempt,
            error: iro_coordinator::driver::wire::report_text(error),
            released: false,
            retryable,
        };
        let context = CallContext { call: "FailTask", worker_id: &self.worker_id, task_id, attempt };
        let reply = self
            .coordinator
            .call(context, self.coordinator.retry(Some(&self.shutdown)), |mut client| {
                let request = request.clone();
                async move { client.fail_task(request).await }
            })
            .await;
        match reply {
            Ok(reply) => {
                tracing::info!(
                    worker_id = self.worker_id,
                    task_id,
                    attempt,
                    will_retry = reply.will_retry,
                    "reported the failure"
                );
                Ok(())
            }
            Err(Error::Cancelled(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn abort_gang(&self, task: &TaskRef, reason: &str) -> Result<()> {
        let request = pb::AbortGangRequest {
            worker_id: self.worker_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            reason: iro_coordinator::driver::wire::report_text(reason),
        };
        let reply = self
            .coordinator
            .call(self.context("AbortGang", task), self.coordinator.retry(Some(&self.shutdown)), |mut client| {
                let request = request.clone();
                async move { client.abort_gang(request).await }
            })
            .await;
        match reply {
            Ok(reply) => {
                tracing::info!(
                    worker_id = self.worker_id,
                    task_id = task.task_id,
                    will_retry = reply.will_retry,
                    "aborted the gang"
                );
                Ok(())
            }
            Err(Error::Cancelled(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease back on shutdown (FailTask released=true), trying for at most the shutdown grace:
    /// if it does not get through, the lease simply expires.
    async fn release(&self, task: &TaskRef) {
        let request = pb::FailTaskRequest {
            worker_id: self.worker_id.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            error: "the worker is shutting down".to_owned(),
            released: true,
            retryable: false,
        };
        // The shutdown token has fired already, so this retry must not watch it.
        let retry = Retry { deadline: Some(Instant::now() + self.shutdown_grace), cancel: None };
        let reply = self
            .coordinator
            .call(self.context("FailTask", task), retry, |mut client| {
                let request = request.clone();
                async move { client.fail_task(request).await }
            })
            .await;
        match reply {
            Ok(_) => tracing::info!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                attempt = task.attempt,
                "released the lease"
            ),
            Err(e) => tracing::warn!(
                worker_id = self.worker_id,
                task_id = task.task_id,
                attempt = task.attempt,
                error = %e,
                "could not release the lease; it will expire"
            ),
        }
    }

    /// Runs `f` on the runner on a blocking thread (runner calls may block for long).
    async fn on_runner<T: Send + 'static>(
        &self,
        task: TaskRef,
        f: impl FnOnce(&mut dyn TaskRunner, TaskRef) -> T + Send + 'static,
    ) -> Result<T> {
        let mut runner = self.runner.take()?;
        let (runner, out) = tokio::task::spawn_blocking(move || {
            let out = f(runner.as_mut(), task);
            (runner, out)
        })
        .await
        .map_err(|e| Error::Runner(format!("panicked: {}", panic_message(e))))?;
        self.runner.put(runner);
        Ok(out)
    }

    fn context<'a>(&'a self, call: &'static str, task: &'a TaskRef) -> CallContext<'a> {
        CallContext { call, worker_id: &self.worker_id, task_id: &task.task_id, attempt: task.attempt }
    }
}

/// The runner's view of a lease. Outside a gang the wire says world 0; the runner sees rank 0 of 1.
fn task_ref(spec: &pb::TaskSpec) -> std::result::Result<TaskRef, String> {
    let phase = TaskPhase::parse(&spec.phase).ok_or_else(|| {
        format!(
            "task {} has phase `{}`, which this worker does not know (rollout, train, eval)",
            spec.task_id, spec.phase
        )
    })?;
    let (rank, world) = if spec.world == 0 { (0, 1) } else { (spec.rank, spec.world) };
    Ok(TaskRef {
        task_id: spec.task_id.clone(),
        attempt: spec.attempt,
        iteration: spec.iteration,
        phase,
        shard: spec.shard,
        rank,
        world,
        endpoints: Vec::new(),
    })
}

fn fence_text(fence: Option<&pb::Fence>) -> String {
    match fence {
        Some(fence) => format!("{}: {}", fence.kind, fence.reason),
        None => "no reason given".to_owned(),
    }
}
