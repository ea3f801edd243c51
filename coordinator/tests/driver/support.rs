//! Starting a coordinator on loopback and talking to it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use iro_common::RunConfig;
use iro_coordinator::driver::{Bearer, ClusterToken, CoordinatorConfig, ManualClock, ServerHandle, serve};
use iro_coordinator::state::Plan;
use iro_coordinator::status::StatusReport;
use iro_coordinator::status::client::{HttpResponse, fetch_status, get};
use iro_proto as pb;
use iro_proto::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub const TOKEN: &str = "test-cluster-token-0123456789";
pub const T0: u64 = 1_700_000_000_000;
/// As in production, a lease outlives a silent worker: a dead worker loses its lease long before the
/// lease itself would expire.
pub const LEASE_MS: u64 = 60_000;
pub const WORKER_TIMEOUT_MS: u64 = 30_000;

pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

pub fn token() -> ClusterToken {
    ClusterToken::new(TOKEN).unwrap()
}

/// One iteration: 2 rollout shards, a train gang of 1 rank, 1 eval shard.
pub fn run_config() -> RunConfig {
    let mut config = RunConfig::default();
    config.run.id = "itest".into();
    config.run.iterations = 1;
    config.data.prompts_per_iteration = 128;
    config.data.test_prompts = 64;
    config.cluster.shard_size = 64;
    config.cluster.train_ranks = 1;
    config
}

pub fn config(dir: &Path, clock: &ManualClock) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::new(run_config()).unwrap();
    config.plan = Plan { lease_ms: LEASE_MS, worker_timeout_ms: WORKER_TIMEOUT_MS, ..config.plan };
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.status_listen = "127.0.0.1:0".parse().unwrap();
    config.state_dir = Some(dir.to_owned());
    config.token = Some(token());
    config.clock = Arc::new(clock.clone());
    config.driver.restart_grace_ms = Some(0);
    // These tests speak the protocol with made-up output keys; manifests are tested with real objects
    // in worker/tests/runtime.rs and the driver's unit tests.
    config.write_manifests = false;
    // These protocol tests call without the session nonce RegisterWorker returns; sessions.rs tests them.
    config.require_sessions = false;
    config
}

pub async fn start(dir: &Path, clock: &ManualClock) -> ServerHandle {
    serve(config(dir, clock)).await.unwrap()
}

pub async fn client_with(server: &ServerHandle, token: Option<&ClusterToken>) -> Client {
    let channel = Endpoint::from_shared(server.grpc_url()).unwrap().connect().await.unwrap();
    CoordinatorClient::with_interceptor(channel, Bearer::new(token))
}

pub async fn client(server: &ServerHandle) -> Client {
    client_with(server, Some(&token())).await
}

pub fn register_request(name: &str) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        name: name.into(),
        resources: Some(pb::WorkerResources { device: "cpu".into(), memory_bytes: 1 << 30, cached_models: vec![] }),
        worker_id: String::new(),
    }
}

pub async fn register(client: &mut Client, name: &str) -> String {
    client.register_worker(register_request(name)).await.unwrap().into_inner().worker_id
}

pub async fn lease(client: &mut Client, worker: &str) -> pb::lease_task_response::Outcome {
    let request = pb::LeaseTaskRequest { worker_id: worker.into() };
    client.lease_task(request).await.unwrap().into_inner().outcome.unwrap()
}

/// Leases and expects a task.
pub async fn take(client: &mut Client, worker: &str) -> pb::TaskSpec {
    match lease(client, worker).await {
        pb::lease_task_response::Outcome::Task(task) => task,
        other => panic!("expected a task for {worker}, got {other:?}"),
    }
}

pub fn complete_request(worker: &str, task: &pb::TaskSpec) -> pb::CompleteTaskRequest {
    pb::CompleteTaskRequest {
        worker_id: worker.into(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        output_key: format!("runs/itest/{}.attempt-{}", task.task_id, task.attempt),
        sha256: "ab".repeat(32),
        records: 64,
        tokens: 1000,
    }
}

pub async fn complete(client: &mut Client, worker: &str, task: &pb::TaskSpec) -> pb::CompleteTaskResponse {
    client.complete_task(complete_request(worker, task)).await.unwrap().into_inner()
}

pub async fn status(server: &ServerHandle) -> StatusReport {
    fetch_status(&server.status_url(), None).await.unwrap()
}

pub async fn http(server: &ServerHandle, path: &str) -> HttpResponse {
    get(&server.status_url(), path, None).await.unwrap()
}

/// Polls /status until `want` holds (the driver's timer reacts to the manual clock asynchronously).
pub async fn wait_for(server: &ServerHandle, what: &str, want: impl Fn(&StatusReport) -> bool) -> StatusReport {
    for _ in 0..300 {
        let report = status(server).await;
        if want(&report) {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}: {:#?}", status(server).await);
}
