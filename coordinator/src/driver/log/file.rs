//! The command log on disk: segments of checksummed records, snapshots of the run state, a writer lock
//! and the meta file that pins the run. Layout of a state folder:
//!
//! ```text
//! LOCK                        held (File::try_lock) by the one coordinator writing here; holds its pid
//! meta.json                   format, run id, plan, sha256 of the run config
//! wal/{first:020}.seg         segment: header + records of entries first, first+1, ... (`record`)
//! snap/{index:020}.snap       snapshot: a JSON header line (format, index, length, CRC-32), then the
//!                             JSON of {index, run_id, state: RunState}
//! ```
//!
//! A segment is cut at every snapshot (and at 64 MiB), so whole segments fall behind snapshots.
//!
//! The last two snapshots are kept, and segments are deleted once the older of them covers them, so a
//! snapshot that fails its checksum on restart falls back to the one before and the segments after it.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{self, Kind, ReadError, SegmentReader};
use super::{CommandLog, FORMAT, Loaded, META_FILE, Meta, Recovered, SnapshotJob, check_meta};
use crate::error::{Error, Result};
use crate::state::{Command, Plan, RunState};

pub const LOCK_FILE: &str = "LOCK";
pub const WAL_DIR: &str = "wal";
pub const SNAP_DIR: &str = "snap";
/// The JSON-lines log of format 1, which this format replaced.
pub const OLD_LOG_FILE: &str = "commands.jsonl";
const SEGMENT_EXT: &str = "seg";
const SNAPSHOT_EXT: &str = "snap";
/// Two: one to restart from, and one to fall back to should that one fail its checksum.
const KEEP_SNAPSHOTS: usize = 2;
/// A segment this long gets no more batches: the next one starts a new segment. Snapshots cut
/// segments far sooner; this bounds them when snapshots are off or keep failing, so that compaction
/// frees space in pieces and a scan of one segment stays short.
const SEGMENT_BYTES: u64 = 64 << 20;

pub(crate) fn storage(path: &Path, e: impl ToString) -> Error {
    Error::Storage { path: path.display().to_string(), message: e.to_string() }
}

pub(crate) fn corrupt(path: &Path, offset: u64, message: impl Into<String>) -> Error {
    Error::CorruptLog { path: path.display().to_string(), offset, message: message.into() }
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    path: PathBuf,
    file: File,
    first_index: u64,
    /// Bytes in the file: its header and every record appended.
    len: u64,
}

/// The command log as fsync'd segment files in a locked state folder.
#[derive(Debug)]
pub struct FileLog {
    dir: PathBuf,
    wal: PathBuf,
    snap: PathBuf,
    run_id: String,
    /// Held open for the life of the log: the OS lock goes with the open file.
    _lock: File,
    active: Option<Active>,
    /// The index the next appended entry gets (entries count from 1).
    next_index: u64,
    loaded: bool,
    /// A snapshot was taken at `next_index - 1`: the next append starts a new segment, so whole
    /// segments fall behind snapshots and can be deleted.
    cut: bool,
    buf: Vec<u8>,
}

