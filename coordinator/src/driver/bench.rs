//! The coordinator's scale benchmark (run by `examples/lease_bench.rs`): the bare state machine with
//! many simulated workers and tasks, then LeaseTask latency through the real gRPC service on loopback,
//! with the token check and the fsync'd command log on the path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iro_common::RunConfig;
use iro_proto as pb;
use iro_proto::coordinator_client::CoordinatorClient;
use tonic::transport::Endpoint;

use super::auth::{Bearer, ClusterToken};
use super::server::{CoordinatorConfig, serve};
use crate::error::{Error, Result};
use crate::state::{Command, Lease, Output, Plan, Reply, Resources, RunState, WorkerId};

#[derive(Debug, Clone)]
pub struct StateBench {
    pub workers: u32,
    pub tasks: u32,
    pub leases: u64,
    pub lease_seconds: f64,
    pub leases_per_second: f64,
    /// Lease + complete, per second.
    pub cycles_per_second: f64,
    pub log_commands: usize,
    /// Rebuilding the final state from its command log, as a restart does.
    pub replay_seconds: f64,
}

/// `workers` workers each lease and complete tasks round-robin until all `tasks` rollout shards are done.
pub fn state_machine(workers: u32, tasks: u32) -> Result<StateBench> {
    let plan = Plan::new(1, tasks, 0, 1);
    let mut state = RunState::new(plan.clone())?;
    let mut log = Vec::with_capacity(tasks as usize * 2 + workers as usize);
    let mut apply = |state: &mut RunState, command: Command| {
        log.push(command.clone());
        state.apply(command)
    };
    let ids: Vec<WorkerId> = (0..workers).map(|i| WorkerId::new(format!("bench-{i:05}"))).collect();
    for id in &ids {
        let resources = Resources { device: "cpu".into(), memory_bytes: 0, cached_models: vec![] };
        apply(
            &mut state,
            Command::RegisterWorker {
                worker_id: id.clone(),
                name: id.to_string(),
                resources,
                now_ms: 0,
                session: String::new(),
            },
        )?;
    }
    let mut now = 1;
    let (mut leases, mut lease_time) = (0u64, Duration::ZERO);
    let started = Instant::now();
    let mut held = Vec::with_capacity(ids.len());
    while leases < u64::from(tasks) {
        held.clear();
        let round = Instant::now();
        for id in &ids {
            let reply = apply(&mut state, Command::LeaseTask { worker_id: id.clone(), now_ms: now })?.reply;
            if let Reply::Lease(Lease::Task { task_id, attempt, .. }) = reply {
                held.push((id, task_id, attempt));
            }
        }
        lease_time += round.elapsed();
        if held.is_empty() {
            break;
        }
        leases += held.len() as u64;
        for (id, task_id, attempt) in held.drain(..) {
            let output = Output { key: format!("bench/{task_id}"), sha256: "0".repeat(64), records: 64, tokens: 0 };
            apply(&mut state, Command::CompleteTask { worker_id: id.clone(), task_id, attempt, output, now_ms: now })?;
        }
        now += 10;
    }
    let total = started.elapsed().as_secs_f64();
    let replay_started = Instant::now();
    let replayed = RunState::replay(plan, log.iter().cloned())?;
    let replay_seconds = replay_started.elapsed().as_secs_f64();
    if replayed.digest() != state.digest() {
        return Err(Error::Unavailable { message: "benchmark replay reached a different state".into() });
    }
    Ok(StateBench {
        workers,
        tasks,
        leases,
        lease_seconds: lease_time.as_secs_f64(),
        leases_per_second: leases as f64 / lease_time.as_secs_f64().max(1e-9),
        cycles_per_second: leases as f64 / total.max(1e-9),
        log_commands: log.len(),
        replay_seconds,
    })
}

#[derive(Debug, Clone)]
pub struct GrpcBench {
    pub calls: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// LeaseTask + CompleteTask pairs per second, all clients together.
    pub cycles_per_second: f64,
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable { message: format!("benchmark client: {e}") }
}

/// Serves a run of `tasks` shards on loopback (command log in `state_dir`, or in memory), registers
/// `workers` workers over gRPC, then makes `calls` LeaseTask calls (each followed by its
/// CompleteTask) from `concurrency` concurrent clients, and reports LeaseTask latency.
pub async fn grpc_lease_latency(
    workers: u32,
    tasks: u32,
    calls: usize,
    concurrency: usize,
    state_dir: Option<PathBuf>,
) -> Result<GrpcBench> {
    let token = ClusterToken::new("benchmark-token-0123456789")?;
    let mut config = bench_config(tasks, &token)?;
    config.state_dir = state_dir;
    let server = serve(config).await?;
    let result = drive(&server.grpc_url(), &token, workers, calls, concurrency).await;
    server.shutdown().await;
    result
}

fn bench_config(tasks: u32, token: &ClusterToken) -> Result<CoordinatorConfig> {
    let mut config = CoordinatorConfig::new(RunConfig::default())?;
    config.plan = Plan::new(1, tasks, 0, 1);
    config.listen = "127.0.0.1:0".parse().map_err(unavailable)?;
    config.status_listen = "127.0.0.1:0".parse().map_err(unavailable)?;
    // The simulated workers write no objects, so there is nothing a manifest could name.
    config.write_manifests = false;
    config.token = Some(token.clone());
    Ok(config)
}

