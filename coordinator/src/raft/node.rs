//! The replicated driver: one coordinator replica serving the same `Handle` as the single-process
//! driver (`driver::actor`), so the gRPC service and the status endpoint run unchanged on top of Raft.
//!
//! One task owns the `Replica` and runs on a thread of its own (a current-thread runtime inside
//! `spawn_blocking`): raft's Ready handling fsyncs the log synchronously, and that must not stall the
//! gRPC and status servers. It takes the handle's messages, the peers' messages (`transport`), raft's
//! tick every `tick`, and the transport's feedback; after each it handles raft's Ready, sends what is to
//! be sent, and answers callers whose proposals applied.
//!
//! - **Commands** are proposed by the leader only and answered once committed and applied (a follower
//!   answers `NotLeader` with the leader it knows; the service turns that into UNAVAILABLE with the
//!   leader's URL). Sessions are checked where the entry applies (`Body::InSession`).
//! - **Reads** (status) see the applied state at once: it holds nothing uncommitted.
//! - **Leader-only side effects**: lease expiry (`Replica::maybe_expire`), and the manifest writer, which
//!   a replica starts when it becomes leader (queueing every stage already finished: manifests are
//!   written whole and alike, so a new leader rewriting one changes nothing) and stops on step-down.
//!   LeaseTask is held back ("retry later") until the stages before the active one are published, as
//!   in the single-process driver.
//! - **Stop** (SIGTERM): a leader first hands leadership to the peer whose log is furthest along and
//!   waits briefly for it to take over, so a rolling restart costs one quick election, not a timeout.
//! - A storage error is fatal, as for the single-process driver's log: every command is refused, the
//!   health checks fail, and the task ends after `exit_after`, so the process exits and restarts.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::entry::{ProposalId, register_command};
use super::replica::{LocalTime, Outcome, PeerProgress, Replica, ReplicaConfig, Request};
use super::storage::{Durability, RaftStorage};
use super::transport::{Feedback, Outbox};
use crate::driver::actor::{Handle, Health, Msg, ReplyTx, View};
use crate::driver::clock::Clock;
use crate::driver::manifests::{Publisher, Rejection};
use crate::driver::telemetry::Telemetry;
use crate::error::{Error, Result};
use crate::state::{Applied, Command, Lease, Plan, Progress, Reply, RunStatus, WaitReason, WorkerId};

const QUEUE: usize = 8192;
/// Messages taken from a queue before Ready is handled: a batch shares one fsync.
const MAX_BATCH: usize = 512;
/// How long a stopping leader waits for its successor to take over.
const TRANSFER_WAIT: Duration = Duration::from_secs(3);

/// Builds the manifest writer when this replica becomes leader.
pub type PublisherFactory = Box<dyn FnMut() -> Result<Publisher> + Send>;

/// One replica's settings.
pub struct NodeConfig {
    pub replica: ReplicaConfig,
    /// The replica's Raft storage folder.
    pub dir: PathBuf,
    /// Every voter's id, this replica's included (static membership).
    pub voters: Vec<u64>,
    /// Raft's logical clock: `ReplicaConfig`'s ticks are counted in these.
    pub tick: Duration,
    pub durability: Durability,
    /// After a storage error, how long the replica keeps answering (refusals, failing probes).
    pub exit_after: Duration,
}

impl NodeConfig {
    /// Review B8's timing: a 100 ms tick, heartbeats every 300 ms, elections after 1-2 s.
    pub fn new(id: u64, dir: PathBuf, voters: Vec<u64>) -> Self {
        Self {
            replica: ReplicaConfig::new(id),
            dir,
            voters,
            tick: Duration::from_millis(100),
            durability: Durability::Fsync,
            exit_after: Duration::from_secs(5),
        }
    }
}

/// What `/status` and `/metrics` show of a replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    pub id: u64,
    /// leader | follower | candidate | precandidate
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Leaders this replica has seen change (elections it saw end with another leader, or none).
    pub leader_changes: u64,
    /// On the leader: each peer's replication progress.
    pub peers: Vec<PeerProgress>,
}

/// A caller waiting for its proposal to apply.
struct Waiting {
    reply: ReplyTx,
    /// For the telemetry (RegisterWorker's id is known only once it applied).
    command: Command,
    /// A LeaseTask proposed as a lease-less heartbeat while manifests were written: answer "retry later".
    held_back: bool,
    /// A RejectOutput of the manifest writer: once applied, the writer rewinds to this stage.
    rewind: Option<usize>,
}

