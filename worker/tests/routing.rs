//! The worker's side of a replicated coordinator (issue 14): a follower answers every call `Unavailable`,
//! naming the leader in `iro-leader` metadata, and the worker's `Coordinator` goes there; a listed replica
//! that does not answer is passed over for the next. The leader is a real coordinator on loopback; the
//! followers are a few lines of tonic below.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iro_common::RunConfig;
use iro_coordinator::driver::routing::LEADER_HEADER;
use iro_coordinator::driver::{ClusterToken, CoordinatorConfig, ServerHandle, serve};
use iro_proto as pb;
use iro_proto::coordinator_server::CoordinatorServer;
use iro_worker::runtime::client::{CallContext, Coordinator};
use iro_worker::runtime::{CancellationToken, Timeouts};
use pb::lease_task_response::Outcome;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

const TOKEN: &str = "routing-test-token-0123456789";

fn timeouts() -> Timeouts {
    Timeouts { connect: Duration::from_secs(2), request: Duration::from_secs(5), reconnect: Duration::from_secs(5) }
}

/// A real coordinator, the leader: 1 iteration of 2 rollout shards.
struct Leader {
    server: ServerHandle,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn leader() -> Leader {
    let (store, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut run = RunConfig::default();
    run.run.id = "routing".into();
    run.run.iterations = 1;
    run.run.store = store.path().display().to_string();
    run.data.prompts_per_iteration = 4;
    run.data.test_prompts = 2;
    run.cluster.shard_size = 2;
    run.cluster.train_ranks = 1;
    let mut config = CoordinatorConfig::new(run).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.status_listen = "127.0.0.1:0".parse().unwrap();
    config.state_dir = Some(state.path().to_owned());
    config.token = Some(ClusterToken::new(TOKEN).unwrap());
    Leader { server: serve(config).await.unwrap(), _dirs: (store, state) }
}

/// A replica that is not the leader: every call is `Unavailable`, with `iro-leader: {leader}` when it
/// knows one.
#[derive(Clone, Default)]
struct Follower {
    leader: Arc<Mutex<Option<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Follower {
    fn refuse<T>(&self) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut metadata = MetadataMap::new();
        if let Some(leader) = self.leader.lock().unwrap().as_deref() {
            metadata.insert(LEADER_HEADER, leader.parse().unwrap());
        }
        Err(Status::with_metadata(Code::Unavailable, "not the leader", metadata))
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Serves on an ephemeral loopback port until the test ends; returns its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let service = CoordinatorServer::new(self.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        url
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Follower {
    async fn register_worker(
        &self,
        _: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        self.refuse()
    }
    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.refuse()
    }
    async fn lease_task(&self, _: Request<pb::LeaseTaskRequest>) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        self.refuse()
    }
    async fn complete_task(
        &self,
        _: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        self.refuse()
    }
    async fn fail_task(&self, _: Request<pb::FailTaskRequest>) -> Result<Response<pb::FailTaskResponse>, Status> {
        self.refuse()
    }
    async fn join_gang(&self, _: Request<pb::JoinGangRequest>) -> Result<Response<pb::JoinGangResponse>, Status> {
        self.refuse()
    }
    async fn abort_gang(&self, _: Request<pb::AbortGangRequest>) -> Result<Response<pb::AbortGangResponse>, Status> {
        self.refuse()
    }
}

fn connect(urls: &str) -> Coordinator {
    Coordinator::new(urls, Some(&ClusterToken::new(TOKEN).unwrap()), None, timeouts()).unwrap()
}

/// A port nothing listens on.
fn closed_port() -> String {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    format!("http://{addr}")
}

const fn context(call: &'static str) -> CallContext<'static> {
    CallContext { call, worker_id: "", task_id: "", attempt: 0 }
}

async fn register(coordinator: &Coordinator, name: &str) -> pb::RegisterWorkerResponse {
    let request = pb::RegisterWorkerRequest {
        name: name.into(),
        resources: Some(pb::WorkerResources { device: "cpu".into(), memory_bytes: 1 << 30, cached_models: vec![] }),
        worker_id: String::new(),
    };
    let call = coordinator.call(context("RegisterWorker"), coordinator.retry(None), |mut client| {
        let request = request.clone();
        async move { client.register_worker(request).await }
    });
    tokio::time::timeout(Duration::from_secs(10), call).await.expect("RegisterWorker hung").unwrap()
}

async fn lease(coordinator: &Coordinator, worker_id: &str) -> pb::LeaseTaskResponse {
    let request = pb::LeaseTaskRequest { worker_id: worker_id.into() };
    let call = coordinator.call(context("LeaseTask"), coordinator.retry(None), |mut client| {
        let request = request.clone();
        async move { client.lease_task(request).await }
    });
    tokio::time::timeout(Duration::from_secs(10), call).await.expect("LeaseTask hung").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_only_a_follower_registers_and_leases_through_the_leader() {
    let leader = leader().await;
    let leader_url = leader.server.grpc_url();
    let follower = Follower::default();
    *follower.leader.lock().unwrap() = Some(leader_url.clone());
    let follower_url = follower.start().await;

    let coordinator = connect(&follower_url);
    assert_eq!(coordinator.url(), follower_url);
    let registered = register(&coordinator, "pod-a").await;
    assert_eq!(registered.run_id, "routing");
    assert_eq!(coordinator.url(), leader_url, "calls go to the leader now");
    assert_eq!(follower.calls(), 1, "one try at the follower, then straight to the leader");

    // The session's clone shares the route: its first call goes straight to the leader.
    let session = coordinator.in_session(&registered.session);
    assert_eq!(session.url(), leader_url);
    let leased = lease(&session, &registered.worker_id).await;
    let Some(Outcome::Task(task)) = leased.outcome else { panic!("no task leased: {leased:?}") };
    assert_eq!(task.attempt, 1);
    assert_eq!(follower.calls(), 1, "nothing more went to the follower");
    let snapshot = leader.server.handle().snapshot().await.unwrap();
    assert_eq!(snapshot.workers.len(), 1, "registered at the leader");
    assert_eq!(snapshot.overall.leased, 1, "leased at the leader");

    // A heartbeat (`once`, no retry) that lands on the follower fails, but moves the next one to the leader.
    let beat = connect(&follower_url).in_session(&registered.session);
    let heartbeat = || pb::HeartbeatRequest {
        worker_id: registered.worker_id.clone(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        progress_done: 1,
        progress_total: 2,
    };
    let request = heartbeat();
    let error = beat.once("Heartbeat", |mut client| async move { client.heartbeat(request).await }).await.unwrap_err();
    assert!(error.to_string().contains(&format!("Heartbeat refused by {follower_url}: Unavailable")), "{error}");
    assert_eq!(beat.url(), leader_url);
    let request = heartbeat();
    let reply = beat.once("Heartbeat", |mut client| async move { client.heartbeat(request).await }).await.unwrap();
    assert!(reply.keep_working);
    assert_eq!(follower.calls(), 2);
    leader.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_replica_that_does_not_answer_is_passed_over_for_the_next() {
    let leader = leader().await;
    let leader_url = leader.server.grpc_url();
    let down = closed_port();
    let coordinator = connect(&format!("{down}, {leader_url}"));
    assert_eq!(coordinator.url(), down);
    let registered = register(&coordinator, "pod-a").await;
    assert_eq!(coordinator.url(), leader_url);
    let leased = lease(&coordinator.in_session(&registered.session), &registered.worker_id).await;
    assert!(matches!(leased.outcome, Some(Outcome::Task(_))), "{leased:?}");

    // A follower without a leader (an election) is no better than a closed port: the list goes on from it,
    // past the closed port, around to the leader.
    let electing = Follower::default();
    let electing_url = electing.start().await;
    let coordinator = connect(&format!("{electing_url},{down},{leader_url}"));
    let again = register(&coordinator, "pod-b").await;
    assert_eq!(coordinator.url(), leader_url);
    assert_eq!(electing.calls(), 1);
    assert_ne!(again.worker_id, registered.worker_id);
    leader.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_name_each_other_cannot_make_a_worker_spin() {
    let (a, b) = (Follower::default(), Follower::default());
    let (a_url, b_url) = (a.start().await, b.start().await);
    *a.leader.lock().unwrap() = Some(b_url.clone());
    *b.leader.lock().unwrap() = Some(a_url.clone());
    let coordinator = connect(&a_url);
    let request = pb::LeaseTaskRequest { worker_id: "w".into() };
    let retry =
        iro_worker::runtime::client::Retry { deadline: Some(Instant::now() + Duration::from_secs(1)), cancel: None };
    let started = Instant::now();
    let error = coordinator
        .call(context("LeaseTask"), retry, |mut client| {
            let request = request.clone();
            async move { client.lease_task(request).await }
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    assert!(error.contains("LeaseTask to http://127.0.0.1:") && error.contains("gave up after"), "{error}");
    // Backoffs of 100, 200, 400 ms (jittered by up to half) fit in the second, each with one immediate hop
    // before it: a worker that hopped without waiting would have made thousands of calls.
    let calls = a.calls() + b.calls();
    assert!((3..=24).contains(&calls), "{calls} calls");

    // Shutdown stops it too, during a backoff.
    let cancel = CancellationToken::new();
    let retry = iro_worker::runtime::client::Retry { deadline: None, cancel: Some(&cancel) };
    let call = coordinator.call(context("LeaseTask"), retry, |mut client| {
        let request = request.clone();
        async move { client.lease_task(request).await }
    });
    let stop = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(call, stop);
    assert!(matches!(result, Err(iro_worker::Error::Cancelled(_))), "{result:?}");
}

#[tokio::test]
async fn a_bad_list_is_refused_naming_the_entry() {
    let error = Coordinator::new("http://127.0.0.1:1,coord-1:50051", None, None, timeouts()).err().unwrap().to_string();
    assert!(error.contains("`coord-1:50051`"), "{error}");
    let error = Coordinator::new("http://127.0.0.1:1,https://127.0.0.1:2", None, None, timeouts()).err().unwrap();
    assert!(error.to_string().contains("--tls-ca"), "every listed URL is checked: {error}");
}
