//! The Raft log on disk (review B3/B4): what a crash leaves, what a restart reads back, what
//! compaction keeps.

use std::fs::{self, OpenOptions};
use std::path::Path;

use raft::Storage as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, StorageError};

use crate::raft::storage::{Durability, RaftStorage};

const VOTERS: [u64; 3] = [1, 2, 3];

fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry::default();
    e.set_index(index);
    e.set_term(term);
    e.set_data(format!(r#"{{"v":1,"i":{index},"t":{term}}}"#).into_bytes().into());
    e
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    let mut hs = HardState::default();
    hs.set_term(term);
    hs.set_vote(vote);
    hs.set_commit(commit);
    hs
}

fn open(dir: &Path, durability: Durability) -> RaftStorage {
    RaftStorage::open(dir, 1, &VOTERS, durability).unwrap()
}

fn read(store: &RaftStorage, low: u64, high: u64) -> Vec<Entry> {
    store.entries(low, high, None, GetEntriesContext::empty(false)).unwrap()
}

fn all(store: &RaftStorage) -> Vec<Entry> {
    let (first, last) = (store.first_index().unwrap(), store.last_index().unwrap());
    read(store, first, last + 1)
}

fn data(n: u64) -> Vec<u8> {
    format!(r#"{{"v":1,"state":{n}}}"#).into_bytes()
}

#[test]
fn a_fresh_log_starts_empty_with_the_static_voters() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Durability::Fsync);
    let state = store.initial_state().unwrap();
    assert_eq!(state.conf_state.get_voters(), &VOTERS);
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (1, 0));
    assert_eq!(store.term(0).unwrap(), 0);
}

#[test]
fn a_torn_tail_is_dropped_whole_and_what_was_synced_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Simulated);
    store.append(&entries(1..=3, 1)).unwrap();
    store.set_hard_state(hard_state(1, 1, 2)).unwrap();
    store.sync().unwrap();
    store.append(&entries(4..=6, 1)).unwrap();
    store.set_hard_state(hard_state(2, 2, 3)).unwrap();
    // Half of what was not synced reached the disk: the second batch's record is cut mid-way.
    store.crash(|unsynced| unsynced / 2).unwrap();
    drop(store);

    let store = open(dir.path(), Durability::Simulated);
    assert_eq!(all(&store), entries(1..=3, 1), "the torn batch is dropped whole, the synced one kept");
    assert_eq!(store.hard_state(), &hard_state(1, 1, 2));

    // A write torn on a real file (cut with `set_len`) reads back the same way, and the file is cut there.
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    store.append(&entries(1..=2, 1)).unwrap();
    store.sync().unwrap();
    store.append(&entries(3..=4, 1)).unwrap();
    store.sync().unwrap();
    let segment = store.segment_paths().pop().unwrap();
    drop(store);
    let len = fs::metadata(&segment).unwrap().len();
    OpenOptions::new().write(true).open(&segment).unwrap().set_len(len - 3).unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    assert_eq!(all(&store), entries(1..=2, 1));
    assert!(fs::metadata(&segment).unwrap().len() < len - 3, "the torn record was truncated away");
    // Appending goes on where the log now ends.
    store.append(&entries(3..=3, 2)).unwrap();
    store.sync().unwrap();
    drop(store);
    assert_eq!(all(&open(dir.path(), Durability::Fsync)), [entries(1..=2, 1), entries(3..=3, 2)].concat());
}

#[test]
fn damage_before_the_tail_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    store.append(&entries(1..=2, 1)).unwrap();
    store.sync().unwrap();
    store.append(&entries(3..=4, 1)).unwrap();
    store.sync().unwrap();
    let segment = store.segment_paths().pop().unwrap();
    drop(store);
    let mut bytes = fs::read(&segment).unwrap();
    // A byte inside the first entries record (after the 20-byte header and the 8-byte record header).
    bytes[20 + 8 + 20] ^= 0xff;
    fs::write(&segment, bytes).unwrap();
    let error = RaftStorage::open(dir.path(), 1, &VOTERS, Durability::Fsync).unwrap_err();
    assert_eq!(error.kind(), "corrupt_log", "{error}");
    assert!(error.to_string().contains("good record follows"), "{error}");
}

#[test]
fn restart_reproduces_entries_hard_state_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    store.append(&entries(1..=8, 1)).unwrap();
    store.set_hard_state(hard_state(1, 1, 5)).unwrap();
    store.sync().unwrap();
    store.create_snapshot(5, data(5), 2).unwrap();
    // A new leader overwrites the uncommitted suffix from entry 7 on.
    store.append(&entries(7..=9, 2)).unwrap();
    store.set_hard_state(hard_state(2, 3, 8)).unwrap();
    store.sync().unwrap();
    let expected = (all(&store), store.hard_state().clone(), store.latest_snapshot().clone());
    assert_eq!(expected.0, [entries(4..=6, 1), entries(7..=9, 2)].concat(), "the tail behind the snapshot is kept");
    drop(store);

    let store = open(dir.path(), Durability::Fsync);
    // A restart reads entries from the snapshot on: those it covers come from the snapshot.
    assert_eq!(all(&store), [entries(6..=6, 1), entries(7..=9, 2)].concat());
    assert_eq!(store.hard_state(), &expected.1);
    assert_eq!(store.latest_snapshot(), &expected.2);
    assert_eq!(store.latest_snapshot().get_data(), data(5).as_slice());
    assert_eq!(store.term(5).unwrap(), 1, "the snapshot's term still answers");
    assert_eq!(store.term(8).unwrap(), 2);
    assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 5);
    assert_eq!(store.initial_state().unwrap().conf_state.get_voters(), &VOTERS);
}