/// Opens the replica's storage and state and starts its task. `outbox` sends to the peers, `inbox`
/// carries what they send, `feedback` what the transport learned of its sends.
pub async fn start(
    plan: Plan,
    config: NodeConfig,
    clock: Arc<dyn Clock>,
    make_publisher: Option<PublisherFactory>,
    outbox: Outbox,
    inbox: mpsc::Receiver<Message>,
    feedback: mpsc::UnboundedReceiver<Feedback>,
) -> Result<(Handle, JoinHandle<Result<()>>)> {
    let stages = plan.stage_count();
    let publishes = make_publisher.is_some();
    let (tx, rx) = mpsc::channel(QUEUE);
    let (run_tx, run_rx) = watch::channel(RunStatus::Running);
    let (health_tx, health_rx) = watch::channel(Health::Serving);
    let (published_tx, published_rx) = watch::channel(0usize);
    let (opened_tx, opened_rx) = oneshot::channel::<Result<()>>();
    let task_clock = clock.clone();
    let task = tokio::task::spawn_blocking(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Unavailable { message: format!("cannot start the replica's runtime: {e}") })?;
        let opened = RaftStorage::open(&config.dir, config.replica.id, &config.voters, config.durability)
            .and_then(|storage| Replica::open(config.replica.clone(), storage, plan));
        let replica = match opened {
            Ok(replica) => {
                let _ = opened_tx.send(Ok(()));
                replica
            }
            Err(e) => {
                let _ = opened_tx.send(Err(e));
                return Ok(());
            }
        };
        let now = task_clock.now_ms();
        let node = Node {
            telemetry: Telemetry::new(now, replica.applied_index()),
            replica,
            clock: task_clock,
            started: Instant::now(),
            outbox,
            waiting: HashMap::new(),
            make_publisher,
            publisher: None,
            published: published_tx,
            run: run_tx,
            health: health_tx,
            failure: None,
            exit_at: None,
            exit_after: config.exit_after,
            leader: None,
            leader_changes: 0,
        };
        runtime.block_on(node.run(rx, inbox, feedback, config.tick))
    });
    match opened_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let ended = task.await.map_err(|e| Error::Unavailable { message: format!("the replica panicked: {e}") })?;
            return Err(ended.err().unwrap_or(Error::Unavailable { message: "the replica did not start".into() }));
        }
    }
    let published = publishes.then_some((published_rx, stages));
    let handle = Handle::from_parts(tx, run_rx, health_rx, clock, published);
    Ok((handle, task))
}

struct Node {
    replica: Replica,
    /// Counters of the commands this replica proposed and applied (soft state: a follower's are its own).
    telemetry: Telemetry,
    clock: Arc<dyn Clock>,
    started: Instant,
    outbox: Outbox,
    waiting: HashMap<ProposalId, Waiting>,
    make_publisher: Option<PublisherFactory>,
    /// The manifest writer, while this replica leads.
    publisher: Option<Publisher>,
    /// Stages published, as far as any leader this replica was got (a new leader starts from 0 and
    /// rewrites: the watch only ever rises).
    published: watch::Sender<usize>,
    run: watch::Sender<RunStatus>,
    health: watch::Sender<Health>,
    failure: Option<Error>,
    exit_at: Option<tokio::time::Instant>,
    exit_after: Duration,
    leader: Option<u64>,
    leader_changes: u64,
}

enum Next {
    Msg(Msg),
    Peer(Message),
    Feedback(Feedback),
    Rejected(Rejection),
    Tick,
    Exit,
    Closed,
}

