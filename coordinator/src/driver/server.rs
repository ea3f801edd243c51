//! The library entry point both `iro coordinator` and the embedded `iro run --workers N` call: resume the
//! run from its state folder, bind the gRPC and status listeners (port 0 is fine), and hand back the
//! bound addresses and a way to shut down.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use iro_common::RunConfig;
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use iro_proto::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use super::actor::{self, DriverOptions, Handle};
use super::auth::{self, ClusterToken};
use super::clock::{Clock, SystemClock};
use super::log::{self, CommandLog, FileLog, MemoryLog};
use super::manifests::Publisher;
use super::service::CoordinatorService;
use super::telemetry::RpcMetrics;
use super::tls::{self, ServerTls};
use super::wire::Payloads;
use crate::error::{Error, Result};
use crate::raft::node::{self, NodeConfig, PublisherFactory};
use crate::raft::{Outbox, PeerService, PeerTls, ReplicaConfig};
use crate::state::{Plan, RunStatus};
use crate::status::{self, StatusContext};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:8080";

/// How long `shutdown` waits for in-flight calls before cutting connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What one gRPC client may ask of the server (review A12). tonic sets no limit on streams per
/// connection or on a call's time unless told to; these bound what a buggy or hostile token holder can
/// tie up. Every request of the protocol is well under a kilobyte but a registration, which is capped
/// at 16 KiB of resources in `wire`.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Largest request message decoded; larger ones are refused with `OutOfRange` before any handler.
    pub max_message_bytes: usize,
    /// HTTP/2 streams (calls in flight) one connection may hold open; a worker has at most three
    /// (heartbeat, a task call, a gang call).
    pub max_concurrent_streams: u32,
    /// Calls one connection may have in service at once; more wait.
    pub concurrency_per_connection: usize,
    /// A call not answered in this long ends with `Cancelled` (clients retry): no handler waits
    /// forever on a wedged driver. Workers' own per-call timeout is 30 s too.
    pub request_timeout: Duration,
    /// HTTP/2 pings on idle connections, so a worker that vanished without a FIN is noticed.
    pub keepalive_interval: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 128,
            concurrency_per_connection: 64,
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
        }
    }
}

/// A replicated coordinator: this replica's Raft id and its peers (issue 14).
#[derive(Clone)]
pub struct RaftOptions {
    pub id: u64,
    /// Raft id → host:port of its peer port, this replica's own included.
    pub peers: BTreeMap<u64, String>,
    /// Where this replica's peer port listens.
    pub listen: SocketAddr,
    /// Raft id → the gRPC URL workers reach that replica at: the leader hint a follower answers with.
    pub grpc_urls: BTreeMap<u64, String>,
    /// mTLS between replicas; None only when every peer address is a loopback address (tests).
    pub tls: Option<PeerTls>,
    /// Raft's tick and tuning (tests shorten them).
    pub tick: Duration,
    pub replica: ReplicaConfig,
}