#[test]
fn compaction_keeps_what_raft_still_needs_and_deletes_what_two_snapshots_cover() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    for batch in 0..10 {
        store.append(&entries(batch * 10 + 1..=batch * 10 + 10, 1)).unwrap();
    }
    store.set_hard_state(hard_state(1, 1, 100)).unwrap();
    store.sync().unwrap();
    assert!(store.create_snapshot(101, data(101), 0).is_err(), "no snapshot of uncommitted entries");

    store.create_snapshot(60, data(60), 10).unwrap();
    assert_eq!(store.first_index().unwrap(), 51, "a tail of 10 stays behind the snapshot");
    assert_eq!(store.term(60).unwrap(), 1);
    assert_eq!(store.term(55).unwrap(), 1);
    assert!(matches!(store.term(50), Err(raft::Error::Store(StorageError::Compacted))));
    assert!(matches!(
        store.entries(40, 60, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(read(&store, 51, 101).len(), 50);
    let first_segments = store.segment_paths();
    assert!(first_segments.iter().all(|p| p.exists()), "one snapshot alone deletes no segment");

    store.append(&entries(101..=120, 1)).unwrap();
    store.set_hard_state(hard_state(1, 1, 120)).unwrap();
    store.sync().unwrap();
    store.create_snapshot(110, data(110), 5).unwrap();
    assert!(first_segments[0].exists(), "kept while the older of the two snapshots does not cover it");
    assert_eq!(store.snapshot(0, 2).unwrap().get_metadata().index, 110);
    // A peer that asks for a newer snapshot than there is gets "later", and the replica is told to take one.
    assert!(matches!(store.snapshot(115, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
    assert_eq!(store.snapshot_wanted(), 115);

    store.append(&entries(121..=125, 1)).unwrap();
    store.set_hard_state(hard_state(1, 1, 125)).unwrap();
    store.sync().unwrap();
    store.create_snapshot(120, data(120), 5).unwrap();
    assert_eq!(store.snapshot_wanted(), 0, "the wanted snapshot was taken");
    assert!(!first_segments[0].exists(), "segments the older kept snapshot covers are deleted");
    assert_eq!(fs::read_dir(dir.path().join("snap")).unwrap().count(), 2, "two snapshots are kept");
    drop(store);

    let store = open(dir.path(), Durability::Fsync);
    assert_eq!(store.latest_snapshot().get_metadata().index, 120);
    assert_eq!(store.latest_snapshot().get_data(), data(120).as_slice());
    assert_eq!(all(&store), entries(121..=125, 1));
    assert_eq!(store.hard_state().commit, 125);
}

#[test]
fn a_snapshot_from_the_leader_replaces_the_log_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), Durability::Fsync);
    store.append(&entries(1..=10, 1)).unwrap();
    store.set_hard_state(hard_state(1, 1, 3)).unwrap();
    store.sync().unwrap();
    let mut snapshot = Snapshot::default();
    snapshot.set_data(data(50).into());
    snapshot.mut_metadata().index = 50;
    snapshot.mut_metadata().term = 3;
    let mut conf = ConfState::default();
    conf.set_voters(VOTERS.to_vec());
    snapshot.mut_metadata().set_conf_state(conf);
    store.apply_snapshot(snapshot.clone()).unwrap();
    store.append(&entries(51..=52, 3)).unwrap();
    store.set_hard_state(hard_state(3, 2, 50)).unwrap();
    store.sync().unwrap();
    assert_eq!(all(&store), entries(51..=52, 3));
    drop(store);

    let store = open(dir.path(), Durability::Fsync);
    assert_eq!(store.latest_snapshot(), &snapshot);
    assert_eq!(all(&store), entries(51..=52, 3), "the stale entries 1..=10 stay dropped");
    assert_eq!(store.term(50).unwrap(), 3);
    assert_eq!(store.hard_state(), &hard_state(3, 2, 50));
}

#[test]
fn a_folder_of_another_replica_or_held_by_another_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Durability::Fsync);
    let held = RaftStorage::open(dir.path(), 1, &VOTERS, Durability::Fsync).unwrap_err();
    assert_eq!(held.kind(), "state_locked", "{held}");
    drop(store);
    let other = RaftStorage::open(dir.path(), 2, &VOTERS, Durability::Fsync).unwrap_err();
    assert_eq!(other.kind(), "state_mismatch", "{other}");
    assert!(other.to_string().contains("replica 1"), "{other}");
}