impl FileLog {
    /// Opens (or creates) the log in `dir` for run `run_id` with `plan` and a run config hashing to
    /// `config_sha256`. Refuses a folder another coordinator holds, one written for another run, plan
    /// or config (naming what differs), and one in the old JSON-lines format.
    pub fn open(dir: &Path, run_id: &str, plan: &Plan, config_sha256: &str) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let lock = lock(dir)?;
        let meta = Meta {
            format: FORMAT,
            run_id: run_id.to_owned(),
            plan: plan.clone(),
            config_sha256: config_sha256.to_owned(),
        };
        let meta_path = dir.join(META_FILE);
        match fs::read(&meta_path) {
            Ok(bytes) => {
                refuse_old_format(dir, &meta_path, &bytes)?;
                check_meta(&meta_path, &bytes, &meta)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.join(OLD_LOG_FILE).exists() {
                    refuse_old_format(dir, &meta_path, br#"{"format":1}"#)?;
                }
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
        Ok(Self {
            dir: dir.to_owned(),
            wal,
            snap,
            run_id: run_id.to_owned(),
            _lock: lock,
            active: None,
            next_index: 1,
            loaded: false,
            cut: false,
            buf: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment files, oldest first, as (first index, path).
    pub fn segments(&self) -> Result<Vec<(u64, PathBuf)>> {
        list(&self.wal, SEGMENT_EXT)
    }

    /// The snapshot files, oldest first, as (index, path).
    pub fn snapshots(&self) -> Result<Vec<(u64, PathBuf)>> {
        list(&self.snap, SNAPSHOT_EXT)
    }

    /// The newest snapshot that reads back whole; warns about and skips any newer one that does not.
    fn latest_snapshot(&self) -> Result<Option<(u64, RunState)>> {
        for (index, path) in self.snapshots()?.into_iter().rev() {
            match read_snapshot(&path, index, &self.run_id) {
                Ok(state) => return Ok(Some((index, state))),
                Err(why) => tracing::warn!(
                    path = %path.display(),
                    error = %why,
                    "skipping a snapshot that does not read back; falling back to an older one"
                ),
            }
        }
        Ok(None)
    }

    /// Starts a segment for `next_index` and makes its header and folder entry durable.
    fn start_segment(&mut self) -> Result<()> {
        let path = self.wal.join(format!("{:020}.{SEGMENT_EXT}", self.next_index));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| storage(&path, e))?;
        file.write_all(&record::segment_header(FORMAT as u16, self.next_index)).map_err(|e| storage(&path, e))?;
        file.sync_all().map_err(|e| storage(&path, e))?;
        sync_dir(&self.wal)?;
        tracing::debug!(path = %path.display(), first_index = self.next_index, "started a command log segment");
        self.active = Some(Active { path, file, first_index: self.next_index, len: record::SEGMENT_HEADER as u64 });
        Ok(())
    }
}

impl CommandLog for FileLog {
    fn load(&mut self, sink: &mut dyn FnMut(Recovered) -> Result<()>) -> Result<Loaded> {
        remove_temp_files(&self.snap)?;
        let snapshot = self.latest_snapshot()?;
        let base = snapshot.as_ref().map_or(0, |(index, _)| *index);
        if let Some((index, state)) = snapshot {
            sink(Recovered::Snapshot { index, state: Box::new(state) })?;
        }
        let segments = self.segments()?;
        // Segments wholly behind the snapshot are skipped unread (they are deleted as snapshots advance).
        let start = match segments.iter().rposition(|(first, _)| *first <= base + 1) {
            Some(start) => start,
            None if segments.is_empty() => segments.len(),
            None => {
                let (first, path) = &segments[0];
                return Err(corrupt(
                    path,
                    0,
                    format!(
                        "the oldest segment starts at entry {first} but the newest readable snapshot covers \
                         entries up to {base} only: entries {}..{} are lost (a snapshot in {} is missing or \
                         damaged)",
                        base + 1,
                        first - 1,
                        self.snap.display()
                    ),
                ));
            }
        };
        let mut next = segments.get(start).map_or(base + 1, |(first, _)| *first);
        let mut active = None;
        let last = segments.len().saturating_sub(1);
        for (i, (first, path)) in segments.iter().enumerate().skip(start) {
            let is_last = i == last;
            if *first != next {
                return Err(corrupt(
                    path,
                    0,
                    format!("the segment starts at entry {first} but the one before it ends at entry {}", next - 1),
                ));
            }
            let end = match read_segment(path, is_last, base, &mut next, sink)? {
                Some(end) => end,
                None => continue, // a torn, empty last segment: removed
            };
            if is_last {
                active = Some((path.clone(), end, *first));
            }
        }
        // A snapshot can only cover durable entries, so this holds unless segments were lost: then the
        // snapshot is the truth and appending continues after it, in a new segment.
        if next <= base {
            tracing::warn!(snapshot = base, log_ends = next - 1, "the snapshot is ahead of the segments");
            next = base + 1;
            active = None;
        }
        self.next_index = next;
        self.active = match active {
            Some((path, end, first_index)) if first_index <= next => {
                let mut file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| storage(&path, e))?;
                file.seek(SeekFrom::Start(end)).map_err(|e| storage(&path, e))?;
                Some(Active { path, file, first_index, len: end })
            }
            _ => None,
        };
        self.loaded = true;
        Ok(Loaded { snapshot_index: base, last_index: next - 1 })
    }

    fn append(&mut self, commands: &[Command]) -> Result<()> {
        if !self.loaded {
            return Err(storage(&self.dir, "append before load: the log must be read before it is written"));
        }
        if commands.is_empty() {
            return Ok(());
        }
        let start_new = match &self.active {
            None => true,
            // An empty segment is as good as a new one, whatever asked for a cut.
            Some(active) if active.first_index == self.next_index => false,
            Some(active) => self.cut || active.len >= SEGMENT_BYTES,
        };
        if start_new {
            self.start_segment()?;
        }
        self.cut = false;
        self.buf.clear();
        record::encode_entries(&mut self.buf, self.next_index, commands).map_err(|e| storage(&self.wal, e))?;
        let Some(active) = self.active.as_mut() else {
            return Err(storage(&self.wal, "no active segment"));
        };
        active.file.write_all(&self.buf).map_err(|e| storage(&active.path, e))?;
        active.file.sync_data().map_err(|e| storage(&active.path, e))?;
        active.len += self.buf.len() as u64;
        self.next_index += commands.len() as u64;
        Ok(())
    }

    fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    fn entries(&self, range: Range<u64>) -> Result<Vec<Command>> {
        if range.end > self.next_index {
            return Err(storage(
                &self.wal,
                format!("entries {range:?} asked for, but the log ends at entry {}", self.next_index - 1),
            ));
        }
        let mut out = Vec::new();
        if range.is_empty() {
            return Ok(out);
        }
        let segments = self.segments()?;
        let Some(start) = segments.iter().rposition(|(first, _)| *first <= range.start) else {
            let first = segments.first().map_or(self.next_index, |(first, _)| *first);
            return Err(Error::LogCompacted { index: range.start, first });
        };
        for (_, path) in &segments[start..] {
            let mut reader = SegmentReader::open(path, FORMAT as u16).map_err(|e| read_error(path, e))?;
            loop {
                let offset = reader.offset();
                let Some(record) = reader.next_record().map_err(|e| read_error(path, e))? else { break };
                if record.last_index() < range.start {
                    continue;
                }
                if record.first_index >= range.end {
                    return Ok(out);
                }
                for (index, line) in record.lines().map_err(|why| corrupt(path, offset, why))? {
                    if range.contains(&index) {
                        out.push(record::decode(index, line).map_err(|why| corrupt(path, offset, why))?);
                    }
                }
            }
        }
        Ok(out)
    }

    fn begin_snapshot(&mut self, state: RunState) -> Result<SnapshotJob> {
        let index = self.next_index - 1;
        self.cut = true;
        let (snap, wal, run_id) = (self.snap.clone(), self.wal.clone(), self.run_id.clone());
        Ok(SnapshotJob::new(index, move || {
            write_snapshot(&snap, index, &run_id, &state)?;
            prune(&snap, &wal, index)
        }))
    }
}

pub(crate) fn read_error(path: &Path, e: ReadError) -> Error {
    match e {
        ReadError::Io(e) => storage(path, e),
        ReadError::Bad { offset, why } => corrupt(path, offset, why),
    }
}

/// Streams one segment's records into `sink` (entries after `base` only), advancing `next`. Returns the
/// end of the good records; None for a last segment whose header was torn (it is removed). In the last
/// segment a bad record with no good one after it is the tail torn by a crash: it is cut off. Anywhere
/// else a bad record is corruption.
fn read_segment(
    path: &Path,
    is_last: bool,
    base: u64,
    next: &mut u64,
    sink: &mut dyn FnMut(Recovered) -> Result<()>,
) -> Result<Option<u64>> {
    let mut reader = match SegmentReader::open(path, FORMAT as u16) {
        Ok(reader) => reader,
        Err(ReadError::Bad { why, .. })
            if is_last && fs::metadata(path).map_err(|e| storage(path, e))?.len() <= record::SEGMENT_HEADER as u64 =>
        {
            // A crash while the segment was being created, before any entry went into it.
            tracing::warn!(path = %path.display(), error = %why, "removing a command log segment torn while it was created");
            fs::remove_file(path).map_err(|e| storage(path, e))?;
            return Ok(None);
        }
        Err(e) => return Err(read_error(path, e)),
    };
    if reader.first_index() != *next {
        return Err(corrupt(
            path,
            0,
            format!("the segment header says it starts at entry {}, its name says {next}", reader.first_index()),
        ));
    }
    loop {
        let offset = reader.offset();
        let record = match reader.next_record() {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Some(offset)),
            Err(ReadError::Io(e)) => return Err(storage(path, e)),
            Err(ReadError::Bad { offset, why }) => {
                let file_len = reader.file_len();
                drop(reader);
                return cut_torn_tail(path, is_last, offset, file_len, &why).map(Some);
            }
        };
        if record.kind != Kind::Entries || record.first_index != *next {
            return Err(corrupt(
                path,
                offset,
                format!("the record holds entries from {} but entry {next} comes next", record.first_index),
            ));
        }
        for (index, line) in record.lines().map_err(|why| corrupt(path, offset, why))? {
            if index > base {
                let command = record::decode(index, line).map_err(|why| corrupt(path, offset, why))?;
                sink(Recovered::Entry { index, command })?;
            }
        }
        *next += u64::from(record.count);
    }
}

/// Decides what a bad record at `offset` is, and cuts it off if it is a torn tail.
pub(crate) fn cut_torn_tail(path: &Path, is_last: bool, offset: u64, file_len: u64, why: &str) -> Result<u64> {
    if !is_last {
        return Err(corrupt(path, offset, format!("{why}, in a segment that later segments follow")));
    }
    if let Some(good) = record::good_record_after(path, offset).map_err(|e| storage(path, e))? {
        return Err(corrupt(
            path,
            offset,
            format!("{why}, and a good record follows at byte {good}: this is damage, not a write torn by a crash"),
        ));
    }
    tracing::warn!(
        path = %path.display(),
        offset,
        dropped_bytes = file_len - offset,
        error = %why,
        "the command log ends in a torn record (a crash mid-write); truncating it: that batch was never acknowledged"
    );
    let file = OpenOptions::new().write(true).open(path).map_err(|e| storage(path, e))?;
    file.set_len(offset).map_err(|e| storage(path, e))?;
    file.sync_all().map_err(|e| storage(path, e))?;
    Ok(offset)
}

/// Takes the folder's writer lock, or says who to stop. The lock is the OS's (flock on Linux), so it
/// goes away with the process however that ends; the pid written into the file only names the holder.
pub(crate) fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    // Not truncated on open: a coordinator refused the lock must still read the holder's pid.
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| storage(&path, e))?;
    match file.try_lock() {
        Ok(()) => {
            let pid = format!("{}\n", std::process::id());
            file.set_len(0).and_then(|()| file.write_all(pid.as_bytes())).map_err(|e| storage(&path, e))?;
            Ok(file)
        }
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
            let holder = holder.map_or_else(|| "an unknown process".to_owned(), |pid| format!("pid {pid}"));
            Err(Error::StateLocked {
                path: dir.display().to_string(),
                message: format!(
                    "another coordinator ({holder}) holds `{}`: stop it first, or give this one its own state \
                     folder",
                    path.display()
                ),
            })
        }
        Err(fs::TryLockError::Error(e)) => Err(storage(&path, format!("cannot lock: {e}"))),
    }
}