impl RaftOptions {
    pub fn new(id: u64, peers: BTreeMap<u64, String>, listen: SocketAddr) -> Self {
        Self {
            id,
            peers,
            listen,
            grpc_urls: BTreeMap::new(),
            tls: None,
            tick: Duration::from_millis(100),
            replica: ReplicaConfig::new(id),
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |message: String| Err(Error::Config { field: "raft_peers", message });
        if !self.peers.contains_key(&self.id) {
            return bad(format!("does not name this replica's id {}", self.id));
        }
        if self.peers.len().is_multiple_of(2) {
            return bad(format!(
                "names {} replicas: use an odd number (3 or 5), so a majority survives a split",
                self.peers.len()
            ));
        }
        if self.tls.is_none() {
            let loopback = |address: &String| {
                let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
                host == "localhost"
                    || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            };
            if !self.peers.values().all(loopback) || !self.listen.ip().is_loopback() {
                return Err(Error::Config {
                    field: "raft_tls_cert",
                    message: "replicas must authenticate each other (mTLS): give --raft-tls-cert, --raft-tls-key and \
                              --raft-tls-ca (plaintext is allowed only when every replica is on loopback)"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct CoordinatorConfig {
    /// The run; workers receive it (as JSON) when they register. Its `run.store` is what they write to,
    /// and where the coordinator publishes each finished stage's manifest.
    pub run: RunConfig,
    /// Derived from `run` by `new`; tests shorten its timeouts.
    pub plan: Plan,
    /// gRPC listener for workers.
    pub listen: SocketAddr,
    /// HTTP listener for `/status`, `/metrics`, `/`, and the probes `/livez` and `/readyz`.
    pub status_listen: SocketAddr,
    /// Where the command log lives; a restart on the same folder resumes the run. None: in memory only
    /// (nothing survives a restart; for benchmarks and throwaway runs).
    pub state_dir: Option<PathBuf>,
    /// The cluster token (one, or two while rotating). None: no authentication, and both listeners must
    /// be loopback addresses.
    pub token: Option<ClusterToken>,
    /// The read-only status token (one, or two while rotating): with `status_requires_token` it opens
    /// `/status`, `/metrics` and `/`, and nothing on gRPC, so a scraper or dashboard holding it cannot act
    /// as a worker.
    pub status_token: Option<ClusterToken>,
    /// Require a token on the status endpoint's `/status`, `/metrics` and `/` (the probes `/livez` and
    /// `/readyz` stay open: kubelets send none): the status token, or the cluster token. Off by default:
    /// the endpoint is read-only and carries no secrets, and browsers and most scrapers cannot easily send
    /// a bearer token; keep it on the cluster network, or turn this on (Prometheus: `bearer_token_file`).
    /// Needs `status_token` or `token`.
    pub status_requires_token: bool,
    /// TLS on both listeners with this certificate; with a client CA, gRPC callers need a certificate it
    /// issued (mTLS). None: plaintext (the default; loopback demos and tests).
    pub tls: Option<ServerTls>,
    pub limits: ServerLimits,
    /// Refuse worker calls that carry no session nonce (`iro-session`, from RegisterWorker). On by default;
    /// off only for protocol tests and clients that predate sessions, which can then share a lease with
    /// another process under their worker id (review A6).
    pub require_sessions: bool,
    pub clock: Arc<dyn Clock>,
    pub driver: DriverOptions,
    /// Publish `manifest.json` for each finished rollout and eval stage to `run.store`, and lease no task
    /// of the next stage before it is written. On by default; off only where workers write no real
    /// objects (protocol tests, benchmarks), since a manifest names the objects the next phase reads.
    pub write_manifests: bool,
    /// Start from an empty state folder even when `run.store` already holds this run's manifests, writing
    /// over the outputs they name (`--force-fresh-state`). Off: such a start is refused, since the run was
    /// started before and its state folder is what resumes it.
    pub force_fresh_state: bool,
    /// Run as one replica of a Raft group (needs `state_dir`); None: a single coordinator.
    pub raft: Option<RaftOptions>,
}

impl fmt::Debug for CoordinatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorConfig")
            .field("run_id", &self.run.run.id)
            .field("plan", &self.plan)
            .field("listen", &self.listen)
            .field("status_listen", &self.status_listen)
            .field("state_dir", &self.state_dir)
            .field("token", &self.token)
            .field("status_token", &self.status_token)
            .field("status_requires_token", &self.status_requires_token)
            .field("tls", &self.tls)
            .field("limits", &self.limits)
            .field("require_sessions", &self.require_sessions)
            .field("write_manifests", &self.write_manifests)
            .field("force_fresh_state", &self.force_fresh_state)
            .field("raft_id", &self.raft.as_ref().map(|r| r.id))
            .finish_non_exhaustive()
    }
}

impl CoordinatorConfig {
    /// Loopback defaults, no state folder, no token, the system clock.
    pub fn new(run: RunConfig) -> Result<Self> {
        let plan = Plan::from_config(&run)?;
        let parse = |a: &str| a.parse().map_err(|e| Error::Config { field: "listen", message: format!("{a}: {e}") });
        Ok(Self {
            run,
            plan,
            listen: parse(DEFAULT_LISTEN)?,
            status_listen: parse(DEFAULT_STATUS_LISTEN)?,
            state_dir: None,
            token: None,
            status_token: None,
            status_requires_token: false,
            tls: None,
            limits: ServerLimits::default(),
            require_sessions: true,
            clock: Arc::new(SystemClock::new()),
            driver: DriverOptions::default(),
            write_manifests: true,
            force_fresh_state: false,
            raft: None,
        })
    }

    fn check(&self) -> Result<()> {
        if self.token.is_none() {
            for (field, addr) in [("listen", self.listen), ("status_listen", self.status_listen)] {
                if !addr.ip().is_loopback() {
                    return Err(Error::Config {
                        field,
                        message: format!(
                            "refusing to listen on {addr} without a cluster token: set --token-file or \
                             {}, or listen on a loopback address (127.0.0.1)",
                            auth::TOKEN_ENV
                        ),
                    });
                }
            }
        }
        if let Some(raft) = &self.raft {
            raft.check()?;
            if self.state_dir.is_none() {
                return Err(Error::Config {
                    field: "state_dir",
                    message: "a Raft replica needs a state folder".into(),
                });
            }
        }
        if self.status_requires_token && self.token.is_none() && self.status_token.is_none() {
            return Err(Error::Config {
                field: "status_requires_token",
                message: "needs a status token (--status-token-file) or a cluster token".into(),
            });
        }
        if let Some(status) = &self.status_token {
            if !self.status_requires_token {
                // A status token that opens nothing would give a false sense of a closed endpoint.
                return Err(Error::Config {
                    field: "status_token",
                    message: "is set but the status endpoint is open: add --status-requires-token to close it".into(),
                });
            }
            if self.token.as_ref().is_some_and(|cluster| cluster.shares_a_token_with(status)) {
                return Err(Error::Config {
                    field: "status_token",
                    message: "equals the cluster token: the read-only status token must be a different secret".into(),
                });
            }
        }
        Ok(())
    }
}

/// A running coordinator.
pub struct ServerHandle {
    tls: bool,
    grpc_addr: SocketAddr,
    status_addr: SocketAddr,
    handle: Handle,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    /// A replica's peer port: it stops after the driver, which as leader hands leadership over first
    /// and needs its peers' answers for that.
    peer_server: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    driver: JoinHandle<Result<()>>,
}

impl ServerHandle {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// `http://{grpc_addr}` (`https://` with TLS), what workers connect to.
    pub fn grpc_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc_addr)
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    pub fn status_addr(&self) -> SocketAddr {
        self.status_addr
    }

    pub fn status_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.status_addr)
    }

    /// The driver handle, for in-process callers (the embedded mode reads manifests through it).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Resolves once the run finished or failed.
    pub async fn run_over(&self) -> RunStatus {
        self.handle.run_over().await
    }

    /// Stops accepting calls, lets in-flight ones finish (for a few seconds at most), then stops the
    /// driver. Everything acknowledged is already in the log.
    pub async fn shutdown(self) {
        let _ = self.close().await;
    }

    /// `shutdown`, returning how the driver ended: the error when a command log write failed (the
    /// driver then ends on its own, and `run_over` resolves with the run still running), so the process
    /// can exit non-zero and its restart replay the log.
    pub async fn close(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for mut server in self.servers {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                server.abort();
            }
        }
        self.handle.stop().await;
        let ended = self
            .driver
            .await
            .map_err(|e| Error::Unavailable { message: format!("the coordinator driver panicked: {e}") })?;
        if let Some((stop, mut server)) = self.peer_server {
            let _ = stop.send(true);
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                server.abort();
            }
        }
        ended
    }
}

