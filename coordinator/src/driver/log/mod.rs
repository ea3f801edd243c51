//! The command log: every applied command, made durable before its caller hears back, so a restarted
//! coordinator rebuilds the same run state from the latest snapshot and the entries after it. A narrow
//! trait (like raft-rs's `Storage`) so Raft can take it over as its storage later (review B3/B4):
//! entries are numbered from 1, appended in order, read back by index range, and dropped once a durable
//! snapshot covers them; the record framing has a kind byte, so Raft's HardState becomes one more kind.
//! `FileLog` (`file`) keeps it in a locked state folder as checksummed segments (`record`) beside
//! snapshots; `MemoryLog` is its in-memory twin for tests and benchmarks.

pub(crate) mod file;
pub(crate) mod record;

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::state::{Command, Plan, RunState};

pub use file::{FileLog, LOCK_FILE, OLD_LOG_FILE, SNAP_DIR, WAL_DIR};

/// What `load` streams into the driver, in order: at most one snapshot, then the entries after it.
#[derive(Debug)]
pub enum Recovered {
    /// The run state as of entry `index` (boxed: it is far larger than an entry, and comes once).
    Snapshot {
        index: u64,
        state: Box<RunState>,
    },
    Entry {
        index: u64,
        command: Command,
    },
}

/// Where a loaded log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loaded {
    /// The index the snapshot it started from covers (0: none, replayed from the first entry).
    pub snapshot_index: u64,
    /// The last durable entry (0: none).
    pub last_index: u64,
}

/// Writes a snapshot of the state at `index` and then compacts what it covers. The driver runs it on
/// the blocking pool, so serializing and fsyncing a large state never holds up the command path.
pub struct SnapshotJob {
    index: u64,
    write: Box<dyn FnOnce() -> Result<()> + Send>,
}

impl SnapshotJob {
    pub fn new(index: u64, write: impl FnOnce() -> Result<()> + Send + 'static) -> Self {
        Self { index, write: Box::new(write) }
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    /// Makes the snapshot durable, then drops what it covers; returns its index.
    pub fn run(self) -> Result<u64> {
        (self.write)()?;
        Ok(self.index)
    }
}

pub trait CommandLog: Send + 'static {
    /// Streams everything durable into `sink`, one item at a time (memory stays bounded by the state,
    /// not the history), and readies the log for appends. Called once, when the driver starts.
    fn load(&mut self, sink: &mut dyn FnMut(Recovered) -> Result<()>) -> Result<Loaded>;

    /// Appends `commands` in order, as entries `last_index()+1..`, and returns only once they are
    /// durable. After an error an unknown prefix of them may be stored; the driver then stops taking
    /// commands.
    fn append(&mut self, commands: &[Command]) -> Result<()>;

    /// The last durable entry's index (0: none).
    fn last_index(&self) -> u64;

    /// Entries `range` (by index), read back from storage; `Error::LogCompacted` for ones a snapshot
    /// has replaced.
    fn entries(&self, range: Range<u64>) -> Result<Vec<Command>>;

    /// Starts a snapshot of `state`, which must be the state after entry `last_index()`: cheap here
    /// (later appends go to a new segment), the IO is in the returned job.
    fn begin_snapshot(&mut self, state: RunState) -> Result<SnapshotJob>;
}

#[derive(Debug, Default)]
struct Memory {
    snapshot: Option<(u64, RunState)>,
    /// Entries dropped behind the snapshot: `entries[0]` is entry `compacted + 1`.
    compacted: u64,
    entries: Vec<Command>,
}

/// Shares its entries between clones, so a test can "restart" a driver on the same log. Keeps one
/// snapshot: memory cannot be torn or corrupted, so there is nothing to fall back from.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    inner: Arc<Mutex<Memory>>,
    /// Makes every append fail, to test what the driver does when it cannot persist.
    fail_appends: Arc<std::sync::atomic::AtomicBool>,
}

