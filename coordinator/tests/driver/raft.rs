//! Three coordinator replicas over real sockets (issue 14): the peer transport with mTLS, a follower
//! routing workers to the leader, a run that goes on when the leader stops, and every replica applying
//! the same run.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use iro_coordinator::driver::{CoordinatorConfig, RaftOptions, ServerHandle, serve};
use iro_coordinator::raft::PeerTls;
use iro_coordinator::state::{Plan, RunStatus};
use iro_coordinator::status::StatusReport;
use iro_coordinator::status::client::fetch_status;
use iro_proto as pb;
use tonic::Code;

use crate::pki::Pki;
use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Cluster {
    grpc_ports: BTreeMap<u64, u16>,
    peers: BTreeMap<u64, String>,
    tls: Option<(String, String, String)>,
}

impl Cluster {
    fn new(tls: Option<&Pki>) -> Self {
        let grpc_ports = (1..=3).map(|id| (id, free_port())).collect();
        let peers = (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let tls = tls.map(|pki| {
            let leaf = pki.peer();
            (leaf.cert, leaf.key, pki.ca_pem())
        });
        Self { grpc_ports, peers, tls }
    }

    fn url(&self, id: u64) -> String {
        format!("http://127.0.0.1:{}", self.grpc_ports[&id])
    }

    fn config(&self, id: u64, dir: &Path) -> CoordinatorConfig {
        let mut config = CoordinatorConfig::new(run_config()).unwrap();
        config.plan = Plan { lease_ms: LEASE_MS, worker_timeout_ms: WORKER_TIMEOUT_MS, ..config.plan };
        config.listen = format!("127.0.0.1:{}", self.grpc_ports[&id]).parse().unwrap();
        config.status_listen = "127.0.0.1:0".parse().unwrap();
        config.state_dir = Some(dir.join(format!("replica-{id}")));
        config.token = Some(token());
        config.write_manifests = false;
        config.require_sessions = false;
        let listen = self.peers[&id].parse().unwrap();
        let mut raft = RaftOptions::new(id, self.peers.clone(), listen);
        raft.grpc_urls = (1..=3).map(|id| (id, self.url(id))).collect();
        raft.tls = self.tls.as_ref().map(|(cert, key, ca)| {
            PeerTls::from_pem(cert.clone().into_bytes(), key.clone().into_bytes(), ca.clone().into_bytes()).unwrap()
        });
        // Elections in 200-400 ms: the test waits for a few of them.
        raft.tick = Duration::from_millis(20);
        config.raft = Some(raft);
        config
    }

    async fn start(&self, id: u64, dir: &Path) -> ServerHandle {
        serve(self.config(id, dir)).await.unwrap()
    }
}

async fn raft_of(server: &ServerHandle) -> StatusReport {
    fetch_status(&server.status_url(), None).await.unwrap()
}

/// Waits until exactly one of `servers` leads and the others follow it; returns the leader's index.
async fn leader(servers: &[&ServerHandle]) -> usize {
    for _ in 0..500 {
        let mut reports = Vec::new();
        for server in servers {
            reports.push(raft_of(server).await.raft.expect("a replica reports its raft state"));
        }
        let leaders: Vec<usize> = (0..reports.len()).filter(|i| reports[*i].role == "leader").collect();
        if let [i] = leaders[..] {
            let id = reports[i].id;
            if reports.iter().all(|r| r.leader == Some(id)) {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no single leader emerged");
}

async fn client_at(url: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap().connect().await.unwrap();
    iro_proto::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        iro_coordinator::driver::Bearer::new(Some(&token())),
    )
}

async fn three_replicas_serve_one_run(pki: Option<&Pki>) {
    // RUST_LOG=info shows the elections and the hand-over.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(pki);
    let mut servers = vec![
        cluster.start(1, dir.path()).await,
        cluster.start(2, dir.path()).await,
        cluster.start(3, dir.path()).await,
    ];
    let first = leader(&servers.iter().collect::<Vec<_>>()).await;
    let leader_id = raft_of(&servers[first]).await.raft.unwrap().id;
    let follower = (first + 1) % 3;

    // A follower refuses, naming the leader's URL.
    let mut to_follower = client_at(&servers[follower].grpc_url()).await;
    let refused = to_follower.register_worker(register_request("pod-a")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let hint = refused.metadata().get("iro-leader").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(hint, Some(cluster.url(leader_id)), "{refused:?}");

    // The leader runs the first shard; every replica applies it.
    let mut client = client_at(&hint.unwrap()).await;
    let worker = register(&mut client, "pod-a").await;
    let task = take(&mut client, &worker).await;
    assert!(complete(&mut client, &worker, &task).await.accepted);
    for server in &servers {
        for _ in 0..200 {
            if raft_of(server).await.overall_tasks.done == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(raft_of(server).await.overall_tasks.done, 1, "every replica applied the completion");
    }

    // The leader stops (SIGTERM's path): it hands leadership over and the run goes on at the new leader.
    let stopped = servers.remove(first);
    stopped.shutdown().await;
    let second = leader(&servers.iter().collect::<Vec<_>>()).await;
    let report = raft_of(&servers[second]).await;
    let raft = report.raft.clone().unwrap();
    assert_ne!(raft.id, leader_id, "a new leader took over");
    assert_eq!(report.overall_tasks.done, 1, "the acknowledged completion survived the leader");
    let mut client = client_at(&cluster.url(raft.id)).await;
    loop {
        match lease(&mut client, &worker).await {
            pb::lease_task_response::Outcome::Task(task) => {
                if task.world > 0 {
                    let join = pb::JoinGangRequest {
                        worker_id: worker.clone(),
                        task_id: task.task_id.clone(),
                        attempt: task.attempt,
                        endpoint: "tcp://127.0.0.1:29500".into(),
                    };
                    client.join_gang(join).await.unwrap();
                }
                let done = complete(&mut client, &worker, &task).await;
                assert!(done.accepted, "{} attempt {}: {done:?}", task.task_id, task.attempt);
            }
            pb::lease_task_response::Outcome::RunFinished(true) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(servers[second].run_over().await, RunStatus::Finished);
    // The stopped replica comes back and catches up on what it missed.
    let restarted = cluster.start(leader_id, dir.path()).await;
    servers.push(restarted);
    for server in &servers {
        let mut report = raft_of(server).await;
        for _ in 0..300 {
            if report.status == "finished" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            report = raft_of(server).await;
        }
        assert_eq!((report.status.as_str(), report.overall_tasks.done), ("finished", 4), "{:?}", report.raft);
    }
    let applied: Vec<u64> = {
        let mut v = Vec::new();
        for server in &servers {
            v.push(raft_of(server).await.raft.unwrap().applied_index);
        }
        v
    };
    assert!(applied.iter().all(|a| *a == applied[0]), "replicas applied different logs: {applied:?}");
    for server in servers {
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_mtls_route_workers_and_survive_the_leader_stopping() {
    three_replicas_serve_one_run(Some(&Pki::new("iro-raft-test-ca"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_loopback_plaintext() {
    three_replicas_serve_one_run(None).await;
}

#[tokio::test]
async fn replicas_off_loopback_must_use_mtls_and_a_peer_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(None);
    let mut config = cluster.config(1, dir.path());
    let raft = config.raft.as_mut().unwrap();
    raft.peers.insert(2, "10.0.0.2:7100".into());
    let error = serve(config).await.err().expect("refused").to_string();
    assert!(error.contains("raft_tls_cert") && error.contains("mTLS"), "{error}");

    let mut config = cluster.config(1, dir.path());
    config.raft.as_mut().unwrap().peers.remove(&3);
    let error = serve(config).await.err().expect("refused").to_string();
    assert!(error.contains("odd number"), "{error}");

    // The peer port asks for a certificate of the cluster's CA: a caller without one fails the handshake.
    let pki = Pki::new("iro-raft-test-ca");
    let cluster = Cluster::new(Some(&pki));
    let server = cluster.start(1, dir.path()).await;
    let tls = pki.client_tls().grpc();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.peers[&1]))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let refused = match endpoint.connect().await {
        Err(e) => e.to_string(),
        Ok(channel) => {
            let mut peer = iro_proto::raft_peer_client::RaftPeerClient::new(channel);
            let batch = pb::RaftBatch { from: 2, to: 1, messages: vec![] };
            format!("{:?}", peer.deliver(batch).await.expect_err("a peer without a certificate is refused"))
        }
    };
    assert!(!refused.is_empty());
    server.shutdown().await;
}

/// A TCP proxy on one directed peer link (replica i dialing replica j), which the test can cut: while cut
/// it drops every connection and refuses new ones.
struct Link {
    addr: String,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Link {
    async fn start(to: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let watch = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if *watch.borrow() {
                    continue; // dropped: the dialer sees the connection close
                }
                let mut stop = watch.subscribe();
                let to = to.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Three replicas on loopback whose every directed peer link goes through a `Link`, by (from, to);
/// `tweak` adjusts each replica's Raft options before it starts.
async fn linked_replicas(
    dir: &Path,
    tweak: impl Fn(u64, &mut RaftOptions),
) -> (BTreeMap<(u64, u64), Link>, Vec<ServerHandle>) {
    let cluster = Cluster::new(None);
    let mut links = BTreeMap::new();
    for i in 1..=3u64 {
        for j in (1..=3u64).filter(|j| *j != i) {
            links.insert((i, j), Link::start(cluster.peers[&j].clone()).await);
        }
    }
    let mut servers = Vec::new();
    for id in 1..=3u64 {
        let mut config = cluster.config(id, dir);
        let raft = config.raft.as_mut().unwrap();
        // Replica `id` reaches each peer through its own link to it.
        for j in (1..=3u64).filter(|j| *j != id) {
            raft.peers.insert(j, links[&(id, j)].addr.clone());
        }
        tweak(id, raft);
        servers.push(serve(config).await.unwrap());
    }
    (links, servers)
}

/// The leader cut off from both peers while workers still reach it: with check_quorum it steps down
/// within an election timeout, and the other two elect a leader that has every acknowledged completion;
/// the old leader refuses workers meanwhile. Healed, it rejoins as a follower and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_isolated_from_its_peers_steps_down_and_the_majority_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (links, servers) = linked_replicas(dir.path(), |_, _| {}).await;
    let first = leader(&servers.iter().collect::<Vec<_>>()).await;
    let old_id = raft_of(&servers[first]).await.raft.unwrap().id;
    let mut old = client_at(&servers[first].grpc_url()).await;
    let worker = register(&mut old, "pod-a").await;
    let task = take(&mut old, &worker).await;
    assert!(complete(&mut old, &worker, &task).await.accepted);

    for ((i, j), link) in &links {
        if *i == old_id || *j == old_id {
            link.set_cut(true);
        }
    }
    let others: Vec<&ServerHandle> = servers.iter().enumerate().filter(|(i, _)| *i != first).map(|(_, s)| s).collect();
    let mut new_leader = None;
    for _ in 0..500 {
        let mut found = None;
        for server in &others {
            let raft = raft_of(server).await.raft.unwrap();
            if raft.role == "leader" {
                found = Some((server.grpc_url(), raft.id));
            }
        }
        let old_role = raft_of(&servers[first]).await.raft.unwrap().role;
        if found.is_some() && old_role != "leader" {
            new_leader = found;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (url, new_id) = new_leader.expect("the majority elected a leader and the isolated one stepped down");
    assert_ne!(new_id, old_id);
    // The isolated replica refuses workers; the new leader has the completion and leases on.
    let refused = old.lease_task(pb::LeaseTaskRequest { worker_id: worker.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut client = client_at(&url).await;
    // A new leader applies the old term's entries once it commits an entry of its own: a lease asked of it
    // meanwhile applies after them, so it cannot be handed the accepted shard again.
    let next = take(&mut client, &worker).await;
    assert_ne!(next.task_id, task.task_id, "the accepted shard was leased again: its completion was lost");
    assert!(complete(&mut client, &worker, &next).await.accepted);
    let status_url = others.iter().find(|s| s.grpc_url() == url).unwrap().status_url();
    let report = fetch_status(&status_url, None).await.unwrap();
    assert_eq!(report.overall_tasks.done, 2, "both completions are on the new leader");

    // Healed: the old leader follows the new one and applies what it missed.
    for link in links.values() {
        link.set_cut(false);
    }
    let mut caught_up = false;
    for _ in 0..500 {
        let report = raft_of(&servers[first]).await;
        let raft = report.raft.unwrap();
        if raft.role == "follower" && raft.leader == Some(new_id) && report.overall_tasks.done == 2 {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(caught_up, "the healed replica did not rejoin: {:?}", raft_of(&servers[first]).await.raft);
    for server in servers {
        server.shutdown().await;
    }
}

/// A follower cut off while the others run past their snapshot threshold (and compact their logs behind it)
/// catches up by the leader's snapshot once healed. It takes no snapshot of its own, so a snapshot file in
/// its folder can only be the one the leader sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_partitioned_past_the_snapshot_threshold_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // Replica 3 is the one cut off; it must not lead (it would take the test a term to move away).
    let (links, servers) = linked_replicas(dir.path(), |id, raft| {
        if id == 3 {
            raft.replica.snapshot_every = 0;
            raft.replica.election_tick = 50;
        } else {
            raft.replica.snapshot_every = 4;
            raft.replica.keep_tail = 0;
        }
    })
    .await;
    let first = leader(&servers.iter().collect::<Vec<_>>()).await;
    assert_ne!(first, 2, "replica 3 has the longest election timeout");
    for ((i, j), link) in &links {
        if *i == 3 || *j == 3 {
            link.set_cut(true);
        }
    }
    let mut client = client_at(&servers[first].grpc_url()).await;
    let worker = register(&mut client, "pod-a").await;
    // Every heartbeat is an entry: a few dozen entries is several snapshots and compactions.
    // Both rollout shards (the next task is the train gang's).
    for _ in 0..2 {
        let task = take(&mut client, &worker).await;
        assert!(complete(&mut client, &worker, &task).await.accepted);
    }
    for _ in 0..40 {
        let heartbeat = pb::HeartbeatRequest { worker_id: worker.clone(), ..Default::default() };
        client.heartbeat(heartbeat).await.unwrap();
    }
    let leader_applied = raft_of(&servers[first]).await.raft.unwrap().applied_index;
    assert!(raft_of(&servers[2]).await.raft.unwrap().applied_index < leader_applied / 2);

    for link in links.values() {
        link.set_cut(false);
    }
    let mut caught_up = None;
    for _ in 0..500 {
        let report = raft_of(&servers[2]).await;
        if report.raft.as_ref().unwrap().applied_index >= leader_applied && report.overall_tasks.done == 2 {
            caught_up = Some(report);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(caught_up.is_some(), "replica 3 did not catch up: {:?}", raft_of(&servers[2]).await.raft);
    let snapshots = std::fs::read_dir(dir.path().join("replica-3/raft/snap")).unwrap().count();
    assert!(snapshots > 0, "replica 3 caught up without the leader's snapshot");
    for server in servers {
        server.shutdown().await;
    }
}
