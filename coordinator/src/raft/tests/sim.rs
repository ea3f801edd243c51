//! The deterministic simulation (issue 14's first "Must show", review C1): three replicas in process,
//! a seeded network that drops, duplicates, reorders, delays and partitions their messages, crashes
//! that lose whatever a replica had not synced (its segment cut back, sometimes mid-record) and restart
//! it from its folder, skewed clocks; and workers that speak the coordinator's real commands (register,
//! lease, heartbeat, join the gang, complete, fail) to whichever replica they believe leads, while the
//! leader proposes expiry. After every step it checks:
//! - election safety: at most one leader per term;
//! - state machine safety: equal run-state digests at equal applied index, on every replica;
//! - time: a replica's applied time never moves backwards;
//! - the run's invariants from the replies workers were given: no (task, attempt) leased to two workers,
//!   at most one accepted attempt per task, and every acknowledged completion is the accepted attempt
//!   on every replica that has applied it (none lost).
//!
//! Then the faults stop and the run must finish on every replica, with every task accepted exactly once.
//!
//! `IRO_SIM_SEEDS=N` runs seeds 0..N (default 500); `IRO_SIM_SEED=S` replays seed S alone, exactly: all
//! randomness comes from the seed (raft's election timeouts too, `ReplicaConfig::fixed_election_tick`). A
//! failing seed prints the command that replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use raft::eraftpb::{Message, MessageType};

use crate::error::Error;
use crate::raft::entry::{ProposalId, register_command};
use crate::raft::replica::{LocalTime, Replica, ReplicaConfig, Request};
use crate::raft::storage::{Durability, RaftStorage};
use crate::state::{
    Command, Fenced, Lease, LeaseRef, Output, Plan, Progress, Reply, Resources, RunStatus, TaskId, WorkerId,
};

const NODES: [u64; 3] = [1, 2, 3];
const STEP_MS: u64 = 5;
const TICK_MS: u64 = 20;
/// Faults happen during this much simulated time; then the network heals and the run must finish.
const FAULT_MS: u64 = 4_000;
const FINISH_BY_MS: u64 = 40_000;
const WORKERS: usize = 4;
const REQUEST_TIMEOUT_MS: u64 = 300;
/// Wall clocks start here (unix ms), so a skewed one never goes below zero.
const EPOCH_MS: u64 = 1_000_000;

/// SplitMix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

fn plan() -> Plan {
    Plan {
        max_attempts: 1_000,
        quarantine_after: 0,
        retry_backoff_max_ms: 400,
        lease_ms: 2_000,
        heartbeat_interval_ms: 150,
        worker_timeout_ms: 800,
        gang_join_timeout_ms: 2_000,
        retry_after_ms: 100,
        ..Plan::new(3, 6, 3, 2)
    }
}

struct InFlight {
    at: u64,
    seq: u64,
    message: Message,
}

/// One replica's slot: its folder, and the replica while it is up.
struct Node {
    id: u64,
    dir: PathBuf,
    replica: Option<Replica>,
    /// While down: when it restarts.
    down_until: u64,
    mono_offset: u64,
    skew_ms: i64,
    next_tick: u64,
    /// (applied index, applied time) seen last, to check time never runs backwards.
    last_applied: (u64, u64),
}

