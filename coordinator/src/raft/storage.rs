//! `raft::Storage` on the command log's on-disk format: the same checksummed segment records
//! (`driver::log::record`, record kinds `RaftEntries`, `HardState` and `SnapshotInstalled`) and the same
//! checksummed snapshot files (`driver::log::file::write_checked_json`), in a state folder of its own:
//!
//! ```text
//! LOCK                          held by the one replica writing here (the command log's lock)
//! raft.json                     format, this replica's Raft id and the voters it was started with
//! wal/{seq:020}.seg             segments, numbered in the order written; header + records
//! snap/{index:020}.snap         snapshots: header line, then {index, term, conf_state, data}
//! ```
//!
//! Raft reads only from memory: the entries after the latest snapshot, the HardState and the ConfState,
//! which compaction keeps small. Writes go to the active segment, and `sync` makes them durable: the
//! replica calls it before it sends any message that promises what was written (review B3). A record
//! for index i replaces every entry read before it from i on, so a follower whose log its leader
//! overwrites only appends. On restart the newest snapshot that reads back is loaded, then every
//! segment's records in order; only the last segment may end in a torn record (the unsynced tail a
//! crash left half written), which is cut off; anything else bad is refused as corruption. (In this
//! log a record's payload is protobuf, not JSON text, so the command log's argument that no record can
//! hide inside another's payload holds only by its CRC-32: a false "good record after the bad one"
//! needs a forged checksum, and would refuse the log rather than misread it.)
//!
//! Snapshots: `create_snapshot` writes the applied state durably first, and only then drops entries
//! from memory (keeping a tail for slow followers) and deletes what the older of the two kept snapshots
//! covers, so a failed snapshot never loses entries (review B4). Every segment starts with the current
//! HardState, so deleting old segments never loses the latest one.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::driver::log::file::{
    corrupt, cut_torn_tail, list, lock, read_checked_json, remove_temp_files, storage, sync_dir, write_checked_json,
    write_durably,
};
use crate::driver::log::record::{self, Kind, ReadError, SegmentReader};
use crate::error::{Error, Result};

/// 3: the Raft log. (The command log's segments are format 2; each refuses the other's.)
pub const RAFT_FORMAT: u32 = 3;
pub const RAFT_META_FILE: &str = "raft.json";
const WAL_DIR: &str = "wal";
const SNAP_DIR: &str = "snap";
const SEGMENT_EXT: &str = "seg";
const SNAPSHOT_EXT: &str = "snap";
/// One to restart from and one to fall back to, as in the command log.
const KEEP_SNAPSHOTS: usize = 2;
/// The next write starts a new segment once the active one is this long.
const SEGMENT_BYTES: u64 = 64 << 20;

/// Whether `sync` reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync on every `sync`, and the full temp-file, fsync, rename, folder-fsync dance for new files.
    Fsync,
    /// No fsync at all: the deterministic simulation models durability itself, recording how far each
    /// segment was synced, and `crash` then drops (part of) what was not.
    Simulated,
}

/// What `raft.json` pins: a folder belongs to one replica id of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RaftMeta {
    format: u32,
    id: u64,
    voters: Vec<u64>,
}

/// The body of a snapshot file. `data` is what the replica put in the snapshot (the JSON of its
/// applied state), kept verbatim so that what raft sends a follower is exactly what was written.
#[derive(Serialize)]
struct SnapshotFileRef<'a> {
    index: u64,
    term: u64,
    voters: &'a [u64],
    learners: &'a [u64],
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct SnapshotFile {
    index: u64,
    term: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    data: Box<RawValue>,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// The highest entry index any record in it names (a snapshot marker names its index).
    max_index: u64,
}

#[derive(Debug)]
struct Active {
    file: File,
    path: PathBuf,
    len: u64,
    /// How much of the file a `sync` has made durable (what `crash` keeps in `Durability::Simulated`).
    synced: u64,
}

/// The Raft log of one replica on disk, with what raft reads kept in memory.
#[derive(Debug)]
pub struct RaftStorage {
    dir: PathBuf,
    wal: PathBuf,
    snap: PathBuf,
    durability: Durability,
    _lock: File,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest durable snapshot (index 0: none yet).
    snapshot: Snapshot,
    /// Entries `first_index()..=last_index()`, contiguous.
    entries: Vec<Entry>,
    /// Every segment on disk, oldest first; the last is the active one once it is open.
    segments: Vec<Segment>,
    active: Option<Active>,
    /// The next write starts a new segment (after a snapshot, so that old segments fall behind it).
    cut: bool,
    next_seq: u64,
    buf: Vec<u8>,
    /// Raft asked for a snapshot newer than the latest (`snapshot`): the replica should take one.
    snapshot_wanted: Cell<u64>,
    /// `crash` was called: nothing more is written.
    crashed: bool,
}

