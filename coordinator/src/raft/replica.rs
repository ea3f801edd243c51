//! One coordinator replica: a raft-rs `RawNode` over `RaftStorage`, and the `RunState` its committed
//! entries build. Synchronous and clock-free like the state machine: the caller passes time in, feeds
//! it peer messages and ticks, and takes out the messages to send and the outcomes of its proposals.
//! The simulation drives it directly; the gRPC driver will own one in its actor (a later phase).
//!
//! What Raft forces on top of the single-process driver, all here rather than in `state/`:
//! - **Replies after commit and apply only.** A proposal's caller hears back when the entry carrying
//!   its `ProposalId` (in `Entry.context`) applies here with the term it was proposed in; an entry at
//!   that index with another id or term means a new leader overwrote it, and the caller is told
//!   `Unavailable` (it retries: every RPC is idempotent or fenced by attempt). Losing leadership fails
//!   every pending proposal the same way; some of them may still commit.
//! - **Worker ids assigned in apply** (`entry::Body::Register`).
//! - **Leader-stamped time.** The leader stamps each proposal with `leader_now`: the time of the
//!   applied state when it was elected plus the monotonic time since, pulled toward its wall clock by
//!   at most `max_clock_lead_ms`, and never below the applied state's time. A leader whose wall clock
//!   is an hour fast therefore cannot expire every lease at once, nor one an hour slow stop time.
//!   Applying raises each command's time to the state's (`entry::apply`), so the applied time never
//!   moves backwards.
//! - **A grace after every election**: the new leader proposes no `ExpireLeases` for a worker timeout,
//!   so workers that were reconnecting to it lose nothing (the single-process restart grace).
//! - **Expiry from the leader only**, one `ExpireLeases` in flight at a time.
//! - **Snapshots** every `snapshot_every` applied entries (and when raft wants one to send).

use std::collections::BTreeMap;

use raft::eraftpb::{EntryType, Message, Snapshot};
use raft::{Config, RawNode, StateRole};

use super::entry::{self, Body, ProposalId};
use super::storage::RaftStorage;
use crate::error::{Error, Result};
use crate::state::{Applied, Command, Plan, Resources, RunState, RunStatus};

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// Ticks without a leader's heartbeat before an election (raft randomizes it over [n, 2n)).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Snapshot the applied state every this many entries (0: only when raft asks for one).
    pub snapshot_every: u64,
    /// Entries kept in memory behind a snapshot, so a follower a little behind gets entries, not the
    /// whole state.
    pub keep_tail: u64,
    /// How far the leader's wall clock may pull its time ahead of the monotonic time since its
    /// election (review B7).
    pub max_clock_lead_ms: u64,
    /// No ExpireLeases this long after winning an election. None: the plan's worker timeout.
    pub election_grace_ms: Option<u64>,
    /// Some(n): every election timeout is exactly n ticks. raft-rs draws its randomized timeout from an
    /// unseeded thread RNG, so the simulation gives each replica a distinct n from its seed instead, and
    /// a seed replays exactly. None: raft-rs's randomized [election_tick, 2 · election_tick).
    pub fixed_election_tick: Option<usize>,
}

impl ReplicaConfig {
    /// Review B8's settings: with a 100 ms tick, heartbeats every 300 ms and elections after 1-2 s.
    pub fn new(id: u64) -> Self {
        Self {
            id,
            election_tick: 10,
            heartbeat_tick: 3,
            snapshot_every: 10_000,
            keep_tail: 1_000,
            max_clock_lead_ms: 1_000,
            election_grace_ms: None,
            fixed_election_tick: None,
        }
    }
}

/// A replica's reading of its clocks: a monotonic one (for elapsed time) and the wall clock (unix ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub mono_ms: u64,
    pub wall_ms: u64,
}

/// What a caller asks the leader to replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A command; its time is replaced by the leader's.
    Command(Command),
    /// RegisterWorker with the id assigned where the entry applies.
    Register { name: String, resources: Resources },
    /// A worker's command under its session nonce, checked where the entry applies (`Body::InSession`).
    InSession { command: Command, session: String },
}

/// How far the leader knows a peer's log to match its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerProgress {
    pub id: u64,
    /// The highest index known to be replicated there.
    pub matched: u64,
    pub next: u64,
    /// probe | replicate | snapshot
    pub state: String,
}

/// How a proposal ended: applied at `index` (its reply, or the command's refusal), or not known to
/// have applied (`index` 0, `Unavailable` / `NotLeader`: retry).
#[derive(Debug)]
pub struct Outcome {
    pub id: ProposalId,
    pub index: u64,
    pub result: Result<Applied>,
}