impl Node {
    fn time(&self, now: u64) -> LocalTime {
        LocalTime { mono_ms: now + self.mono_offset, wall_ms: (EPOCH_MS as i64 + now as i64 + self.skew_ms) as u64 }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Doing {
    Unregistered,
    Idle,
    Working { task: TaskId, attempt: u32, gang: bool, joined: bool, done_at: u64, last_beat: u64 },
    Finished,
}

#[derive(Debug, Clone)]
struct Asked {
    node: u64,
    id: ProposalId,
    at: u64,
    what: &'static str,
}

struct Worker {
    name: String,
    id: Option<WorkerId>,
    doing: Doing,
    target: u64,
    asked: Option<Asked>,
    next_at: u64,
}

/// An acknowledged completion: the reply said this attempt is the accepted one, at this log index.
#[derive(Debug, Clone, Copy)]
struct Ack {
    task: TaskId,
    attempt: u32,
    index: u64,
}

struct Sim {
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    net: Vec<InFlight>,
    net_seq: u64,
    /// Pairs of replicas that cannot reach each other (both directions).
    cut: BTreeSet<(u64, u64)>,
    heal_at: u64,
    drop_per_mille: u64,
    dup_per_mille: u64,
    max_delay_ms: u64,
    workers: Vec<Worker>,
    /// Every leader seen, by term.
    leaders: BTreeMap<u64, u64>,
    /// The digest of the applied state at each index, as the first replica to reach it had it.
    digests: BTreeMap<u64, (u64, u64)>,
    /// (task, attempt, rank) → the worker it was leased to, from the replies workers got (a gang's
    /// ranks share the task's attempt; rank 0 for shards).
    leased: BTreeMap<(TaskId, u32, u32), WorkerId>,
    acks: Vec<Ack>,
    accepted: BTreeMap<TaskId, u32>,
    /// Counts of what happened, so a seed that exercised nothing is noticed.
    stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    crashes: u64,
    partitions: u64,
    elections: u64,
    snapshots_installed: u64,
    lost_proposals: u64,
    acks: u64,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64, root: &std::path::Path) -> Result<Self, String> {
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
        let mut nodes = Vec::new();
        for id in NODES {
            nodes.push(Node {
                id,
                dir: root.join(format!("replica-{id}")),
                replica: None,
                down_until: 0,
                mono_offset: rng.below(1_000_000),
                skew_ms: rng.between(0, 4_000) as i64 - 2_000,
                next_tick: rng.below(TICK_MS),
                last_applied: (0, 0),
            });
        }
        let workers = (0..WORKERS)
            .map(|i| Worker {
                name: format!("sim-{i}"),
                id: None,
                doing: Doing::Unregistered,
                target: NODES[i % NODES.len()],
                asked: None,
                next_at: rng.below(50),
            })
            .collect();
        let mut sim = Self {
            rng,
            now: 0,
            nodes,
            net: Vec::new(),
            net_seq: 0,
            cut: BTreeSet::new(),
            heal_at: 0,
            drop_per_mille: 0,
            dup_per_mille: 0,
            max_delay_ms: 10,
            workers,
            leaders: BTreeMap::new(),
            digests: BTreeMap::new(),
            leased: BTreeMap::new(),
            acks: Vec::new(),
            accepted: BTreeMap::new(),
            stats: Stats::default(),
        };
        for i in 0..sim.nodes.len() {
            sim.start(i)?;
        }
        Ok(sim)
    }

    fn start(&mut self, i: usize) -> Check {
        let node = &mut self.nodes[i];
        let storage = RaftStorage::open(&node.dir, node.id, &NODES, Durability::Simulated)
            .map_err(|e| format!("replica {} cannot reopen its storage: {e}", node.id))?;
        let mut config = ReplicaConfig::new(node.id);
        config.heartbeat_tick = 2;
        // A seeded, distinct timeout per replica and incarnation, so a seed replays exactly.
        config.fixed_election_tick = Some(10 + ((self.rng.below(10) as usize + 3 * i) % 10));
        config.snapshot_every = 40;
        config.keep_tail = 10;
        config.max_clock_lead_ms = 200;
        let replica =
            Replica::open(config, storage, plan()).map_err(|e| format!("replica {} cannot start: {e}", node.id))?;
        node.last_applied = (replica.applied_index(), replica.state().now_ms());
        node.replica = Some(replica);
        Ok(())
    }

    fn crash(&mut self, i: usize, down_ms: u64) -> Check {
        let keep_choice = self.rng.below(3);
        let cut_at = self.rng.next();
        let node = &mut self.nodes[i];
        let Some(mut replica) = node.replica.take() else { return Ok(()) };
        // Nothing unsynced survives, or a prefix of it (a write torn anywhere), or all of it.
        let keep = move |unsynced: u64| match keep_choice {
            0 => 0,
            1 => cut_at % (unsynced + 1),
            _ => unsynced,
        };
        replica.storage_mut().crash(keep).map_err(|e| format!("crashing replica {}: {e}", node.id))?;
        drop(replica);
        node.down_until = self.now + down_ms;
        let id = node.id;
        self.stats.crashes += 1;
        // Its callers' connections break: they hear nothing, and ask again (proposal ids restart with
        // the process, so an old one must not match a new one's outcome).
        for worker in &mut self.workers {
            if worker.asked.as_ref().is_some_and(|a| a.node == id) {
                worker.asked = None;
                worker.target = NODES[(id % 3) as usize];
            }
        }
        Ok(())
    }

    fn faulty(&self) -> bool {
        self.now < FAULT_MS
    }

    fn nemesis(&mut self) -> Check {
        if !self.faulty() {
            if !self.cut.is_empty() || self.drop_per_mille > 0 {
                self.cut.clear();
                self.drop_per_mille = 0;
                self.dup_per_mille = 0;
                self.max_delay_ms = 10;
            }
            return Ok(());
        }
        if self.now >= self.heal_at && !self.cut.is_empty() {
            self.cut.clear();
        }
        if self.rng.chance(4) {
            self.drop_per_mille = self.rng.below(150);
            self.dup_per_mille = self.rng.below(100);
            self.max_delay_ms = self.rng.between(1, 60);
        }
        if self.cut.is_empty() && self.rng.chance(5) {
            // Isolate one replica (often the leader), or cut a single link.
            let leader = self.nodes.iter().filter_map(|n| n.replica.as_ref()).find(|r| r.is_leader()).map(|r| r.id());
            let victim = match (leader, self.rng.below(3)) {
                (Some(leader), 0 | 1) => leader,
                _ => NODES[self.rng.below(3) as usize],
            };
            let others: Vec<u64> = NODES.iter().copied().filter(|n| *n != victim).collect();
            if self.rng.chance(700) {
                for other in others {
                    self.cut.insert((victim.min(other), victim.max(other)));
                }
            } else {
                let other = others[self.rng.below(2) as usize];
                self.cut.insert((victim.min(other), victim.max(other)));
            }
            self.heal_at = self.now + self.rng.between(100, 1_200);
            self.stats.partitions += 1;
        }
        if self.rng.chance(3) {
            let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].replica.is_some()).collect();
            if self.rng.chance(100) {
                // All of them at once (review C2 #6).
                for i in up {
                    let down = self.rng.between(20, 300);
                    self.crash(i, down)?;
                }
            } else if up.len() == NODES.len() {
                let i = up[self.rng.below(up.len() as u64) as usize];
                let down = self.rng.between(20, 800);
                self.crash(i, down)?;
            }
        }
        Ok(())
    }

    fn linked(&self, a: u64, b: u64) -> bool {
        !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn send(&mut self, from: u64, messages: Vec<Message>) {
        for message in messages {
            let lost = !self.linked(from, message.to) || self.rng.chance(self.drop_per_mille);
            if lost {
                if message.get_msg_type() == MessageType::MsgSnapshot {
                    self.report_snapshot(from, message.to, false);
                }
                continue;
            }
            let copies = if self.rng.chance(self.dup_per_mille) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now + self.rng.between(1, self.max_delay_ms);
                self.net_seq += 1;
                self.net.push(InFlight { at, seq: self.net_seq, message: message.clone() });
            }
        }
    }

    fn report_snapshot(&mut self, from: u64, to: u64, delivered: bool) {
        if let Some(replica) = self.nodes[(from - 1) as usize].replica.as_mut() {
            replica.report_snapshot(to, delivered);
        }
    }

    fn deliver(&mut self) -> Check {
        let (mut due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.net).into_iter().partition(|m| m.at <= self.now);
        self.net = rest;
        due.sort_by_key(|m| (m.at, m.seq));
        for InFlight { message, .. } in due {
            let (from, to) = (message.from, message.to);
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            // A partition that began while the message was in flight drops it too.
            let up = self.nodes[(to - 1) as usize].replica.is_some();
            if !self.linked(from, to) || !up {
                if snapshot {
                    self.report_snapshot(from, to, false);
                }
                continue;
            }
            if snapshot {
                self.stats.snapshots_installed += 1;
            }
            let replica = self.nodes[(to - 1) as usize].replica.as_mut().expect("checked up");
            replica.step(message).map_err(|e| format!("replica {to} refused a message from {from}: {e}"))?;
            if snapshot {
                self.report_snapshot(from, to, true);
            }
        }
        Ok(())
    }

    /// Ticks, expiry, Ready handling and invariant checks for every replica that is up.
    fn run_replicas(&mut self) -> Check {
        for i in 0..self.nodes.len() {
            if self.nodes[i].replica.is_none() && self.now >= self.nodes[i].down_until {
                self.start(i)?;
            }
            let now = self.now;
            let node = &mut self.nodes[i];
            let t = node.time(now);
            let Some(replica) = node.replica.as_mut() else { continue };
            while node.next_tick <= now {
                replica.tick();
                node.next_tick += TICK_MS;
            }
            replica.maybe_expire(t).map_err(|e| format!("replica {}: expiry: {e}", node.id))?;
            // A Ready can leave another behind it (entries that became committed once persisted).
            let mut messages = Vec::new();
            for _ in 0..8 {
                if !replica.has_ready() {
                    break;
                }
                replica.handle_ready(t).map_err(|e| format!("replica {}: {e}", node.id))?;
                messages.extend(replica.take_messages());
            }
            let from = node.id;
            self.send(from, messages);
            self.flush(i)?;
        }
        Ok(())
    }

    /// The replica's outcomes go back to the workers that asked; then the checks.
    fn flush(&mut self, i: usize) -> Check {
        let Some(replica) = self.nodes[i].replica.as_mut() else { return Ok(()) };
        let outcomes = replica.take_outcomes();
        let id = replica.id();
        for outcome in outcomes {
            if outcome.index == 0 {
                self.stats.lost_proposals += 1;
            }
            let Some(w) =
                self.workers.iter().position(|w| w.asked.as_ref().is_some_and(|a| a.node == id && a.id == outcome.id))
            else {
                continue; // the leader's own ExpireLeases, or a request its worker gave up on
            };
            // The reply may be lost on its way back: the worker times out and retries.
            if self.rng.chance(self.drop_per_mille / 2) {
                continue;
            }
            let asked = self.workers[w].asked.take().expect("matched");
            self.on_reply(w, &asked, outcome.index, outcome.result.map(|a| a.reply))?;
        }
        self.check_replica(i)
    }

    fn check_replica(&mut self, i: usize) -> Check {
        let node = &mut self.nodes[i];
        let Some(replica) = node.replica.as_ref() else { return Ok(()) };
        let (id, term) = (replica.id(), replica.term());
        if replica.is_leader() {
            match self.leaders.insert(term, id) {
                Some(other) if other != id => {
                    return Err(format!("two leaders in term {term}: replicas {other} and {id}"));
                }
                None => self.stats.elections += 1,
                _ => {}
            }
        }
        let (index, now_ms) = (replica.applied_index(), replica.state().now_ms());
        if index != node.last_applied.0 {
            if index > node.last_applied.0 && now_ms < node.last_applied.1 {
                return Err(format!(
                    "replica {id}: applied time went back from {} to {now_ms} (index {} to {index})",
                    node.last_applied.1, node.last_applied.0
                ));
            }
            node.last_applied = (index, now_ms);
            let digest = replica.state().digest();
            match self.digests.get(&index) {
                Some(&(first, by)) if first != digest => {
                    return Err(format!(
                        "replicas {by} and {id} applied different states at index {index} (digests {first:x} and \
                         {digest:x})"
                    ));
                }
                Some(_) => {}
                None => {
                    self.digests.insert(index, (digest, id));
                }
            }
        }
        // No acknowledged completion lost: every replica that applied it still has it as the accepted one.
        for ack in &self.acks {
            if ack.index <= index {
                let accepted = replica.state().accepted(ack.task).map_err(|e| e.to_string())?;
                if accepted.map(|a| a.attempt) != Some(ack.attempt) {
                    return Err(format!(
                        "replica {id} at index {index} lost the acknowledged completion of {} attempt {} (applied at \
                         index {}): it has {:?}",
                        ack.task,
                        ack.attempt,
                        ack.index,
                        accepted.map(|a| a.attempt)
                    ));
                }
            }
        }
        Ok(())
    }

    fn on_reply(&mut self, w: usize, asked: &Asked, index: u64, result: Result<Reply, Error>) -> Check {
        let now = self.now;
        let worker = &mut self.workers[w];
        let reply = match result {
            Ok(reply) => reply,
            Err(Error::NotLeader { leader }) => {
                worker.target = leader.unwrap_or_else(|| NODES[self.rng.below(3) as usize]);
                worker.next_at = now + 10;
                return Ok(());
            }
            Err(Error::Unavailable { .. }) => {
                worker.next_at = now + 10;
                return Ok(());
            }
            Err(e) => return Err(format!("{} ({}) was refused: {e}", worker.name, asked.what)),
        };
        match (reply, worker.doing.clone()) {
            (Reply::Registered { worker_id, .. }, _) => {
                worker.id = Some(worker_id);
                worker.doing = Doing::Idle;
            }
            (Reply::Lease(lease), _) => match lease {
                Lease::Task { task_id, attempt, .. } | Lease::GangRank { task_id, attempt, .. } => {
                    let (gang, rank) = match lease {
                        Lease::GangRank { rank, .. } => (true, rank),
                        _ => (false, 0),
                    };
                    let me = worker.id.clone().expect("leased to a registered worker");
                    if let Some(other) = self.leased.insert((task_id, attempt, rank), me.clone())
                        && other != me
                    {
                        return Err(format!(
                            "{task_id} attempt {attempt} rank {rank} was leased to {other} and to {me}"
                        ));
                    }
                    let done_at = now + self.rng.between(50, 400);
                    let worker = &mut self.workers[w];
                    worker.doing =
                        Doing::Working { task: task_id, attempt, gang, joined: false, done_at, last_beat: now };
                }
                Lease::RetryAfter { ms, .. } => worker.next_at = now + ms.min(200),
                Lease::RunFinished => worker.doing = Doing::Finished,
                Lease::RunFailed { reason } => return Err(format!("the run failed: {reason}")),
            },
            (Reply::GangReady { .. }, Doing::Working { task, attempt, gang, done_at, last_beat, .. }) => {
                worker.doing = Doing::Working { task, attempt, gang, joined: true, done_at, last_beat };
            }
            (Reply::GangWaiting { .. }, _) => worker.next_at = now + 50,
            (Reply::Accepted { task_id, attempt }, _) => {
                self.acked(task_id, attempt, index)?;
                self.workers[w].doing = Doing::Idle;
            }
            (Reply::Fenced(Fenced::AlreadyDone { accepted_attempt }), Doing::Working { task, attempt, .. })
                if asked.what == "complete" && accepted_attempt == attempt =>
            {
                // A retried completion whose first try committed: acknowledged now.
                self.acked(task, attempt, index)?;
                self.workers[w].doing = Doing::Idle;
            }
            (Reply::Fenced(Fenced::GangNotStarted), _) => worker.next_at = now + 50,
            (Reply::Fenced(_), _) => worker.doing = Doing::Idle,
            (Reply::RankFinished { .. } | Reply::Returned { .. }, _) => worker.doing = Doing::Idle,
            (Reply::LeaseExtended { .. } | Reply::Alive, _) => {}
            (other, doing) => return Err(format!("{} ({}) got {other:?} while {doing:?}", worker.name, asked.what)),
        }
        Ok(())
    }

    fn acked(&mut self, task: TaskId, attempt: u32, index: u64) -> Check {
        if let Some(&other) = self.accepted.get(&task)
            && other != attempt
        {
            return Err(format!("{task}: attempts {other} and {attempt} were both acknowledged as accepted"));
        }
        self.accepted.insert(task, attempt);
        self.acks.push(Ack { task, attempt, index });
        self.stats.acks += 1;
        Ok(())
    }

    /// Each worker with nothing in flight does its next thing; a request unanswered for too long is
    /// given up on (its outcome unknown) and the worker tries another replica.
    fn run_workers(&mut self) -> Check {
        for w in 0..self.workers.len() {
            if let Some(asked) = &self.workers[w].asked {
                if self.now < asked.at + REQUEST_TIMEOUT_MS {
                    continue;
                }
                let worker = &mut self.workers[w];
                worker.asked = None;
                worker.target = NODES[self.rng.below(3) as usize];
            }
            let worker = &self.workers[w];
            if self.now < worker.next_at || worker.doing == Doing::Finished {
                continue;
            }
            let (request, what) = match self.next_request(w) {
                Some(next) => next,
                None => continue,
            };
            let node = self.workers[w].target;
            let t = self.nodes[(node - 1) as usize].time(self.now);
            let Some(replica) = self.nodes[(node - 1) as usize].replica.as_mut() else {
                // Connection refused: try another.
                let worker = &mut self.workers[w];
                worker.target = NODES[self.rng.below(3) as usize];
                worker.next_at = self.now + 20;
                continue;
            };
            match replica.propose(request, t) {
                Ok(id) => self.workers[w].asked = Some(Asked { node, id, at: self.now, what }),
                Err(Error::NotLeader { leader }) => {
                    let worker = &mut self.workers[w];
                    worker.target = leader.unwrap_or_else(|| NODES[self.rng.below(3) as usize]);
                    worker.next_at = self.now + if leader.is_some() { 1 } else { 30 };
                }
                Err(Error::Unavailable { .. }) => self.workers[w].next_at = self.now + 30,
                Err(e) => return Err(format!("proposing {what}: {e}")),
            }
        }
        Ok(())
    }

    fn next_request(&mut self, w: usize) -> Option<(Request, &'static str)> {
        let now = self.now;
        let restart = self.rng.chance(2);
        let fail = self.rng.chance(3);
        let worker = &mut self.workers[w];
        let resources = Resources { device: "cpu".into(), memory_bytes: 1 << 30, cached_models: vec![] };
        let Some(worker_id) = worker.id.clone() else {
            return Some((Request::Register { name: worker.name.clone(), resources }, "register"));
        };
        if restart && matches!(worker.doing, Doing::Working { .. }) {
            // The worker's process restarts under its id: it loses its lease.
            worker.doing = Doing::Idle;
            let command = register_command(worker_id, worker.name.clone(), resources, 0, String::new());
            return Some((Request::Command(command), "re-register"));
        }
        let command = match worker.doing.clone() {
            Doing::Unregistered | Doing::Finished => return None,
            Doing::Idle => Command::LeaseTask { worker_id, now_ms: 0 },
            Doing::Working { task, attempt, gang, joined, done_at, last_beat } => {
                if gang && !joined {
                    let endpoint = format!("{}:1", worker.name);
                    Command::JoinGang { worker_id, task_id: task, attempt, endpoint, now_ms: 0 }
                } else if fail {
                    worker.doing = Doing::Idle;
                    let error = "object store unreachable".into();
                    Command::FailTask {
                        worker_id,
                        task_id: task,
                        attempt,
                        error,
                        released: false,
                        retryable: true,
                        now_ms: 0,
                    }
                } else if now >= done_at {
                    let output = Output {
                        key: format!("runs/sim/{task}.attempt-{attempt}"),
                        sha256: format!("{:064x}", attempt),
                        records: 1,
                        tokens: 1,
                    };
                    return Some((
                        Request::Command(Command::CompleteTask {
                            worker_id,
                            task_id: task,
                            attempt,
                            output,
                            now_ms: 0,
                        }),
                        "complete",
                    ));
                } else if now >= last_beat + 150 {
                    worker.doing = Doing::Working { task, attempt, gang, joined, done_at, last_beat: now };
                    let lease = Some(LeaseRef { task_id: task, attempt });
                    Command::Heartbeat { worker_id, lease, progress: Progress { done: 0, total: 1 }, now_ms: 0 }
                } else {
                    return None;
                }
            }
        };
        let what = match &command {
            Command::LeaseTask { .. } => "lease",
            Command::JoinGang { .. } => "join",
            Command::FailTask { .. } => "fail",
            _ => "heartbeat",
        };
        Some((Request::Command(command), what))
    }

    fn step(&mut self) -> Check {
        self.nemesis()?;
        self.deliver()?;
        self.run_workers()?;
        self.run_replicas()?;
        self.now += STEP_MS;
        Ok(())
    }

    fn finished(&self) -> bool {
        let replicas: Vec<&Replica> = self.nodes.iter().filter_map(|n| n.replica.as_ref()).collect();
        replicas.len() == NODES.len()
            && self.workers.iter().all(|w| w.doing == Doing::Finished)
            && replicas.iter().all(|r| *r.state().status() == RunStatus::Finished)
            && replicas.iter().all(|r| r.applied_index() == replicas[0].applied_index())
    }

    fn run(&mut self) -> Check {
        while !self.finished() {
            if self.now > FINISH_BY_MS {
                let status: Vec<String> = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.replica.as_ref())
                    .map(|r| {
                        format!(
                            "{}: {:?} term {} applied {} {:?}",
                            r.id(),
                            r.role(),
                            r.term(),
                            r.applied_index(),
                            r.state().status()
                        )
                    })
                    .collect();
                let workers: Vec<String> = self.workers.iter().map(|w| format!("{}: {:?}", w.name, w.doing)).collect();
                return Err(format!(
                    "the run did not finish {FINISH_BY_MS} ms after the start ({} ms after the faults stopped): \
                     replicas [{}], workers [{}]",
                    FINISH_BY_MS - FAULT_MS,
                    status.join("; "),
                    workers.join("; ")
                ));
            }
            self.step()?;
        }
        // Every task accepted exactly once, and that is what every replica has.
        let state = self.nodes[0].replica.as_ref().expect("all up").state();
        let plan = state.plan().clone();
        for index in 0..plan.total_tasks() {
            let task = plan.task_id(index);
            let accepted = state.accepted(task).map_err(|e| e.to_string())?.map(|a| a.attempt);
            if accepted.is_none() {
                return Err(format!("the run finished with {task} not accepted"));
            }
            if let Some(&acked) = self.accepted.get(&task)
                && Some(acked) != accepted
            {
                return Err(format!("{task}: attempt {acked} was acknowledged but {accepted:?} is the accepted one"));
            }
        }
        for i in 0..self.nodes.len() {
            self.check_replica(i)?;
        }
        Ok(())
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let root = tempfile::Builder::new().prefix("iro-raft-sim-").tempdir_in(base).map_err(|e| e.to_string())?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, root.path())?;
        let result = sim.run();
        result.map(|()| sim.stats).map_err(|e| format!("at {} ms: {e}", sim.now))
    }));
    match outcome {
        Ok(result) => result.map_err(|e| format!("seed {seed}: {e}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!("seed {seed}: panicked: {message}"))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn three_replicas_under_partitions_drops_and_crashes_agree_and_lose_no_acknowledged_completion() {
    let seeds: Vec<u64> = match env_u64("IRO_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("IRO_SIM_SEEDS").unwrap_or(500)).collect(),
    };
    let next = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let totals = Mutex::new(Stats::default());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(seeds.len().max(1));
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&seed) = seeds.get(i) else { break };
                    match run_seed(seed) {
                        Ok(stats) => {
                            let mut t = totals.lock().unwrap();
                            t.crashes += stats.crashes;
                            t.partitions += stats.partitions;
                            t.elections += stats.elections;
                            t.snapshots_installed += stats.snapshots_installed;
                            t.lost_proposals += stats.lost_proposals;
                            t.acks += stats.acks;
                        }
                        Err(e) => failures.lock().unwrap().push((seed, e)),
                    }
                }
            });
        }
    });
    let totals = *totals.lock().unwrap();
    eprintln!("raft simulation: {} seeds in {:.1} s: {totals:?}", seeds.len(), started.elapsed().as_secs_f64());
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    if let Some((seed, _)) = failures.first() {
        let listed: Vec<String> = failures.iter().take(10).map(|(_, e)| e.clone()).collect();
        panic!(
            "{} of {} seeds failed:\n{}\nreplay one with: IRO_SIM_SEED={seed} cargo test -p iro-coordinator --lib \
             raft::tests::sim -- --nocapture",
            failures.len(),
            seeds.len(),
            listed.join("\n")
        );
    }
    if seeds.len() >= 50 {
        assert!(totals.crashes > 0 && totals.partitions > 0 && totals.snapshots_installed > 0, "{totals:?}");
        assert!(totals.elections > seeds.len() as u64, "too few elections: {totals:?}");
    }
}
