//! One replica alone (a single voter elects itself): the rules Raft forces on the state machine, each
//! pinned without the network of the simulation.

use crate::error::Error;
use crate::raft::replica::{LocalTime, Replica, ReplicaConfig, Request};
use crate::raft::storage::{Durability, RaftStorage};
use crate::state::{Command, Plan, Reply, Resources, WorkerId};

const WALL0: u64 = 1_700_000_000_000;

fn at(mono_ms: u64, wall_ms: u64) -> LocalTime {
    LocalTime { mono_ms, wall_ms }
}

fn plan() -> Plan {
    Plan { worker_timeout_ms: 3_000, ..Plan::new(1, 2, 1, 1) }
}

/// A single-voter replica ticked until it leads, at local time `t`.
fn leader(dir: &std::path::Path, t: LocalTime) -> Replica {
    leader_with(dir, t, ReplicaConfig::new(1))
}

fn leader_with(dir: &std::path::Path, t: LocalTime, mut config: ReplicaConfig) -> Replica {
    let storage = RaftStorage::open(dir, 1, &[1], Durability::Simulated).unwrap();
    config.fixed_election_tick = Some(10);
    let mut replica = Replica::open(config, storage, plan()).unwrap();
    for _ in 0..40 {
        replica.tick();
        drain(&mut replica, t);
        if replica.is_leader() {
            return replica;
        }
    }
    panic!("a single voter did not elect itself");
}

fn drain(replica: &mut Replica, t: LocalTime) {
    while replica.has_ready() {
        replica.handle_ready(t).unwrap();
    }
    assert!(replica.take_messages().is_empty(), "a single voter has no one to send to");
}

fn register(replica: &mut Replica, t: LocalTime) -> crate::raft::ProposalId {
    let request = Request::Register { name: "w".into(), resources: Resources::default() };
    replica.propose(request, t).unwrap()
}

#[test]
fn registrations_in_flight_together_get_distinct_worker_ids_assigned_in_apply() {
    let dir = tempfile::tempdir().unwrap();
    let t = at(0, WALL0);
    let mut replica = leader(dir.path(), t);
    let (a, b) = (register(&mut replica, t), register(&mut replica, t));
    drain(&mut replica, t);
    let outcomes = replica.take_outcomes();
    let id_of = |id| match &outcomes.iter().find(|o| o.id == id).unwrap().result {
        Ok(applied) => match &applied.reply {
            Reply::Registered { worker_id, .. } => worker_id.clone(),
            other => panic!("{other:?}"),
        },
        Err(e) => panic!("{e}"),
    };
    assert_eq!((id_of(a), id_of(b)), (WorkerId::new("w-0001"), WorkerId::new("w-0002")));
}

#[test]
fn the_leader_stamps_time_from_its_election_and_a_fast_wall_clock_pulls_it_only_a_little() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = leader(dir.path(), at(500, WALL0));
    let lead = ReplicaConfig::new(1).max_clock_lead_ms;
    // Elected with the state at time 0: the steady time is the monotonic time since the election.
    assert_eq!(replica.leader_now(at(1_500, 0)), 1_000, "a wall clock behind does not stop time");
    assert_eq!(replica.leader_now(at(1_500, WALL0 + 3_600_000)), 1_000 + lead, "an hour fast moves it by the bound");
    assert_eq!(replica.leader_now(at(1_500, 1_200)), 1_200, "a wall clock a little ahead is followed");

    // The applied time never goes back: a command stamped earlier applies at the state's time.
    let t = at(2_000, WALL0);
    register(&mut replica, t);
    drain(&mut replica, t);
    let applied = replica.state().now_ms();
    assert_eq!(applied, 1_500 + lead);
    assert!(replica.leader_now(at(2_000, 0)) >= applied);
}

#[test]
fn a_new_leader_proposes_no_expiry_during_its_grace_and_a_follower_refuses_proposals() {
    let dir = tempfile::tempdir().unwrap();
    // Wall clocks at 0: the leader's time is then its monotonic time since the election.
    let t = at(0, 0);
    let mut config = ReplicaConfig::new(1);
    config.election_grace_ms = Some(5_000);
    let mut replica = leader_with(dir.path(), t, config);
    let worker = register(&mut replica, t);
    drain(&mut replica, t);
    assert!(replica.take_outcomes().iter().any(|o| o.id == worker && o.result.is_ok()));
    let quiet = replica.quiet_until_ms();
    assert_eq!(quiet, 5_000, "no expiry for the grace after the election");
    // The worker is silent past its 3 s timeout, but within the grace nothing is proposed.
    assert_eq!(replica.state().next_deadline_ms(), Some(3_000));
    assert_eq!(replica.maybe_expire(at(quiet - 1, 0)).unwrap(), None);
    let expire = replica.maybe_expire(at(quiet + 1, 0)).unwrap().expect("due after the grace");
    assert_eq!(replica.maybe_expire(at(quiet + 2, 0)).unwrap(), None, "one ExpireLeases in flight at most");
    drain(&mut replica, at(quiet + 2, 0));
    let outcomes = replica.take_outcomes();
    let expired = outcomes.iter().find(|o| o.id == expire).unwrap();
    assert!(
        matches!(&expired.result, Ok(applied) if matches!(&applied.reply, Reply::Expired { dead_workers, .. } if dead_workers.len() == 1)),
        "{expired:?}"
    );

    // Restarted, the replica is a follower until it wins again: it refuses, naming no leader yet.
    drop(replica);
    let storage = RaftStorage::open(dir.path(), 1, &[1], Durability::Simulated).unwrap();
    let mut follower = Replica::open(ReplicaConfig::new(1), storage, plan()).unwrap();
    let refused = follower.propose(Request::Command(Command::ExpireLeases { now_ms: 0 }), t).unwrap_err();
    assert!(matches!(refused, Error::NotLeader { leader: None }), "{refused}");
    // Its state comes back from the log: the worker registered, and declared dead by the expiry.
    while follower.has_ready() {
        follower.handle_ready(t).unwrap();
    }
    let w1 = follower.state().worker(&WorkerId::new("w-0001")).expect("replayed");
    assert!(!w1.alive);
}