/// Resumes (or starts) the run and serves it: gRPC for workers on `listen`, HTTP status on
/// `status_listen`.
pub async fn serve(config: CoordinatorConfig) -> Result<ServerHandle> {
    config.check()?;
    if config.tls.is_some() {
        tls::install_crypto_provider();
    }
    let run_id = config.run.run.id.clone();
    let payloads = Payloads::new(&config.run)?;
    let run_config_json = serde_json::to_string(&config.run)
        .map_err(|e| Error::Config { field: "run", message: format!("cannot serialize the run config: {e}") })?;
    // Bind before starting the driver, so a taken port fails fast without touching the log's timers.
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| Error::Bind { addr: addr.to_string(), message: e.to_string() })
    };
    let grpc_listener = bind(config.listen).await?;
    let status_listener = bind(config.status_listen).await?;
    let local = |l: &TcpListener, addr: SocketAddr| {
        l.local_addr().map_err(|e| Error::Bind { addr: addr.to_string(), message: e.to_string() })
    };
    let grpc_addr = local(&grpc_listener, config.listen)?;
    let status_addr = local(&status_listener, config.status_listen)?;

    let (shutdown, _) = watch::channel(false);
    let mut peer_server = None;
    let (handle, driver) = match &config.raft {
        None => start_single(&config, &run_id).await?,
        Some(raft) => {
            let (stop, _) = watch::channel(false);
            let (handle, driver, server) = start_replica(&config, raft, &run_id, &stop).await?;
            peer_server = Some((stop, server));
            (handle, driver)
        }
    };
    let metrics = Arc::new(RpcMetrics::default());

    let layout = if config.write_manifests {
        let layout = RunLayout::new(&run_id).map_err(|e| Error::Config { field: "run.id", message: e.to_string() })?;
        Some(layout)
    } else {
        None
    };
    let service = CoordinatorService::new(handle.clone(), &run_id, run_config_json, payloads, metrics.clone(), layout)
        .require_sessions(config.require_sessions)
        .leader_urls(config.raft.as_ref().map(|r| r.grpc_urls.clone()).unwrap_or_default());
    let limits = config.limits.clone();
    let grpc = CoordinatorServer::new(service).max_decoding_message_size(limits.max_message_bytes);
    let grpc = tonic::service::interceptor::InterceptedService::new(
        grpc,
        auth::interceptor(config.token.clone(), metrics.clone()),
    );
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder()
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .http2_keepalive_interval(Some(limits.keepalive_interval));
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.grpc())
            .map_err(|e| Error::Config { field: "tls_cert", message: format!("cannot serve gRPC over TLS: {e}") })?;
    }
    let mut stop = shutdown.subscribe();
    let grpc_task = tokio::spawn(async move {
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = builder.add_service(grpc).serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });

    // Closed: the status tokens and the cluster tokens open it (an operator holding the cluster token
    // need not hold a second secret); open: nothing is asked.
    let status_tokens = if config.status_requires_token {
        Some(config.status_token.iter().chain(config.token.iter()).cloned().collect())
    } else {
        None
    };
    let context = StatusContext { handle: handle.clone(), rpc: metrics, run_id: run_id.clone(), tokens: status_tokens };
    let mut stop = shutdown.subscribe();
    let router = status::router(context);
    let status_task = match &config.tls {
        None => tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(status_listener, router).with_graceful_shutdown(signal).await {
                tracing::error!("status server stopped: {e}");
            }
        }),
        Some(tls) => {
            let listener = tls.http_listener(status_listener)?;
            tokio::spawn(async move {
                let signal = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(signal).await {
                    tracing::error!("status server stopped: {e}");
                }
            })
        }
    };

    tracing::info!(
        run = %run_id,
        grpc = %grpc_addr,
        status = %status_addr,
        auth = config.token.is_some(),
        tls = config.tls.is_some(),
        mtls = config.tls.as_ref().is_some_and(ServerTls::mtls),
        status_closed = config.status_requires_token,
        state_dir = ?config.state_dir,
        "coordinator listening"
    );
    Ok(ServerHandle {
        tls: config.tls.is_some(),
        grpc_addr,
        status_addr,
        handle,
        shutdown,
        servers: vec![grpc_task, status_task],
        peer_server,
        driver,
    })
}