/// Format 1 (a JSON-lines `commands.jsonl` without checksums) is refused, not read: a resumed run must
/// not replay a log whose records cannot be checked.
fn refuse_old_format(dir: &Path, meta_path: &Path, meta: &[u8]) -> Result<()> {
    let format = serde_json::from_slice::<serde_json::Value>(meta).ok().and_then(|m| m.get("format")?.as_u64());
    if format == Some(1) || (format.is_none() && dir.join(OLD_LOG_FILE).exists()) {
        return Err(Error::StateMismatch {
            path: meta_path.display().to_string(),
            message: format!(
                "this state folder holds a format-1 command log (`{}`, JSON lines without checksums) that this \
                 coordinator no longer reads: finish that run with the iro version that started it, or start \
                 the run afresh in a new state folder (or after moving this one away)",
                dir.join(OLD_LOG_FILE).display()
            ),
        });
    }
    Ok(())
}

/// The first line of a snapshot file: what the body after it must be.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    format: u32,
    index: u64,
    bytes: u64,
    crc32: u32,
}

#[derive(Serialize)]
struct SnapshotBodyRef<'a> {
    index: u64,
    run_id: &'a str,
    state: &'a RunState,
}

#[derive(Deserialize)]
struct SnapshotBody {
    index: u64,
    run_id: String,
    state: RunState,
}

