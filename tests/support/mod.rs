//! A cluster of real `iro` processes on loopback for the process-level tests: a run config on the tiny
//! fixtures, a coordinator and workers as child processes (their logs in files), a minimal `/status`
//! client, and readers of the object store. Every child is killed when the `Cluster` is dropped, on every
//! path; a failing test prints the tail of each child's log.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use iro_common::RunConfig;
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{EvalRecord, Manifest, RolloutRecord, read_accepted, read_manifest};
use iro_common::store::Store;
use iro_coordinator::status::StatusReport;

#[path = "../../worker/tests/support/tiny_run.rs"]
mod tiny_run;

pub const RUN_ID: &str = "cluster";

/// The tiny fixtures end to end (worker/tests/support/tiny_run.rs), every baseline, slowed down enough (longer
/// responses, a wider search) that a shard task of a debug build runs for seconds, so a worker can be
/// killed while it holds the lease. 12 TL;DR posts: 4 held out, 4 per iteration; 2 prompts per shard.
pub fn run_config(store: &Path, iterations: u32) -> RunConfig {
    let mut c = tiny_run::tiny_run(RUN_ID, &store.display().to_string(), iterations);
    c.sampling.max_new_tokens = 48;
    c.search.beams = 3;
    c.search.successors = 3;
    c.search.chunk_length = 4;
    c.cluster.shard_size = 2;
    c.cluster.heartbeat_interval_s = 1;
    c.cluster.lease_timeout_s = 5;
    c.cluster.max_attempts = 3;
    c.validate(Path::new("cluster test config")).unwrap();
    c
}

/// Two ports nobody listens on right now, distinct from each other and from every pair handed out before in
/// this test process (clusters start in parallel threads). Bound together, then released: another program
/// can still take one in between, which `start_coordinator` detects and answers with a fresh pair.
pub fn free_ports() -> (u16, u16) {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (pa, pb) = (a.local_addr().unwrap().port(), b.local_addr().unwrap().port());
        if !given.contains(&pa) && !given.contains(&pb) {
            given.extend([pa, pb]);
            return (pa, pb);
        }
    }
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Set once reaped.
    exit: Option<ExitStatus>,
}

/// One run's folder (config, token, store, coordinator state, worker scratch, logs) and its processes.
pub struct Cluster {
    pub tag: &'static str,
    pub dir: tempfile::TempDir,
    pub config: RunConfig,
    pub config_path: PathBuf,
    pub store_path: PathBuf,
    pub state_dir: PathBuf,
    pub token_path: PathBuf,
    pub grpc: SocketAddr,
    pub status: SocketAddr,
    pub started: Instant,
    procs: Vec<Proc>,
    /// Incarnation counter per name, so a restarted process gets a fresh log file.
    starts: BTreeMap<String, u32>,
    /// With `start_replicas`: three coordinator replicas (`coordinator-1..3`) instead of one.
    pub replicas: Vec<ReplicaAddrs>,
}

/// The ports of one coordinator replica.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaAddrs {
    pub id: u64,
    pub grpc: SocketAddr,
    pub status: SocketAddr,
    pub peer: SocketAddr,
}