impl Node {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut inbox: mpsc::Receiver<Message>,
        mut feedback: mpsc::UnboundedReceiver<Feedback>,
        tick: Duration,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop: Option<oneshot::Sender<()>> = None;
        tracing::info!(
            raft_id = self.replica.id(),
            applied = self.replica.applied_index(),
            "coordinator replica started"
        );
        self.after();
        while stop.is_none() {
            let exit = crate::driver::actor::sleep_until_or_never(self.exit_at);
            let rejected = Publisher::next_rejection(self.publisher.as_mut());
            let next = tokio::select! {
                msg = rx.recv() => msg.map_or(Next::Closed, Next::Msg),
                Some(message) = inbox.recv() => Next::Peer(message),
                Some(fb) = feedback.recv() => Next::Feedback(fb),
                rejection = rejected => Next::Rejected(rejection),
                _ = ticker.tick() => Next::Tick,
                () = exit => Next::Exit,
            };
            match next {
                Next::Closed | Next::Exit => break,
                Next::Msg(msg) => stop = self.take(msg),
                Next::Peer(message) => self.step(message),
                Next::Feedback(fb) => self.feedback(fb),
                Next::Rejected(rejection) => self.reject(rejection),
                Next::Tick => {
                    self.replica.tick();
                    self.maybe_expire();
                }
            }
            // Whatever else queued up joins this Ready (one fsync for the lot).
            for _ in 0..MAX_BATCH {
                let Ok(message) = inbox.try_recv() else { break };
                self.step(message);
            }
            for _ in 0..MAX_BATCH {
                if stop.is_some() {
                    break;
                }
                let Ok(msg) = rx.try_recv() else { break };
                stop = self.take(msg);
            }
            while let Ok(fb) = feedback.try_recv() {
                self.feedback(fb);
            }
            self.after();
        }
        if stop.is_some() && self.failure.is_none() {
            self.hand_over(&mut inbox, &mut feedback).await;
        }
        if let Some(publisher) = self.publisher.take() {
            publisher.stop();
        }
        for (_, waiting) in self.waiting.drain() {
            let _ = waiting.reply.send(Err(Error::Unavailable { message: "the coordinator replica stopped".into() }));
        }
        self.health.send_replace(Health::Stopped);
        tracing::info!(
            raft_id = self.replica.id(),
            applied = self.replica.applied_index(),
            "coordinator replica stopped"
        );
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        match self.failure.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn local_time(&self) -> LocalTime {
        LocalTime { mono_ms: self.started.elapsed().as_millis() as u64, wall_ms: self.clock.now_ms() }
    }

    fn take(&mut self, msg: Msg) -> Option<oneshot::Sender<()>> {
        match msg {
            Msg::Apply { command, session, reply } => self.propose_command(command, session, reply),
            Msg::Register { worker_id, name, resources, now_ms, reply } => {
                let (request, command) = match worker_id {
                    // A worker re-registering under its own id (a restarted pod): the id is known.
                    Some(worker_id) => {
                        let session = crate::driver::auth::new_session();
                        let command = register_command(worker_id, name, resources, now_ms, session);
                        (Request::Command(command.clone()), command)
                    }
                    None => {
                        let command =
                            register_command(WorkerId::new(""), name.clone(), resources.clone(), now_ms, String::new());
                        (Request::Register { name, resources }, command)
                    }
                };
                self.propose(request, Waiting { reply, command, held_back: false, rewind: None });
            }
            Msg::Read(read) => {
                let held_back = self.publisher.as_ref().and_then(|p| p.held_back(self.replica.state()));
                let raft = self.status();
                read(View {
                    state: self.replica.state(),
                    telemetry: &self.telemetry,
                    now_ms: self.clock.now_ms(),
                    log_index: self.replica.applied_index(),
                    held_back,
                    raft: Some(raft),
                });
            }
            Msg::Stop(reply) => return Some(reply),
        }
        None
    }

    /// A worker's command: proposed when this replica leads, refused otherwise.
    fn propose_command(&mut self, command: Command, session: Option<String>, reply: ReplyTx) {
        if !self.replica.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // Cheap early refusal; the check that counts is where the entry applies.
        if let Some(refused) = crate::driver::auth::stale_session(self.replica.state(), &command, session.as_deref()) {
            self.telemetry.observe(&command, &Err(refused.clone()), self.replica.state().now_ms());
            let _ = reply.send(Err(refused));
            return;
        }
        let gate_open = self.publisher.as_ref().is_none_or(|p| p.gate_open(self.replica.state()));
        let (command, held_back) = match command {
            Command::LeaseTask { worker_id, now_ms } if !gate_open => {
                (Command::Heartbeat { worker_id, lease: None, progress: Progress::default(), now_ms }, true)
            }
            other => (other, false),
        };
        let request = match session {
            Some(session) => Request::InSession { command: command.clone(), session },
            None => Request::Command(command.clone()),
        };
        self.propose(request, Waiting { reply, command, held_back, rewind: None });
    }

    fn propose(&mut self, request: Request, waiting: Waiting) {
        if let Some(error) = self.refusal() {
            let _ = waiting.reply.send(Err(error));
            return;
        }
        let t = self.local_time();
        match self.replica.propose(request, t) {
            Ok(id) => {
                self.waiting.insert(id, waiting);
            }
            Err(Error::NotLeader { .. }) => {
                let _ = waiting.reply.send(Err(self.not_leader()));
            }
            Err(error) => {
                let _ = waiting.reply.send(Err(error));
            }
        }
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader { leader: self.replica.leader_id().filter(|id| *id != self.replica.id()) }
    }