fn snapshot_path(snap: &Path, index: u64) -> PathBuf {
    snap.join(format!("{index:020}.{SNAPSHOT_EXT}"))
}

/// Serializes the state twice, once to checksum it and once into the file, rather than holding its
/// JSON in memory beside it: the header needs the checksum first, and a snapshot is rare.
fn write_snapshot(snap: &Path, index: u64, run_id: &str, state: &RunState) -> Result<()> {
    let path = snapshot_path(snap, index);
    write_checked_json(snap, &path, FORMAT, index, &SnapshotBodyRef { index, run_id, state }, true)
}

/// Writes `body` durably to `path` in the snapshot file format: a JSON header line (`format`, `index`,
/// the body's length and CRC-32), then the body's JSON. Shared with the Raft log's snapshots. `fsync`
/// false skips the syncs (the Raft simulation's disk, which models durability itself), never the rename.
pub(crate) fn write_checked_json(
    dir: &Path,
    path: &Path,
    format: u32,
    index: u64,
    body: &impl Serialize,
    fsync: bool,
) -> Result<()> {
    let mut sum = Crc32Writer { inner: std::io::sink(), hasher: crc32fast::Hasher::new(), bytes: 0 };
    serde_json::to_writer(&mut sum, body).map_err(|e| storage(path, e))?;
    let header = SnapshotHeader { format, index, bytes: sum.bytes, crc32: sum.hasher.finalize() };
    write_file_with(dir, path, fsync, |file| {
        let mut out = Crc32Writer { inner: BufWriter::new(file), hasher: crc32fast::Hasher::new(), bytes: 0 };
        serde_json::to_writer(&mut out.inner, &header)?;
        out.inner.write_all(b"\n")?;
        serde_json::to_writer(&mut out, body)?;
        // Serialization is deterministic (no hash maps in the state); this only guards that claim.
        if (out.bytes, out.hasher.finalize()) != (header.bytes, header.crc32) {
            return Err(std::io::Error::other("the state serialized differently twice"));
        }
        out.inner.flush()
    })
}