impl Cluster {
    /// `tag` prefixes this cluster's progress lines (tests run in parallel).
    pub fn new(tag: &'static str, iterations: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("store");
        let config = run_config(&store_path, iterations);
        let config_path = dir.path().join("run.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "cluster-test-token-0123456789abcdef\n").unwrap();
        let (grpc, status) = free_ports();
        let (grpc, status) = (SocketAddr::from(([127, 0, 0, 1], grpc)), SocketAddr::from(([127, 0, 0, 1], status)));
        Self {
            tag,
            state_dir: dir.path().join("state"),
            dir,
            config,
            config_path,
            store_path,
            token_path,
            grpc,
            status,
            started: Instant::now(),
            procs: Vec::new(),
            starts: BTreeMap::new(),
            replicas: Vec::new(),
        }
    }

    /// Seconds since the cluster was set up, for the timing lines.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// `[tag   12.3s]`, the prefix of a progress line.
    pub fn stamp(&self) -> String {
        format!("[{} {:6.1}s]", self.tag, self.t())
    }

    fn spawn(&mut self, name: &str, args: &[&str]) {
        self.launch(name, env!("CARGO_BIN_EXE_iro"), args, "");
    }

    /// Starts `program` as the process `name`, its output in a fresh log file; `via` says how in the
    /// progress line (empty for the iro binary itself).
    fn launch(&mut self, name: &str, program: &str, args: &[&str], via: &str) {
        let n = self.starts.entry(name.to_owned()).or_insert(0);
        *n += 1;
        let log = self.dir.path().join(format!("{name}.{n}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            // 2 shared cores and several processes: one libtorch thread each keeps them from thrashing.
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            // An error's message, not a captured backtrace, should end the log that a failing test prints.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .env_remove("IRO_CLUSTER_TOKEN")
            .env_remove("IRO_WORKER_ID")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}{via}: {e}"));
        eprintln!("{} started {name}{via} (pid {})", self.stamp(), child.id());
        self.procs.push(Proc { name: name.to_owned(), child, log, exit: None });
    }

    /// `iro coordinator --linger`, as Kubernetes runs it: after the run is over and the report written it
    /// keeps answering (workers learn the run finished) until SIGTERM.
    /// Waits until it answers on its status port. Before any worker has started, a coordinator that exits
    /// because a port was taken meanwhile (by a program outside this test) is started again on fresh ports.
    pub fn start_coordinator(&mut self) {
        for _ in 0..3 {
            self.spawn_coordinator();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect(self.status).is_ok() {
                    return;
                }
                if let Some(exit) = self.exited("coordinator") {
                    let log = std::fs::read_to_string(&self.procs.last().unwrap().log).unwrap_or_default();
                    // Workers know the old address: only a cluster without them yet can move.
                    let no_workers = self.procs.iter().all(|p| p.name == "coordinator");
                    if log.contains("in use") && no_workers {
                        let (grpc, status) = free_ports();
                        eprintln!(
                            "{} coordinator ({exit}): a port was taken; again on {grpc} and {status}",
                            self.stamp()
                        );
                        self.grpc.set_port(grpc);
                        self.status.set_port(status);
                        break;
                    }
                    panic!("the coordinator exited at start ({exit}):\n{log}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if TcpStream::connect(self.status).is_ok() {
                return;
            }
        }
        panic!("the coordinator did not start serving on {} / {}", self.grpc, self.status);
    }

    fn spawn_coordinator(&mut self) {
        let (config, state, token) = (self.config_path.clone(), self.state_dir.clone(), self.token_path.clone());
        let (grpc, status) = (self.grpc.to_string(), self.status.to_string());
        self.spawn(
            "coordinator",
            &[
                "coordinator",
                "--linger",
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--listen",
                &grpc,
                "--status-listen",
                &status,
                "--token-file",
                token.to_str().unwrap(),
            ],
        );
    }

    /// Three `iro coordinator` replicas of one Raft group on loopback (plaintext peer links, allowed only
    /// there), each with its own state folder; waits until each answers on its status port.
    pub fn start_replicas(&mut self) {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        for id in 1..=3u64 {
            let (grpc, status) = free_ports();
            let (peer, _) = free_ports();
            self.replicas.push(ReplicaAddrs {
                id,
                grpc: loopback(grpc),
                status: loopback(status),
                peer: loopback(peer),
            });
        }
        for id in 1..=3 {
            self.start_replica(id);
        }
    }

    /// Starts (or restarts, on its state folder) replica `id`, as `coordinator-{id}`.
    pub fn start_replica(&mut self, id: u64) {
        let me = self.replicas[id as usize - 1];
        let peers: Vec<String> = self.replicas.iter().map(|r| format!("{}={}", r.id, r.peer)).collect();
        let urls: Vec<String> = self.replicas.iter().map(|r| format!("{}=http://{}", r.id, r.grpc)).collect();
        let (config, token) = (self.config_path.clone(), self.token_path.clone());
        let state = self.state_dir.join(format!("replica-{id}"));
        let (grpc, status, peer) = (me.grpc.to_string(), me.status.to_string(), me.peer.to_string());
        let (id_arg, peers, urls) = (id.to_string(), peers.join(","), urls.join(","));
        self.spawn(
            &format!("coordinator-{id}"),
            &[
                "coordinator",
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--listen",
                &grpc,
                "--status-listen",
                &status,
                "--token-file",
                token.to_str().unwrap(),
                "--raft-id",
                &id_arg,
                "--raft-peers",
                &peers,
                "--raft-listen",
                &peer,
                "--raft-peer-urls",
                &urls,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(me.status).is_err() {
            if let Some(exit) = self.exited(&format!("coordinator-{id}")) {
                panic!("replica {id} exited at start ({exit}):\n{}", self.log(&format!("coordinator-{id}")));
            }
            assert!(Instant::now() < deadline, "replica {id} did not start serving on {}", me.status);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each live replica's /status, by id.
    pub fn replica_statuses(&self) -> BTreeMap<u64, StatusReport> {
        let mut out = BTreeMap::new();
        for r in &self.replicas {
            if let Ok(body) = http_get(r.status, "/status")
                && let Ok(report) = serde_json::from_str::<StatusReport>(&body)
            {
                out.insert(r.id, report);
            }
        }
        out
    }

    /// The id of the replica that reports itself leader, if one does.
    pub fn leader(&self) -> Option<u64> {
        self.replica_statuses()
            .into_iter()
            .find(|(_, s)| s.raft.as_ref().is_some_and(|r| r.role == "leader"))
            .map(|(id, _)| id)
    }

    pub fn start_worker(&mut self, name: &str) {
        let url = if self.replicas.is_empty() {
            format!("http://{}", self.grpc)
        } else {
            self.replicas.iter().map(|r| format!("http://{}", r.grpc)).collect::<Vec<_>>().join(",")
        };
        let work = self.dir.path().join(format!("work-{name}"));
        let token = self.token_path.clone();
        self.spawn(
            name,
            &[
                "worker",
                "--coordinator",
                &url,
                "--device",
                "cpu",
                "--name",
                name,
                "--work-dir",
                work.to_str().unwrap(),
                "--token-file",
                token.to_str().unwrap(),
            ],
        );
    }

    /// The live (not yet reaped) process named `name`.
    fn live(&mut self, name: &str) -> &mut Proc {
        self.procs.iter_mut().rfind(|p| p.name == name && p.exit.is_none()).unwrap_or_else(|| panic!("no live {name}"))
    }

    /// SIGKILL (`Child::kill` on unix) and reap.
    pub fn kill(&mut self, name: &str) {
        let t = self.stamp();
        let p = self.live(name);
        p.child.kill().unwrap();
        p.exit = Some(p.child.wait().unwrap());
        eprintln!("{t} SIGKILLed {name}");
    }

    /// SIGTERM (what Kubernetes sends to stop a pod), through kill(1): std has no other signal than SIGKILL.
    pub fn terminate(&mut self, name: &str) {
        let t = self.stamp();
        let pid = self.live(name).child.id();
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}: {status}");
        eprintln!("{t} SIGTERM to {name}");
    }

    /// Sends `signal` (e.g. STOP, CONT) to `name` through kill(1).
    pub fn signal(&mut self, name: &str, signal: &str) {
        let t = self.stamp();
        let pid = self.live(name).child.id();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}: {status}");
        eprintln!("{t} SIG{signal} to {name}");
    }

    /// Waits up to `timeout` for `name` to exit on its own; None if it is still running.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let p = self.live(name);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                p.exit = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `name` has exited (reaping it if so).
    pub fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        if let Some(p) = self.procs.iter_mut().rfind(|p| p.name == name) {
            if p.exit.is_none() {
                p.exit = p.child.try_wait().unwrap();
            }
            return p.exit;
        }
        None
    }

    /// The last lines of every child's log, oldest process first.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!("----- {} ({}) exit {:?} -----\n", p.name, p.log.display(), p.exit));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The full logs of every process named `name` (a restarted one has several), oldest first.
    pub fn log(&self, name: &str) -> String {
        self.procs
            .iter()
            .filter(|p| p.name == name)
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// GET /status (of the leader, with replicas); None while the coordinator is not answering.
    pub fn status(&self) -> Option<StatusReport> {
        if !self.replicas.is_empty() {
            let mut statuses = self.replica_statuses();
            let leader = statuses.iter().find(|(_, s)| s.raft.as_ref().is_some_and(|r| r.role == "leader"));
            let id = leader.map(|(id, _)| *id)?;
            return statuses.remove(&id);
        }
        let body = http_get(self.status, "/status").ok()?;
        Some(serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not a StatusReport: {e}\n{body}")))
    }

    pub fn store(&self) -> Store {
        Store::open(self.store_path.to_str().unwrap()).unwrap()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.store_path.join("runs").join(RUN_ID)
    }

    /// Every shard object of the run (`iter-{t}/{phase}/shard-*.attempt-*.jsonl`), as parsed keys.
    pub fn shard_objects(&self) -> Vec<ShardObject> {
        let mut out = Vec::new();
        for t in 1..=self.config.run.iterations {
            for phase in ["rollout", "eval"] {
                let dir = self.run_dir().join(format!("iter-{t}/{phase}"));
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for e in entries {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    if let Some(o) = ShardObject::parse(t, phase, &name) {
                        out.push(o);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if p.exit.is_none() {
                let _ = p.child.kill();
                p.exit = p.child.wait().ok();
            }
        }
        if std::thread::panicking() {
            eprintln!("===== {}: logs of the cluster's processes (last lines) =====\n{}", self.tag, self.log_tails(40));
        }
    }
}

/// One shard object in the store, from its file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShardObject {
    pub iteration: u32,
    pub phase: String,
    pub shard: u32,
    pub attempt: u32,
    pub key: String,
}

impl ShardObject {
    fn parse(iteration: u32, phase: &str, file: &str) -> Option<Self> {
        let rest = file.strip_prefix("shard-")?.strip_suffix(".jsonl")?;
        let (shard, attempt) = rest.split_once(".attempt-")?;
        Some(Self {
            iteration,
            phase: phase.to_owned(),
            shard: shard.parse().ok()?,
            attempt: attempt.parse().ok()?,
            key: format!("runs/{RUN_ID}/iter-{iteration}/{phase}/{file}"),
        })
    }

    /// The task id the coordinator shows for this shard.
    pub fn task(&self) -> String {
        format!("iter-{}/{}/{}", self.iteration, self.phase, self.shard)
    }
}

/// A minimal HTTP/1.0 GET (the server closes the connection after the response); the body on 200.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {} bytes", bytes.len())))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("GET {path}: {}", head.lines().next().unwrap_or_default())));
    }
    Ok(body.to_owned())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

pub fn manifest(store: &Store, t: u32, phase: ShardedPhase) -> Manifest {
    let layout = RunLayout::new(RUN_ID).unwrap();
    block_on(read_manifest(store, &layout, t, phase)).unwrap_or_else(|e| panic!("iteration {t} {phase} manifest: {e}"))
}

pub fn rollouts(store: &Store, m: &Manifest) -> Vec<RolloutRecord> {
    block_on(read_accepted(store, m)).unwrap()
}

pub fn evals(store: &Store, m: &Manifest) -> Vec<EvalRecord> {
    block_on(read_accepted(store, m)).unwrap()
}

/// What every finished run must satisfy, read only through the manifests: each is complete; each
/// iteration's accepted rollouts hold every prompt of its slice (4 distinct, disjoint across
/// iterations, candidates 0..n of each prompt once); each iteration's accepted eval rows hold every
/// test prompt exactly once per method; the report exists. Returns the manifests by (t, phase).
pub fn check_finished_run(cluster: &Cluster) -> BTreeMap<(u32, &'static str), Manifest> {
    let store = cluster.store();
    let config = &cluster.config;
    let mut manifests = BTreeMap::new();
    let mut seen_rollout_ids = std::collections::BTreeSet::new();
    let mut test_ids: Option<Vec<String>> = None;
    for t in 1..=config.run.iterations {
        // Rollouts.
        let m = manifest(&store, t, ShardedPhase::Rollout);
        assert!(m.is_complete(), "iteration {t} rollout manifest incomplete: missing {:?}", m.missing());
        assert_eq!(m.shard_count, 2, "4 prompts in shards of 2");
        let rows = rollouts(&store, &m);
        let mut by_prompt: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for r in &rows {
            assert_eq!(r.iteration, t);
            by_prompt.entry(r.prompt_id.clone()).or_default().push(r.candidate);
        }
        assert_eq!(by_prompt.len(), config.data.prompts_per_iteration, "iteration {t} rollout prompts: {by_prompt:?}");
        let per_prompt = if t == 1 { 1 } else { (config.search.beams * config.search.successors) as u32 };
        for (id, cands) in &mut by_prompt {
            cands.sort_unstable();
            assert_eq!(*cands, (0..per_prompt).collect::<Vec<_>>(), "iteration {t} prompt {id}: candidates");
            assert!(seen_rollout_ids.insert(id.clone()), "prompt {id} rolled out in two iterations");
        }
        manifests.insert((t, "rollout"), m);

        // Evaluation.
        let m = manifest(&store, t, ShardedPhase::Eval);
        assert!(m.is_complete(), "iteration {t} eval manifest incomplete: missing {:?}", m.missing());
        assert_eq!(m.shard_count, 2, "4 test prompts in shards of 2");
        let rows = evals(&store, &m);
        let methods: Vec<&str> =
            if t == 1 { vec!["iro", "base", "best_of_n", "args", "weak_to_strong"] } else { vec!["iro"] };
        let mut ids: Vec<String> = rows.iter().map(|e| e.prompt_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), config.data.test_prompts, "iteration {t} eval prompts");
        let test_ids = test_ids.get_or_insert_with(|| ids.clone());
        assert_eq!(&ids, test_ids, "the same held-out prompts every iteration");
        for method in &methods {
            let mut got: Vec<&str> =
                rows.iter().filter(|e| e.method == *method).map(|e| e.prompt_id.as_str()).collect();
            got.sort_unstable();
            assert_eq!(got, test_ids.iter().map(String::as_str).collect::<Vec<_>>(), "iteration {t} method {method}");
        }
        assert_eq!(rows.len(), methods.len() * test_ids.len(), "iteration {t}: no eval row twice or extra");
        assert!(rows.iter().all(|e| e.iteration == t && e.reward.is_some()));
        manifests.insert((t, "eval"), m);
    }
    let test_ids = test_ids.unwrap();
    assert!(test_ids.iter().all(|id| !seen_rollout_ids.contains(id)), "a held-out prompt was rolled out");
    let summary = cluster.run_dir().join("report/summary.json");
    let text = std::fs::read_to_string(&summary).unwrap_or_else(|e| panic!("{}: {e}", summary.display()));
    serde_json::from_str::<serde_json::Value>(&text).unwrap();
    assert!(cluster.run_dir().join("report/summary.md").exists());
    manifests
}

/// The manifest entry (attempt, key) of each accepted shard, by task id.
pub fn accepted(manifests: &BTreeMap<(u32, &'static str), Manifest>) -> BTreeMap<String, (u32, String)> {
    let mut out = BTreeMap::new();
    for ((t, phase), m) in manifests {
        for e in &m.shards {
            out.insert(format!("iter-{t}/{phase}/{}", e.shard), (e.attempt, e.key.clone()));
        }
    }
    out
}

/// The one-line view of a status report for the progress lines.
pub fn brief(s: &StatusReport) -> String {
    let workers: Vec<String> = s
        .workers
        .iter()
        .map(|w| {
            let task = w.current_task.as_deref().unwrap_or("-");
            let attempt = w.attempt.map(|a| format!("#{a}")).unwrap_or_default();
            format!("{}{}:{task}{attempt}", w.name, if w.alive { "" } else { "(dead)" })
        })
        .collect();
    format!(
        "{} iter {:?} {:?} done {}/{} [{}]",
        s.status,
        s.iteration,
        s.phase,
        s.overall_tasks.done,
        s.overall_tasks.total(),
        workers.join(" ")
    )
}

// ----- Helpers of the fault tests (tests/cluster_faults.rs) -----

/// The fault tests' clusters, one at a time: each runs a coordinator and two or three workers, which share
/// two cores badly with another cluster. Held for the whole test.
pub fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Cluster {
    /// Changes the run config (before the coordinator starts) and rewrites its file, validated.
    pub fn edit_config(&mut self, edit: impl FnOnce(&mut RunConfig)) {
        edit(&mut self.config);
        self.config.validate(Path::new("cluster test config")).unwrap();
        std::fs::write(&self.config_path, toml::to_string(&self.config).unwrap()).unwrap();
    }

    /// A worker started as `start_worker` starts one, but through `wrapper` (a program and its leading
    /// arguments, which must end by running the rest of its command line, e.g. `unshare --mount sh -c ...`).
    pub fn start_worker_through(&mut self, name: &str, wrapper: &[&str]) {
        let url = format!("http://{}", self.grpc);
        let work = self.dir.path().join(format!("work-{name}"));
        let (work, token) = (work.to_str().unwrap().to_owned(), self.token_path.to_str().unwrap().to_owned());
        let iro = env!("CARGO_BIN_EXE_iro");
        let mut args: Vec<&str> = wrapper[1..].to_vec();
        args.extend([iro, "worker", "--coordinator", &url, "--device", "cpu", "--name", name]);
        args.extend(["--work-dir", &work, "--token-file", &token]);
        self.spawn_program(name, wrapper[0], &args);
    }

    /// `spawn` for any program: the same environment and log file handling.
    fn spawn_program(&mut self, name: &str, program: &str, args: &[&str]) {
        self.launch(name, program, args, &format!(" through {program}"));
    }

    /// Polls /status until `f` returns Some, panicking after `limit` or when the coordinator exits first;
    /// prints each new one-line view of the run.
    pub fn poll_status<T>(&mut self, limit: Duration, what: &str, mut f: impl FnMut(&StatusReport) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            if let Some(s) = self.status() {
                let line = brief(&s);
                if line != last {
                    eprintln!("{} {line}", self.stamp());
                    last = line;
                }
                if let Some(found) = f(&s) {
                    return found;
                }
            }
            if let Some(exit) = self.exited("coordinator") {
                panic!("the coordinator exited ({exit}) while waiting for {what}");
            }
            assert!(Instant::now() < deadline, "no {what} within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to `limit`) for the run to be over and returns the last status: it must have finished.
    /// Then every worker in `workers` must exit on its own with success, the coordinator must write the
    /// report, and a SIGTERM must stop the lingering coordinator with success.
    pub fn finish(&mut self, limit: Duration, workers: &[&str]) -> StatusReport {
        let end = self.poll_status(limit, "the end of the run", |s| (s.status != "running").then(|| s.clone()));
        assert_eq!(end.status, "finished", "the run failed: {:?}", end.failure);
        for name in workers {
            let exit = self.wait_exit(name, Duration::from_secs(30)).unwrap_or_else(|| panic!("{name} did not exit"));
            assert!(exit.success(), "{name} failed: {exit}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log("coordinator").contains("report written") {
            assert!(self.exited("coordinator").is_none(), "the coordinator exited before writing the report");
            assert!(Instant::now() < deadline, "no report 60 s after the run finished");
            std::thread::sleep(Duration::from_millis(100));
        }
        self.terminate("coordinator");
        let exit = self.wait_exit("coordinator", Duration::from_secs(20)).expect("the coordinator ignored SIGTERM");
        assert!(exit.success(), "the coordinator failed: {exit}");
        eprintln!("{} the run finished, its workers and the coordinator exited", self.stamp());
        end
    }
}

/// A tmpfs of `size` (mount(8) syntax, e.g. `256k`) mounted on a fresh folder, unmounted when dropped (drop
/// it after every process that writes there is gone). Needs the right to mount (root here).
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path.to_str().unwrap()])
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount(8): {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed ({}): {} (this test needs the right to mount a tmpfs)",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Self { path, _dir: dir }
    }

    /// Fills the file system with `file` (writes until ENOSPC); returns the bytes written.
    pub fn fill(&self, file: &Path) -> u64 {
        let mut f = File::create(file).unwrap();
        let block = vec![0xa5u8; 4096];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", file.display()),
            }
        }
        let _ = f.sync_all();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.path.to_str().unwrap();
        let done = Command::new("umount").arg(path).status().is_ok_and(|s| s.success());
        if !done {
            // Still busy (a process the test could not stop): detach it so the folder can go.
            let _ = Command::new("umount").args(["-l", path]).status();
        }
    }
}