    /// Why nothing can be proposed now (a storage error), if so.
    fn refusal(&self) -> Option<Error> {
        self.failure.as_ref().map(|error| Error::Unavailable {
            message: format!("the Raft log could not be written ({error}); the coordinator replica exits and restarts"),
        })
    }

    fn step(&mut self, message: Message) {
        if self.failure.is_some() {
            return;
        }
        let (from, kind) = (message.from, message.get_msg_type());
        if let Err(e) = self.replica.step(message) {
            tracing::debug!(raft_id = self.replica.id(), from, ?kind, error = %e, "raft refused a peer message");
        }
    }

    fn feedback(&mut self, feedback: Feedback) {
        match feedback {
            Feedback::Unreachable(peer) => self.replica.report_unreachable(peer),
            Feedback::Snapshot { peer, delivered } => self.replica.report_snapshot(peer, delivered),
        }
    }

    fn maybe_expire(&mut self) {
        if self.failure.is_some() || !self.replica.is_leader() {
            return;
        }
        let t = self.local_time();
        if let Err(e) = self.replica.maybe_expire(t) {
            tracing::warn!(raft_id = self.replica.id(), error = %e, "could not propose lease expiry; retrying next tick");
        }
    }

    /// The manifest writer's rejection of an accepted output, proposed as RejectOutput like any command.
    fn reject(&mut self, rejection: Rejection) {
        let Rejection { task_id, attempt, problem, detail } = rejection;
        let stage = self.replica.state().plan().stage_of(task_id.iteration, task_id.phase);
        let command = Command::RejectOutput { task_id, attempt, problem, detail, now_ms: self.clock.now_ms() };
        // Nobody waits on it but the writer, which must rewind once it applied.
        let (reply, _) = oneshot::channel();
        self.propose(
            Request::Command(command.clone()),
            Waiting { reply, command, held_back: false, rewind: Some(stage) },
        );
    }

    /// After every event: raft's Ready, the messages it produced, the outcomes, and what follows from
    /// the applied state (the manifest writer, the watches).
    fn after(&mut self) {
        if self.failure.is_none() {
            let t = self.local_time();
            // Handling one Ready can produce another (an entry committed by the append just synced).
            for _ in 0..8 {
                if !self.replica.has_ready() {
                    break;
                }
                if let Err(error) = self.replica.handle_ready(t) {
                    self.fail(error);
                    break;
                }
            }
        }
        for message in self.replica.take_messages() {
            self.outbox.send(message);
        }
        for outcome in self.replica.take_outcomes() {
            self.answer(outcome);
        }
        self.follow_role();
        if let Some(publisher) = &mut self.publisher {
            publisher.queue_finished(self.replica.state());
            let published = *publisher.watermark().borrow();
            self.published.send_if_modified(|p| {
                let rise = published > *p;
                if rise {
                    *p = published;
                }
                rise
            });
        }
        let status = self.replica.state().status().clone();
        self.run.send_if_modified(|s| {
            let changed = *s != status;
            if changed {
                *s = status;
            }
            changed
        });
    }

    fn fail(&mut self, error: Error) {
        tracing::error!(raft_id = self.replica.id(), error = %error, "the Raft log could not be written; the replica stops");
        self.telemetry.note_log_error(&error);
        self.health.send_replace(Health::LogFailed { error: error.to_string() });
        self.exit_at = Some(tokio::time::Instant::now() + self.exit_after);
        let refusal = Error::Unavailable { message: format!("the Raft log could not be written: {error}") };
        for (_, waiting) in self.waiting.drain() {
            let _ = waiting.reply.send(Err(refusal.clone()));
        }
        self.failure = Some(error);
    }

    fn answer(&mut self, outcome: Outcome) {
        let Outcome { id, result, .. } = outcome;
        let Some(waiting) = self.waiting.remove(&id) else { return };
        let Waiting { reply, mut command, held_back, rewind } = waiting;
        if let (
            Ok(Applied { reply: Reply::Registered { worker_id, .. }, .. }),
            Command::RegisterWorker { worker_id: id, .. },
        ) = (&result, &mut command)
        {
            *id = worker_id.clone();
        }
        // Only what this replica proposed is counted: the telemetry is the leader's view of its callers.
        if !matches!(result, Err(Error::NotLeader { .. } | Error::Unavailable { .. })) {
            self.telemetry.observe(&command, &result, self.replica.state().now_ms());
        }
        if let (Some(stage), Ok(_)) = (rewind, &result)
            && let Some(publisher) = &mut self.publisher
        {
            publisher.rewind(stage);
        }
        let result = match result {
            Ok(applied) if held_back => {
                let plan = self.replica.state().plan();
                let wait = Lease::RetryAfter { ms: plan.retry_after_ms, reason: WaitReason::PhaseBarrier };
                Ok(Applied { reply: Reply::Lease(wait), events: applied.events })
            }
            Err(Error::NotLeader { .. }) => Err(self.not_leader()),
            other => other,
        };
        let _ = reply.send(result);
    }