#[derive(Debug)]
struct Pending {
    term: u64,
    index: u64,
}

/// What only the leader keeps.
#[derive(Debug)]
struct Leading {
    /// The monotonic time it won the election, and the applied state's time then.
    since_mono_ms: u64,
    base_ms: u64,
    quiet_until_ms: u64,
    expire_in_flight: Option<u64>,
}

fn raft_error(during: &str, e: raft::Error) -> Error {
    Error::Raft { message: format!("{during}: {e}") }
}

pub struct Replica {
    config: ReplicaConfig,
    raw: RawNode<RaftStorage>,
    state: RunState,
    applied: u64,
    pending: BTreeMap<u64, Pending>,
    next_seq: u64,
    leading: Option<Leading>,
    grace_ms: u64,
    messages: Vec<Message>,
    outcomes: Vec<Outcome>,
}

impl Replica {
    /// Starts replica `config.id` on `storage`: the run state from its latest snapshot (or a fresh one
    /// for `plan`), and raft from its HardState and log; raft then re-delivers the committed entries
    /// after the snapshot.
    pub fn open(config: ReplicaConfig, storage: RaftStorage, plan: Plan) -> Result<Self> {
        let snapshot = storage.latest_snapshot();
        let index = snapshot.get_metadata().index;
        let state =
            if index > 0 { entry::decode_snapshot(index, snapshot.get_data())? } else { RunState::new(plan.clone())? };
        if state.plan() != &plan {
            return Err(Error::StateMismatch {
                path: storage.dir().display().to_string(),
                message: format!("the Raft snapshot at entry {index} was taken of a run with another plan"),
            });
        }
        let (election_tick, min_election_tick, max_election_tick) = match config.fixed_election_tick {
            Some(n) => (n, n, n + 1),
            None => (config.election_tick, 0, 0),
        };
        let raft_config = Config {
            id: config.id,
            election_tick,
            min_election_tick,
            max_election_tick,
            heartbeat_tick: config.heartbeat_tick,
            // Never above the commit index (raft-rs#392): the snapshot holds committed entries only.
            applied: index,
            check_quorum: true,
            pre_vote: true,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            // Beyond it proposals are dropped: backpressure, answered Unavailable.
            max_uncommitted_size: 16 << 20,
            ..Config::default()
        };
        raft_config.validate().map_err(|e| raft_error("the Raft config", e))?;
        let raw = RawNode::new(&raft_config, storage, &super::log::logger(config.id))
            .map_err(|e| raft_error("starting the Raft node", e))?;
        let grace_ms = config.election_grace_ms.unwrap_or(plan.worker_timeout_ms);
        Ok(Self {
            config,
            raw,
            state,
            applied: index,
            pending: BTreeMap::new(),
            next_seq: 1,
            leading: None,
            grace_ms,
            messages: Vec::new(),
            outcomes: Vec::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The leader this replica knows of, if any.
    pub fn leader_id(&self) -> Option<u64> {
        Some(self.raw.raft.leader_id).filter(|id| *id != raft::INVALID_ID)
    }

    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn state(&self) -> &RunState {
        &self.state
    }

    pub fn storage(&self) -> &RaftStorage {
        self.raw.store()
    }

    pub fn storage_mut(&mut self) -> &mut RaftStorage {
        self.raw.mut_store()
    }

    /// Until when the leader proposes no expiry (0: not the leader).
    pub fn quiet_until_ms(&self) -> u64 {
        self.leading.as_ref().map_or(0, |l| l.quiet_until_ms)
    }

    /// Messages to send to peers, in order; each names its recipient (`to`).
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }

    pub fn take_outcomes(&mut self) -> Vec<Outcome> {
        std::mem::take(&mut self.outcomes)
    }

    /// Whether `handle_ready` has anything to do.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// One tick of raft's logical clock (elections, heartbeats).
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// A message from a peer.
    pub fn step(&mut self, message: Message) -> Result<()> {
        self.raw.step(message).map_err(|e| raft_error("stepping a peer message", e))
    }

    /// The transport could not deliver to `peer`: raft probes it again instead of streaming to it.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// Whether a snapshot sent to `peer` arrived; until told, raft sends that peer nothing more.
    pub fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(peer, status);
    }

    /// On the leader: every other voter's replication progress, by id.
    pub fn peer_progress(&self) -> Vec<PeerProgress> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut peers: Vec<PeerProgress> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.config.id)
            .map(|(id, p)| PeerProgress {
                id: *id,
                matched: p.matched,
                next: p.next_idx,
                state: format!("{:?}", p.state).to_lowercase(),
            })
            .collect();
        peers.sort_by_key(|p| p.id);
        peers
    }

    /// Asks raft to hand leadership to `to` (it catches `to` up first, then tells it to campaign at once).
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// The time the leader stamps on what it proposes now (see the module docs).
    pub fn leader_now(&self, t: LocalTime) -> u64 {
        let Some(leading) = &self.leading else {
            return self.state.now_ms();
        };
        let steady = leading.base_ms.saturating_add(t.mono_ms.saturating_sub(leading.since_mono_ms));
        let pulled = t.wall_ms.clamp(steady, steady.saturating_add(self.config.max_clock_lead_ms));
        self.state.now_ms().max(pulled)
    }

    /// Proposes `request` if this replica leads; its outcome comes out of `take_outcomes` once the
    /// entry applied here (or was lost).
    pub fn propose(&mut self, request: Request, t: LocalTime) -> Result<ProposalId> {
        // Both: raft may have stepped down on a message whose Ready is not handled yet, and a follower
        // would forward the proposal to the leader rather than refuse it.
        if self.leading.is_none() || !self.is_leader() {
            return Err(Error::NotLeader { leader: self.leader_id() });
        }
        let now_ms = self.leader_now(t);
        let body = match request {
            Request::Command(mut command) => {
                command.set_now_ms(now_ms);
                Body::Cmd(command)
            }
            Request::InSession { mut command, session } => {
                command.set_now_ms(now_ms);
                Body::InSession { command, session }
            }
            Request::Register { name, resources } => {
                Body::Register { name, resources, now_ms, session: crate::driver::auth::new_session() }
            }
        };
        self.propose_body(&body)
    }

    fn propose_body(&mut self, body: &Body) -> Result<ProposalId> {
        let data = entry::encode(body)?;
        let id = ProposalId { node: self.config.id, seq: self.next_seq };
        self.next_seq += 1;
        self.raw.propose(id.to_bytes(), data).map_err(|e| Error::Unavailable {
            message: format!("replica {} could not propose {}: {e}", self.config.id, body.kind()),
        })?;
        let index = self.raw.raft.raft_log.last_index();
        self.pending.insert(id.seq, Pending { term: self.raw.raft.term, index });
        Ok(id)
    }

    /// The leader's timer: proposes ExpireLeases once something is due, the election grace is over and
    /// no earlier one is in flight. Returns its id when it proposed one.
    pub fn maybe_expire(&mut self, t: LocalTime) -> Result<Option<ProposalId>> {
        let now_ms = self.leader_now(t);
        let Some(leading) = &self.leading else { return Ok(None) };
        if !self.is_leader()
            || leading.expire_in_flight.is_some()
            || now_ms < leading.quiet_until_ms
            || *self.state.status() != RunStatus::Running
            || self.state.next_deadline_ms().is_none_or(|at| at > now_ms)
        {
            return Ok(None);
        }
        let id = self.propose_body(&Body::Cmd(Command::ExpireLeases { now_ms }))?;
        if let Some(leading) = &mut self.leading {
            leading.expire_in_flight = Some(id.seq);
        }
        Ok(Some(id))
    }

    /// Handles raft's Ready, in the order raft-rs requires: the leader's messages go out at once; a
    /// snapshot, entries and HardState are written and synced before the messages that promise them;
    /// committed entries apply to the run state. Any error leaves the replica unusable (raft-rs: a
    /// storage error makes the node inoperable): the caller stops it.
    pub fn handle_ready(&mut self, t: LocalTime) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(soft) = ready.ss() {
            let (role, leader) = (soft.raft_state, soft.leader_id);
            self.on_role(role, leader, t);
        }
        self.messages.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.raw.mut_store().apply_snapshot(snapshot.clone())?;
            self.install(&snapshot)?;
        }
        self.apply_entries(ready.take_committed_entries())?;
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hard_state) = ready.hs() {
            self.raw.mut_store().set_hard_state(hard_state.clone())?;
        }
        if ready.must_sync() {
            self.raw.mut_store().sync()?;
        }
        // Votes and append acknowledgements: only now that what they promise is durable.
        self.messages.extend(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_snapshot()
    }

    fn on_role(&mut self, role: StateRole, leader: u64, t: LocalTime) {
        let was_leader = self.leading.is_some();
        if role == StateRole::Leader && !was_leader {
            self.leading = Some(Leading {
                since_mono_ms: t.mono_ms,
                base_ms: self.state.now_ms(),
                quiet_until_ms: 0,
                expire_in_flight: None,
            });
            let quiet_until_ms = self.leader_now(t).saturating_add(self.grace_ms);
            if let Some(leading) = &mut self.leading {
                leading.quiet_until_ms = quiet_until_ms;
            }
            tracing::info!(
                raft_id = self.config.id,
                term = self.raw.raft.term,
                quiet_until_ms,
                "became the coordinator leader; no lease expires during the election grace"
            );
        } else if role != StateRole::Leader && was_leader {
            self.leading = None;
            let leader = Some(leader).filter(|id| *id != raft::INVALID_ID);
            for (seq, _) in std::mem::take(&mut self.pending) {
                let id = ProposalId { node: self.config.id, seq };
                self.outcomes.push(Outcome { id, index: 0, result: Err(Error::NotLeader { leader }) });
            }
            tracing::info!(raft_id = self.config.id, term = self.raw.raft.term, ?leader, "stepped down as leader");
        }
    }

    /// A snapshot from the leader replaces the run state; proposals it may or may not hold are lost.
    fn install(&mut self, snapshot: &Snapshot) -> Result<()> {
        let index = snapshot.get_metadata().index;
        let state = entry::decode_snapshot(index, snapshot.get_data())?;
        if state.plan() != self.state.plan() {
            return Err(Error::StateMismatch {
                path: self.raw.store().dir().display().to_string(),
                message: format!("the leader's snapshot at entry {index} is of a run with another plan"),
            });
        }
        self.state = state;
        self.applied = index;
        self.settle_through(index);
        tracing::info!(raft_id = self.config.id, index, "installed the leader's snapshot of the run state");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<raft::eraftpb::Entry>) -> Result<()> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            if entry.index != self.applied + 1 {
                return Err(Error::Raft {
                    message: format!("entry {} committed after entry {}: a gap", entry.index, self.applied),
                });
            }
            self.applied = entry.index;
            let result = match entry.get_entry_type() {
                // The no-op a new leader commits its term with.
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal => Some(entry::apply(&mut self.state, entry::decode(entry.index, &entry.data)?)),
                other => {
                    return Err(Error::Raft {
                        message: format!(
                            "entry {} is a {other:?}: membership changes are not supported (static voters)",
                            entry.index
                        ),
                    });
                }
            };
            let mine = ProposalId::from_bytes(&entry.context).filter(|id| id.node == self.config.id);
            if let Some(id) = mine
                && self.pending.get(&id.seq).is_some_and(|p| p.term == entry.term && p.index == entry.index)
            {
                self.pending.remove(&id.seq);
                self.clear_expire(id.seq);
                let result =
                    result.unwrap_or_else(|| Err(Error::Raft { message: "an empty entry was proposed".into() }));
                self.outcomes.push(Outcome { id, index: entry.index, result });
            }
            self.settle_through(entry.index);
        }
        Ok(())
    }

    /// Fails every pending proposal at or below `index` that did not apply: another entry took its place.
    fn settle_through(&mut self, index: u64) {
        let lost: Vec<u64> = self.pending.iter().filter(|(_, p)| p.index <= index).map(|(seq, _)| *seq).collect();
        for seq in lost {
            let Some(pending) = self.pending.remove(&seq) else { continue };
            self.clear_expire(seq);
            let message = format!(
                "the proposal at entry {} (term {}) was replaced by a new leader's entry: retry",
                pending.index, pending.term
            );
            let id = ProposalId { node: self.config.id, seq };
            self.outcomes.push(Outcome { id, index: 0, result: Err(Error::Unavailable { message }) });
        }
    }

    fn clear_expire(&mut self, seq: u64) {
        if let Some(leading) = &mut self.leading
            && leading.expire_in_flight == Some(seq)
        {
            leading.expire_in_flight = None;
        }
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let store = self.raw.store();
        let snapshot_index = store.latest_snapshot().get_metadata().index;
        let due = self.config.snapshot_every > 0 && self.applied >= snapshot_index + self.config.snapshot_every;
        let wanted = store.snapshot_wanted() > 0;
        if self.applied <= snapshot_index || !(due || wanted) || self.applied > store.hard_state().commit {
            return Ok(());
        }
        let data = entry::encode_snapshot(&self.state)?;
        let (applied, keep_tail) = (self.applied, self.config.keep_tail);
        self.raw.mut_store().create_snapshot(applied, data, keep_tail)?;
        tracing::debug!(raft_id = self.config.id, index = applied, "snapshotted the run state");
        Ok(())
    }
}