/// Checksums and counts what is written through it.
struct Crc32Writer<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Crc32Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The longest header line a snapshot can have; past it, the file is not a snapshot.
const MAX_SNAPSHOT_HEADER: usize = 4096;

/// The state in a snapshot file, or why it cannot be trusted.
fn read_snapshot(path: &Path, index: u64, run_id: &str) -> std::result::Result<RunState, String> {
    let body: SnapshotBody = read_checked_json(path, FORMAT, index)?;
    if body.index != index || body.run_id != run_id {
        return Err(format!("it is of run `{}` at index {}", body.run_id, body.index));
    }
    Ok(body.state)
}

/// The body of a file `write_checked_json` wrote, or why it cannot be trusted. Streams the body into the
/// parser while checksumming it, so memory is the body itself, not the body plus its JSON.
pub(crate) fn read_checked_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    format: u32,
    index: u64,
) -> std::result::Result<T, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut head = vec![0u8; MAX_SNAPSHOT_HEADER.min(file_len as usize)];
    file.read_exact(&mut head).map_err(|e| e.to_string())?;
    let split = head.iter().position(|b| *b == b'\n').ok_or("no header line")?;
    let header: SnapshotHeader =
        serde_json::from_slice(&head[..split]).map_err(|e| format!("the header line does not parse: {e}"))?;
    if header.format != format {
        return Err(format!("snapshot format {}, this build reads format {format}", header.format));
    }
    let body_len = file_len - split as u64 - 1;
    if header.index != index || body_len != header.bytes {
        return Err(format!(
            "the header says index {} and {} bytes; the file is named for {index} and holds {body_len}",
            header.index, header.bytes
        ));
    }
    file.seek(SeekFrom::Start(split as u64 + 1)).map_err(|e| e.to_string())?;
    let mut body = BufReader::new(Crc32Reader { inner: file, hasher: crc32fast::Hasher::new() });
    let parsed = serde_json::from_reader::<_, T>(&mut body);
    // The checksum decides, not the parser: a damaged body may parse, or fail to with a misleading error.
    std::io::copy(&mut body, &mut std::io::sink()).map_err(|e| e.to_string())?;
    if body.into_inner().hasher.finalize() != header.crc32 {
        return Err("the body fails its checksum".into());
    }
    parsed.map_err(|e| format!("the body does not parse: {e}"))
}

