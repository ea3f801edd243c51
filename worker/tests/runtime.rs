//! The worker task loop against a real coordinator on loopback, with a `TaskRunner` test double that
//! writes small JSONL shards to a temporary folder store. Plans use short intervals so that lease
//! expiry and worker death happen within a test's few seconds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iro_common::RunConfig;
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{ShardAttempt, read_accepted, read_manifest, write_shard};
use iro_common::store::{Store, sha256_hex};
use iro_coordinator::driver::{ClusterToken, CoordinatorConfig, ServerHandle, serve};
use iro_coordinator::state::{LossCause, Plan, TaskId};
use iro_worker::runtime::{
    CancellationToken, TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner, Timeouts, WorkerExit, WorkerOptions,
    run_embedded, run_worker,
};
use iro_worker::{Error, Result};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const TOKEN: &str = "runtime-test-token-0123456789";
const RUN_ID: &str = "rt";
/// Generous bound on a whole small run; they take well under a second when nothing goes wrong.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// 2 iterations of 3 rollout shards (6 prompts by 2), a train gang of one rank, 2 eval shards (4 prompts by 2).
fn run_config(store: &Path) -> RunConfig {
    let mut config = RunConfig::default();
    config.run.id = RUN_ID.into();
    config.run.iterations = 2;
    config.run.store = store.display().to_string();
    config.data.prompts_per_iteration = 6;
    config.data.test_prompts = 4;
    config.cluster.shard_size = 2;
    config.cluster.train_ranks = 1;
    config
}

/// Short heartbeats and retries; `lease_ms` and `worker_timeout_ms` decide how soon a silent worker's
/// lease comes back.
fn fast_plan(plan: Plan, lease_ms: u64, worker_timeout_ms: u64) -> Plan {
    Plan {
        heartbeat_interval_ms: 50,
        retry_after_ms: 20,
        lease_ms,
        worker_timeout_ms,
        gang_join_timeout_ms: 5_000,
        max_attempts: 3,
        ..plan
    }
}