/// `grpc_lease_latency` against three Raft replicas on loopback (each with its fsync'd Raft log under
/// `dir`, plaintext peer links): the clients call the leader, which answers once a majority has the
/// command. Also returns how long the first leader took to be elected.
pub async fn grpc_lease_latency_replicated(
    workers: u32,
    tasks: u32,
    calls: usize,
    concurrency: usize,
    dir: PathBuf,
) -> Result<(GrpcBench, f64)> {
    let token = ClusterToken::new("benchmark-token-0123456789")?;
    let port = || -> Result<u16> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(unavailable)?;
        Ok(listener.local_addr().map_err(unavailable)?.port())
    };
    let mut grpc = std::collections::BTreeMap::new();
    let mut peers = std::collections::BTreeMap::new();
    for id in 1..=3u64 {
        grpc.insert(id, port()?);
        peers.insert(id, format!("127.0.0.1:{}", port()?));
    }
    let started = Instant::now();
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let mut config = bench_config(tasks, &token)?;
        config.listen = format!("127.0.0.1:{}", grpc[&id]).parse().map_err(unavailable)?;
        config.state_dir = Some(dir.join(format!("replica-{id}")));
        let listen = peers[&id].parse().map_err(unavailable)?;
        let mut raft = super::server::RaftOptions::new(id, peers.clone(), listen);
        raft.grpc_urls = grpc.iter().map(|(id, port)| (*id, format!("http://127.0.0.1:{port}"))).collect();
        config.raft = Some(raft);
        servers.push(serve(config).await?);
    }
    let mut leader = None;
    for _ in 0..1_000 {
        for server in &servers {
            let raft = server.handle().read(|v| v.raft.clone()).await?;
            if raft.as_ref().is_some_and(|r| r.role == "leader") {
                leader = Some(server.grpc_url());
            }
        }
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elected_s = started.elapsed().as_secs_f64();
    let leader = leader.ok_or_else(|| unavailable("no leader was elected in 10 s"))?;
    let result = drive(&leader, &token, workers, calls, concurrency).await;
    for server in servers {
        server.shutdown().await;
    }
    Ok((result?, elected_s))
}

/// Registers `workers` workers at `url`, then makes `calls` LeaseTask calls (each followed by its
/// CompleteTask) from `concurrency` concurrent clients.
async fn drive(url: &str, token: &ClusterToken, workers: u32, calls: usize, concurrency: usize) -> Result<GrpcBench> {
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(unavailable)?;
    let concurrency = concurrency.max(1);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let channel = endpoint.connect().await.map_err(unavailable)?;
        clients.push(CoordinatorClient::with_interceptor(channel, Bearer::new(Some(token))));
    }
    let mut ids = Vec::with_capacity(workers as usize);
    for i in 0..workers {
        let request = pb::RegisterWorkerRequest {
            name: format!("bench-{i}"),
            resources: Some(pb::WorkerResources { device: "cpu".into(), ..Default::default() }),
            worker_id: String::new(),
        };
        let client = &mut clients[i as usize % concurrency];
        let registered = client.register_worker(request).await.map_err(unavailable)?.into_inner();
        ids.push((registered.worker_id, registered.session));
    }
    let ids = Arc::new(ids);
    let started = Instant::now();
    let mut tasks_running = Vec::with_capacity(concurrency);
    for (c, mut client) in clients.into_iter().enumerate() {
        let ids = ids.clone();
        let per_client = calls / concurrency + usize::from(c < calls % concurrency);
        tasks_running.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            // Each client drives its own share of the workers, one call at a time.
            let mine: Vec<&(String, String)> = ids.iter().skip(c).step_by(concurrency).collect();
            for i in 0..per_client {
                let Some((worker_id, session)) = mine.get(i % mine.len().max(1)).copied() else { break };
                let call = Instant::now();
                let response = client
                    .lease_task(in_session(session, pb::LeaseTaskRequest { worker_id: worker_id.clone() }))
                    .await
                    .map_err(unavailable)?
                    .into_inner();
                latencies.push(call.elapsed().as_secs_f64() * 1e3);
                let Some(pb::lease_task_response::Outcome::Task(task)) = response.outcome else { continue };
                let complete = pb::CompleteTaskRequest {
                    worker_id: worker_id.clone(),
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    output_key: format!("bench/{}", task.task_id),
                    sha256: "0".repeat(64),
                    records: 64,
                    tokens: 0,
                };
                client.complete_task(in_session(session, complete)).await.map_err(unavailable)?;
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(calls);
    for task in tasks_running {
        latencies.extend(task.await.map_err(unavailable)??);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies.get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0)
    };
    Ok(GrpcBench {
        calls: latencies.len(),
        concurrency,
        seconds,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        cycles_per_second: latencies.len() as f64 / seconds.max(1e-9),
    })
}

/// One client speaks for several workers, so each request carries its worker's session itself.
fn in_session<T>(session: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = session.parse() {
        request.metadata_mut().insert(super::wire::SESSION_HEADER, value);
    }
    request
}