fn poisoned() -> Error {
    Error::Storage { path: "memory".into(), message: "log mutex poisoned".into() }
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries still stored (those after the snapshot, once one compacted the log).
    pub fn entries(&self) -> Vec<Command> {
        self.inner.lock().map(|m| m.entries.clone()).unwrap_or_default()
    }

    /// The index of the snapshot, if one was taken.
    pub fn snapshot_index(&self) -> Option<u64> {
        self.inner.lock().ok().and_then(|m| m.snapshot.as_ref().map(|(index, _)| *index))
    }

    pub fn fail_appends(&self, fail: bool) {
        self.fail_appends.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl CommandLog for MemoryLog {
    fn load(&mut self, sink: &mut dyn FnMut(Recovered) -> Result<()>) -> Result<Loaded> {
        let memory = self.inner.lock().map_err(|_| poisoned())?;
        let mut loaded = Loaded::default();
        if let Some((index, state)) = &memory.snapshot {
            sink(Recovered::Snapshot { index: *index, state: Box::new(state.clone()) })?;
            loaded.snapshot_index = *index;
        }
        for (command, index) in memory.entries.iter().zip(memory.compacted + 1..) {
            if index > loaded.snapshot_index {
                sink(Recovered::Entry { index, command: command.clone() })?;
            }
        }
        loaded.last_index = memory.compacted + memory.entries.len() as u64;
        Ok(loaded)
    }

    fn append(&mut self, commands: &[Command]) -> Result<()> {
        if self.fail_appends.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Storage { path: "memory".into(), message: "appends made to fail".into() });
        }
        self.inner.lock().map_err(|_| poisoned())?.entries.extend_from_slice(commands);
        Ok(())
    }

    fn last_index(&self) -> u64 {
        self.inner.lock().map(|m| m.compacted + m.entries.len() as u64).unwrap_or_default()
    }

    fn entries(&self, range: Range<u64>) -> Result<Vec<Command>> {
        let memory = self.inner.lock().map_err(|_| poisoned())?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if range.start <= memory.compacted {
            return Err(Error::LogCompacted { index: range.start, first: memory.compacted + 1 });
        }
        let last = memory.compacted + memory.entries.len() as u64;
        if range.end > last + 1 {
            return Err(Error::Storage {
                path: "memory".into(),
                message: format!("entries {range:?} asked for, but the log ends at entry {last}"),
            });
        }
        let (lo, hi) = ((range.start - memory.compacted - 1) as usize, (range.end - memory.compacted - 1) as usize);
        Ok(memory.entries[lo..hi].to_vec())
    }

    fn begin_snapshot(&mut self, state: RunState) -> Result<SnapshotJob> {
        let index = self.last_index();
        let inner = self.inner.clone();
        Ok(SnapshotJob::new(index, move || {
            let mut memory = inner.lock().map_err(|_| poisoned())?;
            let drop = (index - memory.compacted) as usize;
            memory.entries.drain(..drop);
            memory.compacted = index;
            memory.snapshot = Some((index, state));
            Ok(())
        }))
    }
}

/// The sha256 (hex) of the run config as canonical JSON (object keys sorted), which meta pins: a run
/// resumed with another model, sampling or store config would mix two runs' outputs (review A7 d).
pub fn config_sha256(config: &impl Serialize) -> Result<String> {
    let fail =
        |e: serde_json::Error| Error::Config { field: "run", message: format!("cannot hash the run config: {e}") };
    // Through `Value`, whose maps are sorted, so the hash does not depend on struct field order.
    let value = serde_json::to_value(config).map_err(fail)?;
    let bytes = serde_json::to_vec(&value).map_err(fail)?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// What `meta.json` pins: a log only makes sense replayed against the plan it was written for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    run_id: String,
    plan: Plan,
    /// `config_sha256` of the full run config the log was started with.
    config_sha256: String,
}

/// 2: segments of checksummed records and snapshots. 1 was a JSON-lines `commands.jsonl`.
const FORMAT: u32 = 2;
pub const META_FILE: &str = "meta.json";

fn check_meta(path: &Path, bytes: &[u8], expected: &Meta) -> Result<()> {
    let mismatch = |message: String| Error::StateMismatch { path: path.display().to_string(), message };
    let found: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| mismatch(format!("meta.json does not parse: {e}")))?;
    let want = serde_json::to_value(expected).map_err(|e| mismatch(e.to_string()))?;
    if found == want {
        return Ok(());
    }
    let mut diffs = Vec::new();
    for key in ["format", "run_id"] {
        if found.get(key) != want.get(key) {
            diffs.push(format!("{key} was {} and is now {}", show(found.get(key)), show(want.get(key))));
        }
    }
    if found.get("config_sha256") != want.get("config_sha256") {
        diffs.push(format!(
            "the run config differs from the one the run was started with (config_sha256 was {} and is now {})",
            show(found.get("config_sha256")),
            show(want.get("config_sha256"))
        ));
    }
    if let (Some(serde_json::Value::Object(was)), Some(serde_json::Value::Object(now))) =
        (found.get("plan"), want.get("plan"))
    {
        for (key, value) in now {
            if was.get(key) != Some(value) {
                diffs.push(format!("plan.{key} was {} and is now {value}", show(was.get(key))));
            }
        }
    } else if found.get("plan") != want.get("plan") {
        diffs.push("plan differs".into());
    }
    Err(mismatch(format!(
        "{}; start with the original config, or use a new state folder for a new run",
        diffs.join(", ")
    )))
}

fn show(value: Option<&serde_json::Value>) -> String {
    value.map_or_else(|| "absent".to_owned(), ToString::to_string)
}