struct Cluster {
    server: ServerHandle,
    store: Store,
    layout: RunLayout,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start(lease_ms: u64, worker_timeout_ms: u64) -> Cluster {
    start_on("127.0.0.1:0".parse().unwrap(), lease_ms, worker_timeout_ms).await
}

async fn start_on(listen: std::net::SocketAddr, lease_ms: u64, worker_timeout_ms: u64) -> Cluster {
    start_with(listen, lease_ms, worker_timeout_ms, |_| {}).await
}

async fn start_with(
    listen: std::net::SocketAddr,
    lease_ms: u64,
    worker_timeout_ms: u64,
    tweak: impl FnOnce(&mut CoordinatorConfig),
) -> Cluster {
    let (store_dir, state_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = CoordinatorConfig::new(run_config(store_dir.path())).unwrap();
    config.plan = fast_plan(config.plan, lease_ms, worker_timeout_ms);
    config.listen = listen;
    config.status_listen = "127.0.0.1:0".parse().unwrap();
    config.state_dir = Some(state_dir.path().to_owned());
    config.token = Some(ClusterToken::new(TOKEN).unwrap());
    tweak(&mut config);
    let server = serve(config).await.unwrap();
    let store = Store::open(&store_dir.path().display().to_string()).unwrap();
    Cluster { server, store, layout: RunLayout::new(RUN_ID).unwrap(), _dirs: (store_dir, state_dir) }
}

fn options(cluster: &Cluster, name: &str, token: &str) -> WorkerOptions {
    let mut options = WorkerOptions::new(cluster.server.grpc_url(), name, "cpu");
    options.token = Some(ClusterToken::new(token).unwrap());
    options.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
        reconnect: Duration::from_secs(5),
    };
    options.shutdown_grace = Duration::from_secs(2);
    options
}

/// Lets a test hold the first task a double runs: the double announces it, then waits until released
/// (it then gives up without writing) or cancelled.
#[derive(Default)]
struct Hold {
    started: Mutex<Option<mpsc::UnboundedSender<TaskRef>>>,
    release: AtomicBool,
}

impl Hold {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<TaskRef>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { started: Mutex::new(Some(tx)), release: AtomicBool::new(false) }), rx)
    }

    /// Blocks the first caller only.
    fn block(&self, task: &TaskRef, control: &TaskControl) -> Result<()> {
        let Some(started) = self.started.lock().unwrap().take() else { return Ok(()) };
        started.send(task.clone()).unwrap();
        loop {
            control.check("held by the test")?;
            if self.release.load(Ordering::SeqCst) {
                return Err(Error::InvalidRequest("released by the test".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The test double: rollout and eval shards hold one JSON line per prompt; training writes a small
/// object in the value folder. Phases that read a manifest check it is there and complete, recording
/// any violation of that ordering.
struct Double {
    store: Store,
    layout: RunLayout,
    config: RunConfig,
    rt: tokio::runtime::Handle,
    hold: Option<Arc<Hold>>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Double {
    fn factory(
        hold: Option<Arc<Hold>>,
        violations: Arc<Mutex<Vec<String>>>,
    ) -> impl FnOnce(&RunConfig) -> Result<Box<dyn TaskRunner>> + Send + 'static {
        move |config: &RunConfig| {
            let runner: Box<dyn TaskRunner> = Box::new(Double {
                store: Store::open(&config.run.store)?,
                layout: RunLayout::new(&config.run.id)?,
                config: config.clone(),
                rt: tokio::runtime::Handle::current(),
                hold,
                violations,
            });
            Ok(runner)
        }
    }

    fn expect_manifest(&self, task: &TaskRef, iteration: u32, phase: ShardedPhase) {
        let read = self.rt.block_on(read_manifest(&self.store, &self.layout, iteration, phase));
        match read {
            Ok(manifest) if manifest.is_complete() => {}
            Ok(manifest) => {
                self.violation(format!("{}: manifest {phase} {iteration} lacks {:?}", task.task_id, manifest.missing()))
            }
            Err(e) => self.violation(format!("{}: ran before its input's manifest existed: {e}", task.task_id)),
        }
    }

    fn violation(&self, message: String) {
        self.violations.lock().unwrap().push(message);
    }
}

impl TaskRunner for Double {
    fn run(&mut self, task: &TaskRef, control: &TaskControl) -> Result<TaskOutput> {
        if let Some(hold) = &self.hold {
            hold.block(task, control)?;
        }
        let (phase, prompts) = match task.phase {
            TaskPhase::Train => {
                self.expect_manifest(task, task.iteration, ShardedPhase::Rollout);
                let bytes = format!("weights of {} attempt {}", task.task_id, task.attempt).into_bytes();
                let files = vec![("model.safetensors".to_owned(), bytes)];
                let (key, sha256) = self.rt.block_on(iro_common::values::write_value_folder(
                    &self.store,
                    &self.layout,
                    task.iteration,
                    task.attempt,
                    files,
                ))?;
                return Ok(TaskOutput { key, sha256, records: 1, tokens: 0 });
            }
            TaskPhase::Rollout => {
                if task.iteration > 1 {
                    self.expect_manifest(task, task.iteration - 1, ShardedPhase::Eval);
                }
                (ShardedPhase::Rollout, self.config.data.prompts_per_iteration)
            }
            TaskPhase::Eval => (ShardedPhase::Eval, self.config.data.test_prompts),
        };
        let size = self.config.cluster.shard_size;
        let first = task.shard as usize * size;
        let rows: Vec<Value> = (first..(first + size).min(prompts))
            .map(|prompt| json!({ "iteration": task.iteration, "phase": phase.to_string(), "prompt": prompt }))
            .collect();
        control.set_progress(rows.len() as u64, rows.len() as u64);
        let at = ShardAttempt { iteration: task.iteration, phase, shard: task.shard, attempt: task.attempt };
        let entry = self.rt.block_on(write_shard(&self.store, &self.layout, at, &rows, 10 * rows.len() as u64))?;
        Ok(TaskOutput { key: entry.key, sha256: entry.sha256, records: entry.records, tokens: entry.tokens })
    }
}

/// Every manifest of the run is complete, lists each shard exactly once, and its accepted shards hold
/// every prompt exactly once. Returns each manifest's accepted attempt per shard.
async fn check_outputs(store: &Store, layout: &RunLayout, iterations: u32) -> BTreeMap<(u32, String, u32), u32> {
    let mut attempts = BTreeMap::new();
    for iteration in 1..=iterations {
        for (phase, prompts) in [(ShardedPhase::Rollout, 6), (ShardedPhase::Eval, 4)] {
            let manifest = read_manifest(store, layout, iteration, phase).await.unwrap();
            assert_eq!(manifest.shard_count, prompts / 2, "iteration {iteration} {phase}");
            assert!(manifest.is_complete(), "iteration {iteration} {phase}: missing {:?}", manifest.missing());
            let shards: Vec<u32> = manifest.shards.iter().map(|e| e.shard).collect();
            assert_eq!(shards, (0..prompts / 2).collect::<Vec<_>>(), "each shard exactly once");
            let rows: Vec<Value> = read_accepted(store, &manifest).await.unwrap();
            let mut seen: Vec<u64> = rows.iter().map(|r| r["prompt"].as_u64().unwrap()).collect();
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..u64::from(prompts)).collect::<Vec<_>>(),
                "iteration {iteration} {phase}: every prompt once"
            );
            for entry in &manifest.shards {
                attempts.insert((iteration, phase.to_string(), entry.shard), entry.attempt);
            }
        }
        // V_t is found only through its value manifest, which names the attempt whose files.json it checked.
        let value = iro_common::values::read_value_manifest(store, layout, iteration).await.unwrap();
        let value = value.unwrap_or_else(|| panic!("iteration {iteration}: no value manifest"));
        let files = iro_common::values::read_value_files(store, &value).await.unwrap();
        let weights = store.get(&format!("{}/model.safetensors", value.model_key())).await.unwrap();
        assert_eq!(files.files[0].sha256, sha256_hex(&weights), "iteration {iteration}: the accepted weights");
        attempts.insert((iteration, "train".to_owned(), 0), value.attempt);
    }
    attempts
}

async fn wait_started(started: &mut mpsc::UnboundedReceiver<TaskRef>) -> TaskRef {
    tokio::time::timeout(Duration::from_secs(10), started.recv()).await.expect("the held task never started").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_complete_a_run_and_every_stage_gets_its_manifest() {
    let cluster = start(10_000, 5_000).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let workers: Vec<_> = ["pod-a", "pod-b"]
        .into_iter()
        .map(|name| {
            let factory = Double::factory(None, violations.clone());
            tokio::spawn(run_worker(options(&cluster, name, TOKEN), factory, shutdown.clone()))
        })
        .collect();
    for worker in workers {
        let exit = tokio::time::timeout(RUN_TIMEOUT, worker).await.expect("the run did not finish").unwrap();
        assert_eq!(exit.unwrap(), WorkerExit::RunFinished);
    }

    let attempts = check_outputs(&cluster.store, &cluster.layout, 2).await;
    assert!(attempts.values().all(|a| *a == 1), "nothing failed, so every shard's first attempt: {attempts:?}");
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new(), "a phase started before its input's manifest");
    let snapshot = cluster.server.handle().snapshot().await.unwrap();
    assert_eq!(snapshot.overall.done, 2 * (3 + 1 + 2));
    assert!(snapshot.recent_errors.is_empty(), "{:?}", snapshot.recent_errors);
    assert_eq!(snapshot.workers.len(), 2, "one registration each");
    cluster.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_waits_for_a_coordinator_that_is_down_longer_than_its_reconnect_timeout() {
    // A port nobody listens on yet: the coordinator is "being rescheduled".
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut options = WorkerOptions::new(format!("http://{addr}"), "pod-a", "cpu");
    options.token = Some(ClusterToken::new(TOKEN).unwrap());
    options.timeouts = Timeouts {
        connect: Duration::from_millis(200),
        request: Duration::from_secs(5),
        reconnect: Duration::from_secs(1),
    };
    let violations = Arc::new(Mutex::new(Vec::new()));
    let worker = tokio::spawn(run_worker(options, Double::factory(None, violations), CancellationToken::new()));
    // Three reconnect timeouts pass; before review A15 the worker had given up and exited by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!worker.is_finished(), "the idle worker gave up on the coordinator");
    let cluster = start_on(addr, 10_000, 5_000).await;
    let exit = tokio::time::timeout(RUN_TIMEOUT, worker).await.expect("the run did not finish").unwrap();
    assert_eq!(exit.unwrap(), WorkerExit::RunFinished);
    check_outputs(&cluster.store, &cluster.layout, 2).await;
    cluster.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_held_by_a_dropped_worker_is_redone_by_another_after_its_lease_is_lost() {
    let cluster = start(600, 300).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (hold, mut started) = Hold::new();
    let a = tokio::spawn(run_worker(
        options(&cluster, "pod-a", TOKEN),
        Double::factory(Some(hold.clone()), violations.clone()),
        CancellationToken::new(),
    ));
    let held = wait_started(&mut started).await;
    // The loop dies mid-task (as a killed process would): no more heartbeats, no report.
    a.abort();
    assert!(a.await.unwrap_err().is_cancelled());

    let b = run_worker(
        options(&cluster, "pod-b", TOKEN),
        Double::factory(None, violations.clone()),
        CancellationToken::new(),
    );
    let exit = tokio::time::timeout(RUN_TIMEOUT, b).await.expect("the run did not finish").unwrap();
    assert_eq!(exit, WorkerExit::RunFinished);
    hold.release.store(true, Ordering::SeqCst);

    let attempts = check_outputs(&cluster.store, &cluster.layout, 2).await;
    let phase = held.phase.to_string();
    assert_eq!(attempts[&(held.iteration, phase.clone(), held.shard)], 2, "the held shard was redone as attempt 2");
    let shard = match held.phase {
        TaskPhase::Eval => ShardedPhase::Eval,
        _ => ShardedPhase::Rollout,
    };
    let dropped = cluster.layout.shard(held.iteration, shard, held.shard, held.attempt);
    assert!(!cluster.store.exists(&dropped).await.unwrap(), "the dropped attempt wrote nothing");
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());
    let snapshot = cluster.server.handle().snapshot().await.unwrap();
    let task: TaskId = held.task_id.parse().unwrap();
    let lost: Vec<LossCause> = snapshot.recent_errors.iter().filter(|e| e.task == task).map(|e| e.cause).collect();
    assert!(
        matches!(lost.as_slice(), [LossCause::WorkerDead | LossCause::LeaseExpired]),
        "the held lease was taken back once, for silence: {lost:?}"
    );
    cluster.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_task_releases_the_lease_at_once() {
    // Leases and worker timeouts far longer than the test: only a release can free the task in time.
    let cluster = start(60_000, 30_000).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (hold, mut started) = Hold::new();
    let shutdown = CancellationToken::new();
    let a = tokio::spawn(run_worker(
        options(&cluster, "pod-a", TOKEN),
        Double::factory(Some(hold), violations.clone()),
        shutdown.clone(),
    ));
    let held = wait_started(&mut started).await;
    shutdown.cancel();
    let exit = tokio::time::timeout(Duration::from_secs(5), a).await.expect("the worker did not exit").unwrap();
    assert_eq!(exit.unwrap(), WorkerExit::Shutdown);

    let snapshot = cluster.server.handle().snapshot().await.unwrap();
    assert_eq!(
        (snapshot.overall.leased, snapshot.phase_counts.pending),
        (0, 3),
        "the lease is back before its deadline"
    );
    assert!(snapshot.recent_errors.is_empty(), "a release is no failure: {:?}", snapshot.recent_errors);
    let released = cluster.server.handle().read(|v| v.telemetry.losses.get("released").copied()).await.unwrap();
    assert_eq!(released, Some(1), "given back with FailTask released=true");

    let b = run_worker(
        options(&cluster, "pod-b", TOKEN),
        Double::factory(None, violations.clone()),
        CancellationToken::new(),
    );
    let exit = tokio::time::timeout(RUN_TIMEOUT, b).await.expect("the run did not finish").unwrap();
    assert_eq!(exit, WorkerExit::RunFinished);
    let attempts = check_outputs(&cluster.store, &cluster.layout, 2).await;
    assert_eq!(attempts[&(held.iteration, held.phase.to_string(), held.shard)], 2);
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());
    cluster.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_with_a_clear_error() {
    let cluster = start(10_000, 5_000).await;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let worker = run_worker(
        options(&cluster, "pod-x", "not-the-cluster-token-42"),
        Double::factory(None, violations),
        CancellationToken::new(),
    );
    let result = tokio::time::timeout(Duration::from_secs(5), worker).await.expect("a refusal is not retried");
    let message = match result {
        Err(Error::Coordinator(message)) => message,
        other => panic!("expected a coordinator refusal, got {other:?}"),
    };
    assert!(message.contains("RegisterWorker refused"), "{message}");
    assert!(message.contains("wrong cluster token"), "{message}");
    assert!(message.contains("IRO_CLUSTER_TOKEN"), "names where the token comes from: {message}");
    assert!(!message.contains(TOKEN), "never shows a token");
    assert!(cluster.server.handle().snapshot().await.unwrap().workers.is_empty(), "nothing was registered");
    cluster.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_mode_runs_to_the_end_and_a_second_start_resumes_the_finished_run() {
    let (store_dir, state_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = run_config(store_dir.path());
    // The plan comes from the config here, so waits at phase barriers last a second: keep it to one iteration.
    config.run.iterations = 1;
    config.cluster.heartbeat_interval_s = 1;
    let violations = Arc::new(Mutex::new(Vec::new()));
    let factory: iro_worker::runtime::SharedRunnerFactory = {
        let violations = violations.clone();
        Arc::new(move |config: &RunConfig| Double::factory(None, violations.clone())(config))
    };
    // The CLI draws its bars from these reports: they come while the run goes on, stages in plan order.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let progress: iro_worker::runtime::ProgressFn = {
        let seen = seen.clone();
        Box::new(move |r| seen.lock().unwrap().push((r.iteration, r.phase.clone(), r.phase_tasks)))
    };
    let run = iro_worker::runtime::run_embedded_with_progress(
        config.clone(),
        2,
        state_dir.path(),
        factory.clone(),
        CancellationToken::new(),
        Some(progress),
    );
    tokio::time::timeout(Duration::from_secs(30), run).await.expect("the embedded run did not finish").unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no status report reached the progress callback");
    let order = |phase: &Option<String>| ["rollout", "train", "eval"].iter().position(|p| phase.as_deref() == Some(*p));
    let stages: Vec<_> = seen.iter().filter_map(|(t, phase, _)| Some((t.as_ref()?, order(phase)?))).collect();
    assert!(stages.windows(2).all(|w| w[0] <= w[1]), "stages went backwards: {seen:?}");
    assert!(seen.iter().all(|(_, _, c)| c.done <= c.total()), "{seen:?}");
    let store = Store::open(&store_dir.path().display().to_string()).unwrap();
    check_outputs(&store, &RunLayout::new(RUN_ID).unwrap(), 1).await;
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());

    // The state folder remembers the run: starting it again finds it finished and redoes nothing.
    let manifest_key = RunLayout::new(RUN_ID).unwrap().manifest(1, ShardedPhase::Rollout);
    let before = store.get(&manifest_key).await.unwrap();
    let again = run_embedded(config, 1, state_dir.path(), factory, CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(10), again).await.expect("the resumed run did not end").unwrap();
    assert_eq!(store.get(&manifest_key).await.unwrap(), before, "the rewritten manifest is the same");
}

/// A CA made at test time (rcgen), the coordinator's certificate for 127.0.0.1 under it, and a worker's
/// client certificate: TLS for the coordinator with mTLS required, and TLS for a worker that trusts it.
fn mtls_pair() -> (iro_coordinator::driver::ServerTls, iro_coordinator::driver::ClientTls) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |san: &str, usage| {
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    };
    let (server_cert, server_key) = leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
    let client = leaf("pod-a", ExtendedKeyUsagePurpose::ClientAuth);
    let ca_pem = ca.pem().into_bytes();
    let server = iro_coordinator::driver::ServerTls::from_pem(server_cert, server_key, Some(ca_pem.clone())).unwrap();
    let client = iro_coordinator::driver::ClientTls::from_pem(ca_pem, Some(client)).unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_finishes_a_run_over_mtls() {
    let (server_tls, client_tls) = mtls_pair();
    let cluster =
        start_with("127.0.0.1:0".parse().unwrap(), 10_000, 5_000, |config| config.tls = Some(server_tls)).await;
    assert!(cluster.server.grpc_url().starts_with("https://"));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();

    let mut worker = options(&cluster, "pod-a", TOKEN);
    worker.tls = Some(client_tls);
    let factory = Double::factory(None, violations.clone());
    let run = tokio::spawn(run_worker(worker, factory, shutdown.clone()));
    let exit = tokio::time::timeout(RUN_TIMEOUT, run).await.expect("the run did not finish over mTLS").unwrap();
    assert_eq!(exit.unwrap(), WorkerExit::RunFinished);
    let attempts = check_outputs(&cluster.store, &cluster.layout, 2).await;
    assert!(attempts.values().all(|a| *a == 1), "{attempts:?}");
    cluster.server.shutdown().await;
}

#[tokio::test]
async fn a_worker_refuses_an_https_url_without_a_ca_and_tls_settings_with_an_http_url() {
    let (_, client_tls) = mtls_pair();
    let mut https = WorkerOptions::new("https://127.0.0.1:1", "pod-a", "cpu");
    https.shutdown_grace = Duration::from_millis(10);
    let factory = Double::factory(None, Arc::default());
    let error = run_worker(https, factory, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(error.contains("--tls-ca"), "{error}");
    let mut plain = WorkerOptions::new("http://127.0.0.1:1", "pod-a", "cpu");
    plain.tls = Some(client_tls);
    let factory = Double::factory(None, Arc::default());
    let error = run_worker(plain, factory, CancellationToken::new()).await.unwrap_err().to_string();
    assert!(error.contains("not https://"), "{error}");
}
