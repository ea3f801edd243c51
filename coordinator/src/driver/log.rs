//! The command log: every applied command, made durable before its caller hears back, so a restarted
//! coordinator replays it into the same run state. A narrow trait (like raft-rs's `Storage`) so Raft
//! can replace the file later; `MemoryLog` is its in-memory twin for tests and benchmarks.
//!
//! The file form is JSON Lines in `{state_dir}/commands.jsonl` beside `{state_dir}/meta.json` (the run
//! id and plan the log belongs to). A crash can leave the last line half written: such a tail was
//! never acknowledged (the fsync comes after the whole batch), so it is cut off with a warning.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::{Command, Plan};

pub trait CommandLog: Send + 'static {
    /// Everything durable so far, in order. Called once, when the driver starts.
    fn load(&mut self) -> Result<Vec<Command>>;

    /// Appends `commands` in order and returns only once they are durable. After an error an unknown
    /// prefix of them may be stored; the driver then stops taking commands.
    fn append(&mut self, commands: &[Command]) -> Result<()>;
}

/// Shares its entries between clones, so a test can "restart" a driver on the same log.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    entries: Arc<Mutex<Vec<Command>>>,
    /// Makes every append fail, to test what the driver does when it cannot persist.
    fail_appends: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn entries(&self) -> Vec<Command> {
        self.entries.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn fail_appends(&self, fail: bool) {
        self.fail_appends.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl CommandLog for MemoryLog {
    fn load(&mut self) -> Result<Vec<Command>> {
        Ok(self.entries())
    }

    fn append(&mut self, commands: &[Command]) -> Result<()> {
        if self.fail_appends.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Storage { path: "memory".into(), message: "appends made to fail".into() });
        }
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| Error::Storage { path: "memory".into(), message: "log mutex poisoned".into() })?;
        entries.extend_from_slice(commands);
        Ok(())
    }
}

/// What `meta.json` pins: a log only makes sense replayed against the plan it was written for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meta {
    format: u32,
    run_id: String,
    plan: Plan,
}

const FORMAT: u32 = 1;
pub const LOG_FILE: &str = "commands.jsonl";
pub const META_FILE: &str = "meta.json";

/// The command log as an fsync'd JSON Lines file.
#[derive(Debug)]
pub struct FileLog {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl FileLog {
    /// Opens (or creates) the log in `dir` for run `run_id` with `plan`; refuses a folder written for
    /// another run or plan, naming what differs.
    pub fn open(dir: &Path, run_id: &str, plan: &Plan) -> Result<Self> {
        let storage = |path: &Path, e: std::io::Error| Error::Storage {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        fs::create_dir_all(dir).map_err(|e| storage(dir, e))?;
        let meta = Meta { format: FORMAT, run_id: run_id.to_owned(), plan: plan.clone() };
        let meta_path = dir.join(META_FILE);
        match fs::read(&meta_path) {
            Ok(bytes) => check_meta(&meta_path, &bytes, &meta)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = dir.join(format!("{META_FILE}.tmp"));
                let text = serde_json::to_vec_pretty(&meta)
                    .map_err(|e| Error::Storage { path: meta_path.display().to_string(), message: e.to_string() })?;
                write_synced(&tmp, &text).map_err(|e| storage(&tmp, e))?;
                fs::rename(&tmp, &meta_path).map_err(|e| storage(&meta_path, e))?;
                sync_dir(dir).map_err(|e| storage(dir, e))?;
            }
            Err(e) => return Err(storage(&meta_path, e)),
        }
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| storage(&path, e))?;
        if !existed {
            sync_dir(dir).map_err(|e| storage(dir, e))?;
        }
        Ok(Self { path, file, buf: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn storage(&self, e: impl ToString) -> Error {
        Error::Storage { path: self.path.display().to_string(), message: e.to_string() }
    }
}

impl CommandLog for FileLog {
    fn load(&mut self) -> Result<Vec<Command>> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0)).map_err(|e| self.storage(e))?;
        self.file.read_to_end(&mut bytes).map_err(|e| self.storage(e))?;
        let parsed = parse_log(&self.path, &bytes)?;
        if parsed.valid_len < bytes.len() {
            tracing::warn!(
                path = %self.path.display(),
                dropped_bytes = bytes.len() - parsed.valid_len,
                kept_commands = parsed.commands.len(),
                "command log ends in a torn line (a crash mid-write); truncating it: that command was never acknowledged"
            );
            self.file.set_len(parsed.valid_len as u64).map_err(|e| self.storage(e))?;
            self.file.sync_all().map_err(|e| self.storage(e))?;
        }
        self.file.seek(SeekFrom::End(0)).map_err(|e| self.storage(e))?;
        Ok(parsed.commands)
    }

    fn append(&mut self, commands: &[Command]) -> Result<()> {
        self.buf.clear();
        for command in commands {
            serde_json::to_writer(&mut self.buf, command).map_err(|e| self.storage(e))?;
            self.buf.push(b'\n');
        }
        self.file.write_all(&self.buf).map_err(|e| self.storage(e))?;
        self.file.sync_data().map_err(|e| self.storage(e))
    }
}

pub(crate) struct Parsed {
    pub commands: Vec<Command>,
    /// Bytes up to the end of the last good line; anything after is a torn tail.
    pub valid_len: usize,
}

/// Splits the log into commands. The last line may be torn (unterminated or unparsable) and is
/// dropped; a bad line with good lines after it is corruption, not a crash, and is an error.
pub(crate) fn parse_log(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let mut commands = Vec::new();
    let mut offset = 0;
    let mut line_no = 0;
    while offset < bytes.len() {
        line_no += 1;
        let Some(len) = bytes[offset..].iter().position(|b| *b == b'\n') else {
            // No newline: the write was cut short before the batch's fsync.
            break;
        };
        let line = &bytes[offset..offset + len];
        let next = offset + len + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            offset = next;
            continue;
        }
        match serde_json::from_slice::<Command>(line) {
            Ok(command) => commands.push(command),
            Err(e) if next >= bytes.len() => {
                tracing::warn!(path = %path.display(), line = line_no, error = %e, "last command log line does not parse");
                break;
            }
            Err(e) => {
                return Err(Error::CorruptLog {
                    path: path.display().to_string(),
                    line: line_no,
                    message: e.to_string(),
                });
            }
        }
        offset = next;
    }
    Ok(Parsed { commands, valid_len: offset })
}

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

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A new or renamed file survives a crash only once its folder entry is on disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