    /// Starts the manifest writer on winning an election, stops it on losing one; counts leader changes.
    fn follow_role(&mut self) {
        let leader = self.replica.leader_id();
        if leader != self.leader {
            if leader.is_some() {
                self.leader_changes += 1;
            }
            tracing::info!(
                raft_id = self.replica.id(),
                term = self.replica.term(),
                ?leader,
                "coordinator leader changed"
            );
            self.leader = leader;
        }
        let leading = self.replica.is_leader() && self.failure.is_none();
        if leading
            && self.publisher.is_none()
            && let Some(make) = &mut self.make_publisher
        {
            match make() {
                Ok(mut publisher) => {
                    publisher.queue_finished(self.replica.state());
                    self.publisher = Some(publisher);
                }
                Err(e) => tracing::error!(error = %e, "cannot start the manifest writer; leases stay held back"),
            }
        }
        if !leading && let Some(publisher) = self.publisher.take() {
            publisher.stop();
        }
    }

    fn status(&self) -> RaftStatus {
        let r = &self.replica;
        RaftStatus {
            id: r.id(),
            role: format!("{:?}", r.role()).to_lowercase(),
            term: r.term(),
            leader: r.leader_id(),
            commit_index: r.commit_index(),
            applied_index: r.applied_index(),
            leader_changes: self.leader_changes,
            peers: r.peer_progress(),
        }
    }

    /// On stop: a leader hands leadership to its most up-to-date peer and waits (briefly) to see it go.
    async fn hand_over(
        &mut self,
        inbox: &mut mpsc::Receiver<Message>,
        feedback: &mut mpsc::UnboundedReceiver<Feedback>,
    ) {
        let Some(to) = self.replica.peer_progress().iter().max_by_key(|p| p.matched).map(|p| p.id) else { return };
        tracing::info!(raft_id = self.replica.id(), to, "stopping: handing leadership over");
        self.replica.transfer_leader(to);
        self.after();
        let deadline = tokio::time::Instant::now() + TRANSFER_WAIT;
        while self.replica.is_leader() {
            tokio::select! {
                Some(message) = inbox.recv() => self.step(message),
                Some(fb) = feedback.recv() => self.feedback(fb),
                () = tokio::time::sleep_until(deadline) => break,
            }
            self.after();
        }
        if self.replica.is_leader() {
            tracing::warn!(raft_id = self.replica.id(), to, "leadership was not taken over in time; stopping anyway");
        }
        // Give the transport a moment to deliver the last messages (the successor's votes need none).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses `--raft-peers`: `1=host:port,2=host:port,3=host:port` (raft id → its peer address).
pub fn parse_peers(spec: &str) -> Result<BTreeMap<u64, String>> {
    let bad = |message: String| Error::Config { field: "raft_peers", message };
    let mut peers = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part.split_once('=').ok_or_else(|| bad(format!("`{part}`: expected ID=HOST:PORT")))?;
        let id: u64 = id.trim().parse().map_err(|_| bad(format!("`{part}`: the id must be a positive integer")))?;
        if id == 0 {
            return Err(bad(format!("`{part}`: id 0 is reserved by raft")));
        }
        let address = address.trim();
        let port = address.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) || address.chars().any(char::is_control) {
            return Err(bad(format!("`{part}`: expected ID=HOST:PORT")));
        }
        if peers.insert(id, address.to_owned()).is_some() {
            return Err(bad(format!("replica {id} is named twice")));
        }
    }
    if peers.is_empty() {
        return Err(bad("names no replica".into()));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::parse_peers;

    #[test]
    fn peers_parse_and_bad_entries_are_named() {
        let peers = parse_peers("1=a:7100, 2=b.svc:7100,3=10.0.0.3:7101").unwrap();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[&2], "b.svc:7100");
        for (spec, needle) in
            [("1=a", "`1=a`"), ("x=a:1", "`x=a:1`"), ("0=a:1", "id 0"), ("1=a:1,1=b:2", "twice"), ("", "no replica")]
        {
            let error = parse_peers(spec).unwrap_err().to_string();
            assert!(error.contains(needle), "{spec}: {error}");
        }
    }
}