/// The single-process driver over the command log in `state_dir` (or in memory).
async fn start_single(config: &CoordinatorConfig, run_id: &str) -> Result<(Handle, JoinHandle<Result<()>>)> {
    let log: Box<dyn CommandLog> = match &config.state_dir {
        Some(dir) => {
            let config_sha256 = log::config_sha256(&config.run)?;
            Box::new(open_log(dir.clone(), run_id.to_owned(), config.plan.clone(), config_sha256).await?)
        }
        None => Box::new(MemoryLog::new()),
    };
    let publisher = if config.write_manifests {
        Some(Publisher::start(open_store(config)?, run_id)?.force_fresh_start(config.force_fresh_state))
    } else {
        None
    };
    actor::start(config.plan.clone(), log, config.clock.clone(), config.driver.clone(), publisher).await
}

fn open_store(config: &CoordinatorConfig) -> Result<Store> {
    Store::open(&config.run.run.store)
        .map_err(|e| Error::Config { field: "run.store", message: format!("cannot open the object store: {e}") })
}

/// One Raft replica: its peer port (mTLS), the senders to its peers, and the replicated driver over
/// `state_dir/raft`. The manifest writer runs on whichever replica leads.
async fn start_replica(
    config: &CoordinatorConfig,
    raft: &RaftOptions,
    run_id: &str,
    shutdown: &watch::Sender<bool>,
) -> Result<(Handle, JoinHandle<Result<()>>, JoinHandle<()>)> {
    let state_dir = config.state_dir.clone().ok_or(Error::Config { field: "state_dir", message: "needed".into() })?;
    let listener = TcpListener::bind(raft.listen)
        .await
        .map_err(|e| Error::Bind { addr: raft.listen.to_string(), message: e.to_string() })?;
    if raft.tls.is_some() {
        tls::install_crypto_provider();
    }
    let (inbox_tx, inbox) = mpsc::channel(crate::raft::transport::INBOX);
    let peers: Vec<u64> = raft.peers.keys().copied().collect();
    let service = PeerService::new(raft.id, peers.clone(), inbox_tx).server();
    let mut builder = tonic::transport::Server::builder().http2_keepalive_interval(Some(Duration::from_secs(10)));
    if let Some(peer_tls) = &raft.tls {
        builder = builder.tls_config(peer_tls.server.grpc()).map_err(|e| Error::Config {
            field: "raft_tls_cert",
            message: format!("cannot serve the peer port over TLS: {e}"),
        })?;
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut stop = shutdown.subscribe();
    let server = tokio::spawn(async move {
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = builder.add_service(service).serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!("raft peer server stopped: {e}");
        }
    });
    let (feedback_tx, feedback) = mpsc::unbounded_channel();
    let outbox = Outbox::start(raft.id, &raft.peers, raft.tls.as_ref(), feedback_tx)?;
    let make_publisher: Option<PublisherFactory> = if config.write_manifests {
        let store = open_store(config)?;
        let run_id = run_id.to_owned();
        Some(Box::new(move || Publisher::start(store.clone(), &run_id)))
    } else {
        None
    };
    let mut node = NodeConfig::new(raft.id, state_dir.join("raft"), peers);
    node.replica = raft.replica.clone();
    node.tick = raft.tick;
    tracing::info!(raft_id = raft.id, peers = ?raft.peers, listen = %raft.listen, mtls = raft.tls.is_some(), "starting a coordinator replica");
    let (handle, driver) =
        node::start(config.plan.clone(), node, config.clock.clone(), make_publisher, outbox, inbox, feedback).await?;
    Ok((handle, driver, server))
}

async fn open_log(dir: PathBuf, run_id: String, plan: Plan, config_sha256: String) -> Result<FileLog> {
    tokio::task::spawn_blocking(move || FileLog::open(&dir, &run_id, &plan, &config_sha256))
        .await
        .map_err(|e| Error::Unavailable { message: format!("opening the command log panicked: {e}") })?
}
