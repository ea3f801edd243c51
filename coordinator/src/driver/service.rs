//! The tonic `Coordinator` service: each RPC checks its request (`wire`), sends one command through the
//! driver handle, and maps the reply back. No state lives here; every call is timed and counted by
//! method and status code for `/metrics`.

use std::future::Future;
use std::sync::Arc;

use iro_common::layout::RunLayout;
use std::time::Instant;

use iro_proto as pb;
use tonic::{Request, Response, Status};

use super::actor::Handle;
use super::telemetry::RpcMetrics;
use super::wire::{self, Payloads};
use crate::error::Error;
use crate::state::{Command, Reply};

#[derive(Clone)]
pub struct CoordinatorService {
    handle: Handle,
    run_id: Arc<str>,
    run_config_json: Arc<str>,
    payloads: Arc<Payloads>,
    metrics: Arc<RpcMetrics>,
    /// Shard outputs must sit at their layout key (when this coordinator writes the manifests, which refuse
    /// any other key): checked at the door, so a bad report is refused instead of stalling the manifest writer.
    layout: Option<RunLayout>,
    require_sessions: bool,
    /// Raft id → gRPC URL of every replica, for the leader hint a follower answers with; empty for one
    /// coordinator.
    leader_urls: Arc<std::collections::BTreeMap<u64, String>>,
}

impl CoordinatorService {
    pub fn new(
        handle: Handle,
        run_id: &str,
        run_config_json: String,
        payloads: Payloads,
        metrics: Arc<RpcMetrics>,
        layout: Option<RunLayout>,
    ) -> Self {
        Self {
            handle,
            run_id: run_id.into(),
            run_config_json: run_config_json.into(),
            payloads: Arc::new(payloads),
            metrics,
            layout,
            require_sessions: true,
            leader_urls: Arc::default(),
        }
    }

    /// The replicas' gRPC URLs by Raft id (replicated coordinators).
    pub fn leader_urls(mut self, urls: std::collections::BTreeMap<u64, String>) -> Self {
        self.leader_urls = Arc::new(urls);
        self
    }

    /// The driver's refusal as a gRPC status; a follower's names the leader's URL when it knows one.
    fn status(&self, error: Error) -> Status {
        let leader = match &error {
            Error::NotLeader { leader } => leader.and_then(|id| self.leader_urls.get(&id)).cloned(),
            _ => None,
        };
        let mut status = wire::status(error);
        if let Some(url) = leader
            && let Ok(value) = url.parse()
        {
            status.metadata_mut().insert(super::routing::LEADER_HEADER, value);
        }
        status
    }

    async fn timed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.metrics.record(method, code, started.elapsed().as_secs_f64());
        result.map(Response::new)
    }

    async fn apply(&self, command: Command, session: Option<String>) -> Result<Reply, Status> {
        self.handle.apply_in_session(command, session).await.map(|applied| applied.reply).map_err(|e| self.status(e))
    }

    /// The session a call after RegisterWorker presents; a call without one is refused when sessions
    /// are required (the default).
    fn session<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        let session = wire::session(request.metadata())?;
        if session.is_none() && self.require_sessions {
            return Err(Status::failed_precondition(format!(
                "{}: missing; every call after RegisterWorker carries the session it returned",
                wire::SESSION_HEADER
            )));
        }
        Ok(session)
    }

    /// Whether calls without a session are refused (on by default). Off only for clients that predate
    /// sessions; such a client can then share a lease with another process under its id (review A6).
    pub fn require_sessions(mut self, require: bool) -> Self {
        self.require_sessions = require;
        self
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.timed("register_worker", async {
            let (id, name, resources) = wire::register(request.into_inner())?;
            let applied = self.handle.register(id, name, resources).await.map_err(|e| self.status(e))?;
            wire::register_response(applied.reply, &self.run_id, &self.run_config_json)
        })
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.timed("heartbeat", async {
            let session = self.session(&request)?;
            let reply = self.apply(wire::heartbeat(request.into_inner())?, session).await?;
            wire::heartbeat_response(reply)
        })
        .await
    }

    async fn lease_task(
        &self,
        request: Request<pb::LeaseTaskRequest>,
    ) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        self.timed("lease_task", async {
            let session = self.session(&request)?;
            let reply = self.apply(wire::lease(request.into_inner())?, session).await?;
            wire::lease_response(reply, &self.payloads)
        })
        .await
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.timed("complete_task", async {
            let session = self.session(&request)?;
            let command = wire::complete(request.into_inner())?;
            if let Some(layout) = &self.layout {
                wire::check_output_key(&command, layout)?;
            }
            let reply = self.apply(command, session).await?;
            wire::complete_response(reply)
        })
        .await
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::FailTaskResponse>, Status> {
        self.timed("fail_task", async {
            let session = self.session(&request)?;
            let reply = self.apply(wire::fail(request.into_inner())?, session).await?;
            wire::fail_response(reply)
        })
        .await
    }

    async fn join_gang(&self, request: Request<pb::JoinGangRequest>) -> Result<Response<pb::JoinGangResponse>, Status> {
        self.timed("join_gang", async {
            let session = self.session(&request)?;
            let reply = self.apply(wire::join_gang(request.into_inner())?, session).await?;
            wire::join_gang_response(reply)
        })
        .await
    }

    async fn abort_gang(
        &self,
        request: Request<pb::AbortGangRequest>,
    ) -> Result<Response<pb::AbortGangResponse>, Status> {
        self.timed("abort_gang", async {
            let session = self.session(&request)?;
            let reply = self.apply(wire::abort_gang(request.into_inner())?, session).await?;
            wire::abort_gang_response(reply)
        })
        .await
    }
}