impl RaftStorage {
    /// Opens (or creates) the Raft log in `dir` for replica `id` of a cluster whose voters are `voters`,
    /// and loads it: the newest readable snapshot, then every segment's records. Refuses a folder another
    /// process holds, one of another replica id, and a log that is corrupt anywhere but its torn tail.
    pub fn open(dir: &Path, id: u64, voters: &[u64], durability: Durability) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let lock = lock(dir)?;
        let meta = RaftMeta { format: RAFT_FORMAT, id, voters: voters.to_vec() };
        let meta_path = dir.join(RAFT_META_FILE);
        match fs::read(&meta_path) {
            Ok(bytes) => {
                let found: RaftMeta = serde_json::from_slice(&bytes).map_err(|e| Error::StateMismatch {
                    path: meta_path.display().to_string(),
                    message: format!("{RAFT_META_FILE} does not parse: {e}"),
                })?;
                if found.format != RAFT_FORMAT || found.id != id {
                    return Err(Error::StateMismatch {
                        path: meta_path.display().to_string(),
                        message: format!(
                            "the folder holds the Raft log of replica {} (format {}), not of replica {id} (format \
                             {RAFT_FORMAT}): give each replica its own state folder",
                            found.id, found.format
                        ),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let text = serde_json::to_vec_pretty(&meta).map_err(|e| storage(&meta_path, e))?;
                write_durably(dir, &meta_path, &text)?;
            }
            Err(e) => return Err(storage(&meta_path, e)),
        }
        let (wal, snap) = (dir.join(WAL_DIR), dir.join(SNAP_DIR));
        for sub in [&wal, &snap] {
            if !sub.exists() {
                fs::create_dir(sub).map_err(|e| storage(sub, e))?;
                sync_dir(dir)?;
            }
        }
        remove_temp_files(&snap)?;
        let mut conf_state = ConfState::default();
        conf_state.set_voters(voters.to_vec());
        let mut this = Self {
            dir: dir.to_owned(),
            wal,
            snap,
            durability,
            _lock: lock,
            hard_state: HardState::default(),
            conf_state,
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            segments: Vec::new(),
            active: None,
            cut: true,
            next_seq: 1,
            buf: Vec::new(),
            snapshot_wanted: Cell::new(0),
            crashed: false,
        };
        this.load()?;
        Ok(this)
    }

    fn load(&mut self) -> Result<()> {
        for (index, path) in list(&self.snap, SNAPSHOT_EXT)?.into_iter().rev() {
            match read_snapshot(&path, index) {
                Ok(snapshot) => {
                    self.conf_state = snapshot.get_metadata().get_conf_state().clone();
                    self.snapshot = snapshot;
                    break;
                }
                Err(why) => tracing::warn!(
                    path = %path.display(),
                    error = %why,
                    "skipping a Raft snapshot that does not read back; falling back to an older one"
                ),
            }
        }
        let base = self.snapshot.get_metadata().index;
        let segments = list(&self.wal, SEGMENT_EXT)?;
        let last = segments.len().saturating_sub(1);
        for (i, (seq, path)) in segments.into_iter().enumerate() {
            let max_index = self.read_segment(&path, i == last, base)?;
            self.next_seq = seq + 1;
            self.segments.push(Segment { seq, path, max_index });
        }
        // Entries a snapshot covers are committed and applied: raft reads them from the snapshot now.
        self.entries.retain(|e| e.index > base);
        if let Some(first) = self.entries.first()
            && first.index != base + 1
        {
            return Err(corrupt(
                &self.wal,
                0,
                format!(
                    "the log resumes at entry {} but the newest readable snapshot covers entries up to {base} only: \
                     entries {}..{} are lost (a snapshot in {} is missing or damaged)",
                    first.index,
                    base + 1,
                    first.index - 1,
                    self.snap.display()
                ),
            ));
        }
        // The snapshot holds committed entries only; the commit index may have been written after it
        // without a sync, so it may read back lower.
        let last_index = self.last_index_inner();
        let commit = self.hard_state.commit.max(base);
        if commit > last_index {
            tracing::warn!(commit, last_index, "the Raft commit index read back beyond the log; lowering it");
        }
        self.hard_state.commit = commit.min(last_index);
        self.hard_state.term = self.hard_state.term.max(self.snapshot.get_metadata().term);
        tracing::info!(
            dir = %self.dir.display(),
            snapshot_index = base,
            last_index,
            term = self.hard_state.term,
            commit = self.hard_state.commit,
            "loaded the Raft log"
        );
        Ok(())
    }

    /// Replays one segment's records into memory; returns the highest index it names.
    fn read_segment(&mut self, path: &Path, is_last: bool, base: u64) -> Result<u64> {
        let mut reader = match SegmentReader::open(path, RAFT_FORMAT as u16) {
            Ok(reader) => reader,
            Err(ReadError::Bad { why, .. })
                if is_last
                    && fs::metadata(path).map_err(|e| storage(path, e))?.len() <= record::SEGMENT_HEADER as u64 =>
            {
                tracing::warn!(path = %path.display(), error = %why, "a Raft log segment torn while it was created; emptying it");
                let file = OpenOptions::new().write(true).open(path).map_err(|e| storage(path, e))?;
                file.set_len(0).map_err(|e| storage(path, e))?;
                return Ok(0);
            }
            Err(ReadError::Io(e)) => return Err(storage(path, e)),
            Err(ReadError::Bad { offset, why }) => return Err(corrupt(path, offset, why)),
        };
        let mut max_index = 0;
        loop {
            let offset = reader.offset();
            let record = match reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(max_index),
                Err(ReadError::Io(e)) => return Err(storage(path, e)),
                Err(ReadError::Bad { offset, why }) => {
                    let file_len = reader.file_len();
                    drop(reader);
                    cut_torn_tail(path, is_last, offset, file_len, &why)?;
                    return Ok(max_index);
                }
            };
            let bad = |why: String| corrupt(path, offset, why);
            match record.kind {
                Kind::RaftEntries => {
                    let first = record.first_index;
                    let last = self.last_index_inner().max(base);
                    if first > last + 1 {
                        return Err(bad(format!("the record holds entries from {first} but the log ends at {last}")));
                    }
                    self.entries.retain(|e| e.index < first);
                    for (index, bytes) in record.frames().map_err(bad)? {
                        let entry = Entry::parse_from_bytes(bytes)
                            .map_err(|e| bad(format!("Raft entry {index} does not decode: {e}")))?;
                        if entry.index != index {
                            return Err(bad(format!("the record's entry {index} says it is entry {}", entry.index)));
                        }
                        self.entries.push(entry);
                    }
                    max_index = max_index.max(record.last_index());
                }
                Kind::HardState => {
                    self.hard_state = HardState::parse_from_bytes(record.payload())
                        .map_err(|e| bad(format!("the Raft HardState does not decode: {e}")))?;
                }
                Kind::SnapshotInstalled => {
                    let index = record.first_index;
                    if index > base {
                        return Err(bad(format!(
                            "a snapshot at entry {index} was installed here, but the newest snapshot in {} that \
                             reads back is at {base}",
                            self.snap.display()
                        )));
                    }
                    self.entries.clear();
                    max_index = max_index.max(index);
                }
                Kind::Entries => return Err(bad("a command log record in a Raft log segment".into())),
            }
        }
    }

    fn last_index_inner(&self) -> u64 {
        self.entries.last().map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    fn first_index_inner(&self) -> u64 {
        self.entries.first().map_or(self.snapshot.get_metadata().index + 1, |e| e.index)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The latest durable snapshot (index 0: none).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Entries kept in memory (for tests and status).
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The index raft asked a snapshot for that is newer than the latest one (0: none asked).
    pub fn snapshot_wanted(&self) -> u64 {
        self.snapshot_wanted.get()
    }

    /// Writes `self.buf` to the active segment (starting one first if needed); not yet durable.
    fn write_buf(&mut self) -> Result<()> {
        if self.crashed {
            return Err(storage(&self.wal, "the simulated disk crashed"));
        }
        let start_new = self.cut || self.active.as_ref().is_none_or(|a| a.len >= SEGMENT_BYTES);
        if start_new {
            let pending = std::mem::take(&mut self.buf);
            self.start_segment()?;
            self.buf = pending;
        }
        let Some(active) = self.active.as_mut() else {
            return Err(storage(&self.wal, "no active Raft log segment"));
        };
        active.file.write_all(&self.buf).map_err(|e| storage(&active.path, e))?;
        active.len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Closes the active segment (synced: only the last segment may be torn) and starts the next one,
    /// opening with the current HardState so deleting older segments never loses it.
    fn start_segment(&mut self) -> Result<()> {
        self.sync()?;
        let seq = self.next_seq;
        let path = self.wal.join(format!("{seq:020}.{SEGMENT_EXT}"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| storage(&path, e))?;
        let mut head = record::segment_header(RAFT_FORMAT as u16, self.last_index_inner() + 1).to_vec();
        if self.hard_state != HardState::default() {
            let bytes = self.hard_state.write_to_bytes().map_err(|e| storage(&path, e))?;
            record::encode_record(&mut head, Kind::HardState, 0, 1, &bytes);
        }
        file.write_all(&head).map_err(|e| storage(&path, e))?;
        if self.durability == Durability::Fsync {
            file.sync_all().map_err(|e| storage(&path, e))?;
            sync_dir(&self.wal)?;
        }
        tracing::debug!(path = %path.display(), "started a Raft log segment");
        let len = head.len() as u64;
        self.active = Some(Active { file, path: path.clone(), len, synced: len });
        self.segments.push(Segment { seq, path, max_index: 0 });
        self.next_seq = seq + 1;
        self.cut = false;
        Ok(())
    }

    /// Appends `entries` (contiguous, from at most `last_index() + 1`): those from the first one's index
    /// on replace what was there. Not durable until `sync`.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        let (first, last) = (first.index, self.last_index_inner());
        let snapshot_index = self.snapshot.get_metadata().index;
        if first > last + 1 || first <= snapshot_index {
            return Err(storage(
                &self.wal,
                format!("entries from {first} appended to a log of entries {}..={last}", self.first_index_inner()),
            ));
        }
        let mut frames = Vec::with_capacity(entries.len());
        for entry in entries {
            frames.push(entry.write_to_bytes().map_err(|e| storage(&self.wal, e))?);
        }
        record::encode_frames(&mut self.buf, Kind::RaftEntries, first, frames.iter().map(Vec::as_slice))
            .map_err(|e| storage(&self.wal, e))?;
        self.write_buf()?;
        let max = entries[entries.len() - 1].index;
        if let Some(segment) = self.segments.last_mut() {
            segment.max_index = segment.max_index.max(max);
        }
        self.entries.truncate((first - self.first_index_inner()) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Records a new HardState. Not durable until `sync`.
    pub fn set_hard_state(&mut self, hard_state: HardState) -> Result<()> {
        if hard_state == self.hard_state {
            return Ok(());
        }
        let bytes = hard_state.write_to_bytes().map_err(|e| storage(&self.wal, e))?;
        record::encode_record(&mut self.buf, Kind::HardState, 0, 1, &bytes);
        self.write_buf()?;
        self.hard_state = hard_state;
        Ok(())
    }

    /// Records a higher commit index (a LightReady's). Needs no sync of its own: a lost commit index is
    /// learned again from the leader.
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        self.set_hard_state(hard_state)
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<()> {
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        if active.synced == active.len {
            return Ok(());
        }
        if self.durability == Durability::Fsync {
            active.file.sync_data().map_err(|e| storage(&active.path, e))?;
        }
        active.synced = active.len;
        Ok(())
    }

    /// Installs a snapshot received from the leader: durable in the snapshot folder first, then marked
    /// in the log, after which every entry before it is gone. The marker is durable at the next `sync`
    /// (a Ready with a snapshot always asks for one); a crash before that restarts from the old log, and
    /// the leader sends the snapshot again.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        if index <= self.snapshot.get_metadata().index {
            return Ok(());
        }
        self.write_snapshot_file(&snapshot)?;
        record::encode_record(&mut self.buf, Kind::SnapshotInstalled, index, 0, &term.to_le_bytes());
        self.write_buf()?;
        if let Some(segment) = self.segments.last_mut() {
            segment.max_index = segment.max_index.max(index);
        }
        self.entries.clear();
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.hard_state.term = self.hard_state.term.max(term);
        self.snapshot = snapshot;
        self.prune()?;
        Ok(())
    }

    /// Makes `data` (the applied state at entry `index`) the latest snapshot, durably, then drops the
    /// entries before `index - keep_tail` from memory and deletes the files the older kept snapshot
    /// covers. The next write starts a new segment, so that whole segments fall behind snapshots.
    pub fn create_snapshot(&mut self, index: u64, data: Vec<u8>, keep_tail: u64) -> Result<()> {
        let snapshot_index = self.snapshot.get_metadata().index;
        if index <= snapshot_index {
            return Ok(());
        }
        let term = raft::Storage::term(self, index)
            .map_err(|e| storage(&self.snap, format!("cannot snapshot at entry {index}: its term is unknown ({e})")))?;
        if index > self.hard_state.commit {
            return Err(storage(
                &self.snap,
                format!(
                    "cannot snapshot at entry {index}: only entries up to {} are committed",
                    self.hard_state.commit
                ),
            ));
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.write_snapshot_file(&snapshot)?;
        self.snapshot = snapshot;
        if self.snapshot_wanted.get() <= index {
            self.snapshot_wanted.set(0);
        }
        self.compact(index.saturating_sub(keep_tail) + 1)?;
        self.cut = true;
        self.prune()?;
        Ok(())
    }

    /// Drops the entries before `compact_index` from memory (never past the latest snapshot).
    pub fn compact(&mut self, compact_index: u64) -> Result<()> {
        let limit = self.snapshot.get_metadata().index + 1;
        let compact_index = compact_index.min(limit);
        let first = self.first_index_inner();
        if compact_index <= first {
            return Ok(());
        }
        let drop = ((compact_index - first) as usize).min(self.entries.len());
        self.entries.drain(..drop);
        Ok(())
    }

    fn write_snapshot_file(&self, snapshot: &Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        let path = self.snap.join(format!("{:020}.{SNAPSHOT_EXT}", meta.index));
        let data = std::str::from_utf8(snapshot.get_data())
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .ok_or_else(|| storage(&path, "the snapshot's data is not JSON"))?;
        let body = SnapshotFileRef {
            index: meta.index,
            term: meta.term,
            voters: meta.get_conf_state().get_voters(),
            learners: meta.get_conf_state().get_learners(),
            data,
        };
        write_checked_json(&self.snap, &path, RAFT_FORMAT, meta.index, &body, self.durability == Durability::Fsync)
    }

    /// Keeps the newest snapshots and deletes older ones, and the oldest segments whose every record the
    /// oldest kept snapshot covers (a prefix: a later segment's records may replace an earlier one's).
    fn prune(&mut self) -> Result<()> {
        let snapshots = list(&self.snap, SNAPSHOT_EXT)?;
        let keep_from = snapshots.len().saturating_sub(KEEP_SNAPSHOTS);
        for (_, path) in &snapshots[..keep_from] {
            fs::remove_file(path).map_err(|e| storage(path, e))?;
        }
        if snapshots.len() < KEEP_SNAPSHOTS {
            return Ok(());
        }
        let covered = snapshots[keep_from].0;
        let active = self.segments.len().saturating_sub(1);
        let deletable = self.segments[..active].iter().take_while(|s| s.max_index <= covered).count();
        for segment in self.segments.drain(..deletable) {
            fs::remove_file(&segment.path).map_err(|e| storage(&segment.path, e))?;
        }
        if deletable > 0 {
            tracing::debug!(deleted_segments = deletable, covered, "compacted the Raft log");
        }
        Ok(())
    }

    /// The simulation's crash: what a `sync` did not make durable is lost, all of it or a prefix of
    /// `keep(unsynced_bytes)` bytes (a write torn mid-record). Only in `Durability::Simulated`. The
    /// storage refuses every write after it; drop it (and its lock) and `open` the folder again.
    pub fn crash(&mut self, keep: impl FnOnce(u64) -> u64) -> Result<()> {
        if self.durability != Durability::Simulated {
            return Err(storage(&self.dir, "only a simulated disk can be crashed"));
        }
        if let Some(active) = self.active.take() {
            let unsynced = active.len - active.synced;
            let kept = active.synced + keep(unsynced).min(unsynced);
            active.file.set_len(kept).map_err(|e| storage(&active.path, e))?;
        }
        self.crashed = true;
        Ok(())
    }

    /// The segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// The sequence number of the active segment, if one is open.
    pub fn active_segment(&self) -> Option<u64> {
        self.active.as_ref().and(self.segments.last().map(|s| s.seq))
    }
}

fn read_snapshot(path: &Path, index: u64) -> std::result::Result<Snapshot, String> {
    let body: SnapshotFile = read_checked_json(path, RAFT_FORMAT, index)?;
    if body.index != index {
        return Err(format!("it holds the snapshot at entry {}", body.index));
    }
    let mut snapshot = Snapshot::default();
    snapshot.set_data(body.data.get().as_bytes().to_vec().into());
    let mut meta = SnapshotMetadata::default();
    meta.set_index(body.index);
    meta.set_term(body.term);
    let mut conf_state = ConfState::default();
    conf_state.set_voters(body.voters);
    conf_state.set_learners(body.learners);
    meta.set_conf_state(conf_state);
    snapshot.set_metadata(meta);
    Ok(snapshot)
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.first_index_inner();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index_inner() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        let first = self.first_index_inner();
        if index < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index_inner() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - first) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_inner())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_inner())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index || self.snapshot.get_metadata().index == 0 {
            // The replica takes one after its next apply; raft asks again.
            self.snapshot_wanted.set(request_index.max(1));
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}