/// Checksums what is read through it.
struct Crc32Reader<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc32Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// After the snapshot at `index` is durable: keeps the newest snapshots and deletes the older ones,
/// and the segments the oldest kept snapshot covers. Deleting only after the write (never before) is
/// what keeps a failed snapshot from losing entries (review B4).
fn prune(snap: &Path, wal: &Path, index: u64) -> Result<()> {
    let snapshots = list(snap, SNAPSHOT_EXT)?;
    let keep_from = snapshots.len().saturating_sub(KEEP_SNAPSHOTS);
    for (_, path) in &snapshots[..keep_from] {
        fs::remove_file(path).map_err(|e| storage(path, e))?;
    }
    let mut deleted = 0;
    if snapshots.len() >= KEEP_SNAPSHOTS {
        let oldest_kept = snapshots[keep_from].0;
        let segments = list(wal, SEGMENT_EXT)?;
        // A segment's last entry is the one before the next segment's first.
        for pair in segments.windows(2) {
            if pair[1].0 <= oldest_kept + 1 {
                fs::remove_file(&pair[0].1).map_err(|e| storage(&pair[0].1, e))?;
                deleted += 1;
            }
        }
    }
    tracing::info!(index, deleted_segments = deleted, "wrote a run state snapshot and compacted the command log");
    Ok(())
}

/// Files `{number:020}.{ext}` in `dir`, sorted by number.
pub(crate) fn list(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))? {
        let path = entry.map_err(|e| storage(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        if let Some(number) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

/// A crash mid-write leaves `*.tmp` files behind; they were never renamed into place, so never used.
pub(crate) fn remove_temp_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| storage(dir, e))? {
        let path = entry.map_err(|e| storage(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("tmp") {
            fs::remove_file(&path).map_err(|e| storage(&path, e))?;
        }
    }
    Ok(())
}

/// Temp file, fsync, rename, fsync the folder: the file is either absent or whole after a crash.
pub(crate) fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    write_durably_with(dir, path, |file| file.write_all(bytes))
}

/// `write_durably` with the content written by `write`.
pub(crate) fn write_durably_with(
    dir: &Path,
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    write_file_with(dir, path, true, write)
}

/// `write_durably_with`, the syncs skipped unless `fsync`.
fn write_file_with(
    dir: &Path,
    path: &Path,
    fsync: bool,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp).and_then(|mut file| {
        write(&mut file)?;
        if fsync { file.sync_all() } else { Ok(()) }
    });
    written.map_err(|e| storage(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| storage(path, e))?;
    if fsync { sync_dir(dir) } else { Ok(()) }
}

/// A new or renamed file survives a crash only once its folder entry is on disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| storage(dir, e))
}
