//! proto ↔ run-state mapping, in one place. Requests are checked field by field *before* anything reaches
//! the driver, so a malformed request is answered `invalid_argument` naming the field and applies nothing;
//! replies map back to responses, with a fenced report as a normal answer carrying its `Fence`.
//!
//! Every string a worker sends is checked at the door (review A12, A14): ids, names and the device are one
//! line of bounded length with no control character; a failure message or abort reason may also hold
//! line breaks and tabs (an error chain, a backtrace) and is longer; an output key is a relative object key
//! that cannot climb out of the run's prefix; a gang endpoint is a ring address and an NCCL id in the form
//! workers publish them. Refused values are echoed escaped and cut short, so the refusal cannot carry
//! what it refuses into a worker's log. Line breaks kept in accepted text are escaped where the coordinator
//! logs it (`telemetry`).

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use iro_common::RunConfig;
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_proto as pb;
use tonic::Status;

use crate::error::Error;
use crate::plan::Phase;
use crate::state::{
    Command, Fenced, Lease, LeaseRef, Output, Progress, Reply, Resources, TaskId, WaitReason, WorkerId,
};

/// What the run state keeps of a failure message or abort reason: the first this many bytes, so the state
/// and the status page stay bounded however many tasks fail.
pub const MAX_TEXT: usize = 4096;
/// The longest failure message or abort reason accepted (beyond it the request is refused): far above any
/// real error chain, a libtorch backtrace included, and below the gRPC message limit.
pub const MAX_LONG_TEXT: usize = 32 * 1024;
/// The longest worker name or device string.
pub const MAX_NAME: usize = 256;
/// The longest object key, and the longest entry of `resources.cached_models`.
pub const MAX_KEY: usize = 1024;
/// At most this many `resources.cached_models`, and at most `MAX_RESOURCE_BYTES` of them in all: a worker
/// record stays a few KiB, however many are registered (review A12).
pub const MAX_CACHED_MODELS: usize = 256;
pub const MAX_RESOURCE_BYTES: usize = 16 * 1024;
/// The longest gang endpoint: a ring address and a 256-digit NCCL id fit well within it.
pub const MAX_ENDPOINT: usize = 1024;
/// The longest task id (`iter-{u32}/{phase}/{u32}` is at most 34 bytes).
const MAX_TASK_ID: usize = 64;
/// An NCCL unique id as workers publish it: its 128 bytes in hex (`collective::NcclUniqueId::to_hex`).
pub const NCCL_ID_HEX: usize = 256;
/// The largest `records` or `tokens` a completion may report.
pub const MAX_COUNT: u64 = 1 << 40;

/// The gRPC metadata key that carries a worker's session nonce on every call after RegisterWorker.
pub const SESSION_HEADER: &str = "iro-session";
/// A session nonce: 32 lowercase hex digits (128 random bits).
pub const SESSION_LEN: usize = 32;

/// The session a call presents; None when it carries none.
pub fn session(metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(value) = metadata.get(SESSION_HEADER) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| invalid(SESSION_HEADER, "is not ASCII"))?;
    if value.len() != SESSION_LEN || !value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid(
            SESSION_HEADER,
            format!("must be {SESSION_LEN} lowercase hex digits (the session RegisterWorker returned)"),
        ));
    }
    Ok(Some(value.to_owned()))
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// A refused value as the refusal shows it: escaped, and cut to its first 64 characters.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = value.chars().take(SHOWN).flat_map(char::escape_debug).collect();
    if value.chars().nth(SHOWN).is_some() {
        out.push('…');
    }
    format!("`{out}`")
}

/// Characters no text from a worker may hold: control characters (C0, DEL, C1), and the Unicode line
/// separators and bidirectional overrides that let text pose as other lines or other text.
fn forbidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// What a worker sends as a failure message or abort reason, made acceptable to `long_text`: forbidden
/// characters but line breaks and tabs become `?`, the text is cut to `MAX_LONG_TEXT` bytes, and a blank
/// one says so. An error message from a library may hold an ANSI escape or a carriage return, and the
/// report must not be refused for it: a refused failure report ends the worker.
pub fn report_text(text: &str) -> String {
    let mut out: String =
        text.chars().map(|c| if forbidden(c) && !matches!(c, '\n' | '\t') { '?' } else { c }).collect();
    if out.len() > MAX_LONG_TEXT {
        let cut = (0..=MAX_LONG_TEXT).rev().find(|i| out.is_char_boundary(*i)).unwrap_or(0);
        out.truncate(cut);
    }
    if out.trim().is_empty() {
        out = "(the worker gave no message)".to_owned();
    }
    out
}

/// One line of at most `max` bytes with no forbidden character; `required`: not blank either.
fn line(field: &str, value: &str, max: usize, required: bool) -> Result<(), Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(field, format!("is {} bytes, more than the {max} allowed", value.len())));
    }
    if let Some(c) = value.chars().find(|c| forbidden(*c)) {
        return Err(invalid(
            field,
            format!("must be one line without control characters; {} holds {}", shown(value), c.escape_unicode()),
        ));
    }
    Ok(())
}

/// A failure message or abort reason: not blank, at most `MAX_LONG_TEXT` bytes, no forbidden character
/// but line breaks and tabs. What is kept is its first `MAX_TEXT` bytes.
fn long_text(field: &str, value: String) -> Result<String, Status> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_LONG_TEXT {
        return Err(invalid(field, format!("is {} bytes, more than the {MAX_LONG_TEXT} allowed", value.len())));
    }
    if let Some(c) = value.chars().find(|c| forbidden(*c) && !matches!(c, '\n' | '\t')) {
        return Err(invalid(
            field,
            format!("may hold line breaks and tabs but no other control character; it holds {}", c.escape_unicode()),
        ));
    }
    if value.len() <= MAX_TEXT {
        return Ok(value);
    }
    let cut = (0..=MAX_TEXT).rev().find(|i| value.is_char_boundary(*i)).unwrap_or(0);
    Ok(format!("{}…", &value[..cut]))
}

/// An object key a worker reports: relative, `/`-separated, every segment a real name, so that no reader
/// that joins it onto a prefix or a local folder ends up outside them.
pub fn object_key(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty: the object-store key of this attempt's output"));
    }
    line(field, value, MAX_KEY, true)?;
    let why = if value.starts_with('/') {
        Some("must be relative (no leading `/`)")
    } else if value.contains('\\') {
        Some("must not contain a backslash")
    } else if value.split('/').any(str::is_empty) {
        Some("must not have an empty segment (`//` or a trailing `/`)")
    } else if value.split('/').any(|segment| segment == "." || segment == "..") {
        Some("must not have a `.` or `..` segment")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(field, format!("{} {why}", shown(value)))),
        None => Ok(()),
    }
}

pub fn worker_id(field: &str, value: &str) -> Result<WorkerId, Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty (the id RegisterWorker returned)"));
    }
    let id = WorkerId::new(value);
    id.check().map_err(|e| match e {
        Error::InvalidWorkerId { message, .. } => invalid(field, format!("{} {message}", shown(value))),
        other => invalid(field, other),
    })?;
    Ok(id)
}

pub fn task_id(value: &str) -> Result<TaskId, Status> {
    if value.is_empty() {
        return Err(invalid("task_id", "must not be empty"));
    }
    line("task_id", value, MAX_TASK_ID, true)?;
    value.parse().map_err(|e: Error| invalid("task_id", e))
}

fn attempt(value: u32) -> Result<u32, Status> {
    if value == 0 {
        return Err(invalid("attempt", "must be at least 1: attempts count from 1, as LeaseTask hands them out"));
    }
    Ok(value)
}

pub fn register(req: pb::RegisterWorkerRequest) -> Result<(Option<WorkerId>, String, Resources), Status> {
    let id = if req.worker_id.is_empty() { None } else { Some(worker_id("worker_id", &req.worker_id)?) };
    // It shows up in log lines and on the status page.
    line("name", &req.name, MAX_NAME, true)?;
    let resources = req.resources.ok_or_else(|| invalid("resources", "missing: say at least the device"))?;
    line("resources.device", &resources.device, MAX_NAME, true)?;
    let models = &resources.cached_models;
    if models.len() > MAX_CACHED_MODELS {
        return Err(invalid(
            "resources.cached_models",
            format!("lists {} models, more than the {MAX_CACHED_MODELS} allowed", models.len()),
        ));
    }
    let total: usize = models.iter().map(String::len).sum();
    if total > MAX_RESOURCE_BYTES {
        return Err(invalid(
            "resources.cached_models",
            format!("hold {total} bytes in all, more than the {MAX_RESOURCE_BYTES} allowed"),
        ));
    }
    for model in models {
        line("resources.cached_models", model, MAX_KEY, true)?;
    }
    let resources = Resources {
        device: resources.device,
        memory_bytes: resources.memory_bytes,
        cached_models: resources.cached_models,
    };
    Ok((id, req.name, resources))
}

pub fn heartbeat(req: pb::HeartbeatRequest) -> Result<Command, Status> {
    let worker_id = worker_id("worker_id", &req.worker_id)?;
    let lease = if req.task_id.is_empty() {
        None
    } else {
        Some(LeaseRef { task_id: task_id(&req.task_id)?, attempt: attempt(req.attempt)? })
    };
    // Display only, but never more done than there is to do.
    let progress = Progress { done: req.progress_done.min(req.progress_total), total: req.progress_total };
    Ok(Command::Heartbeat { worker_id, lease, progress, now_ms: 0 })
}

pub fn lease(req: pb::LeaseTaskRequest) -> Result<Command, Status> {
    Ok(Command::LeaseTask { worker_id: worker_id("worker_id", &req.worker_id)?, now_ms: 0 })
}

pub fn complete(req: pb::CompleteTaskRequest) -> Result<Command, Status> {
    let worker_id = worker_id("worker_id", &req.worker_id)?;
    let task_id = task_id(&req.task_id)?;
    let attempt = attempt(req.attempt)?;
    object_key("output_key", &req.output_key)?;
    if req.sha256.len() != 64 || !req.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid("sha256", "must be 64 lower-case hex digits"));
    }
    // Counts are summed into telemetry and manifests: bound them far above any real shard (2^40 is a trillion
    // records) so no worker can overflow a sum (review A13).
    for (field, n) in [("records", req.records), ("tokens", req.tokens)] {
        if n > MAX_COUNT {
            return Err(invalid(field, format!("{n} is more than any shard holds (at most {MAX_COUNT})")));
        }
    }
    let output = Output { key: req.output_key, sha256: req.sha256, records: req.records, tokens: req.tokens };
    Ok(Command::CompleteTask { worker_id, task_id, attempt, output, now_ms: 0 })
}

/// A rollout or eval shard's output must be the attempt-specific key the layout derives for it (the manifest
/// accepts no other); a train task's output is V_t's folder, which the layout does not fix to one key.
pub fn check_output_key(command: &Command, layout: &iro_common::layout::RunLayout) -> Result<(), Status> {
    let Command::CompleteTask { task_id, attempt, output, .. } = command else { return Ok(()) };
    let want = match task_id.phase {
        crate::plan::Phase::Rollout => {
            layout.shard(task_id.iteration, iro_common::layout::ShardedPhase::Rollout, task_id.shard, *attempt)
        }
        crate::plan::Phase::Eval => {
            layout.shard(task_id.iteration, iro_common::layout::ShardedPhase::Eval, task_id.shard, *attempt)
        }
        // Every rank reports its attempt's `files.json`; rank 0's is the one the value manifest names.
        crate::plan::Phase::Train => layout.value_files(task_id.iteration, *attempt),
    };
    if output.key != want {
        return Err(invalid("output_key", format!("{} is not this attempt's output key `{want}`", shown(&output.key))));
    }
    Ok(())
}

pub fn fail(req: pb::FailTaskRequest) -> Result<Command, Status> {
    Ok(Command::FailTask {
        worker_id: worker_id("worker_id", &req.worker_id)?,
        task_id: task_id(&req.task_id)?,
        attempt: attempt(req.attempt)?,
        error: long_text("error", req.error)?,
        released: req.released,
        retryable: req.retryable,
        now_ms: 0,
    })
}

/// A host peers can connect to: a DNS name (labels of letters, digits and inner hyphens), an IPv4
/// address, or an IPv6 address in brackets.
fn host_ok(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // All digits and dots is an IPv4 address or nothing (`10.0.0.300` is not a name either).
        return host.parse::<Ipv4Addr>().is_ok();
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253 && host.split('.').all(label_ok)
}

/// A TCP port peers can connect to: 1 to 65535, in plain digits.
fn port_ok(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0')
        && port.parse::<u16>().is_ok()
}

/// What a gang rank publishes, and every other rank connects to, as `pipeline::gang` writes it: its ring
/// address `tcp://host:port`, followed on rank 0 of a GPU gang by ` nccl:<hex>` (the NCCL unique id, 256
/// hex digits), or `rank-R-of-W` (a runner without collectives). Parts are separated by one space; each
/// kind appears once at most. Anything else is refused rather than handed to the other ranks (review A14).
fn endpoint(value: String) -> Result<String, Status> {
    line("endpoint", &value, MAX_ENDPOINT, true)?;
    let bad = |why: String| {
        Err(invalid(
            "endpoint",
            format!(
                "{} is not `tcp://host:port` [` nccl:<{NCCL_ID_HEX} hex digits>`] or `rank-R-of-W`: {why}",
                shown(&value)
            ),
        ))
    };
    let (mut tcp, mut nccl, mut placeholder) = (0, 0, 0);
    for part in value.split(' ') {
        if let Some(addr) = part.strip_prefix("tcp://") {
            tcp += 1;
            let Some((host, port)) = addr.rsplit_once(':') else {
                return bad(format!("`{part}` has no port"));
            };
            if !host_ok(host) {
                return bad(format!("`{host}` is not a DNS name, an IPv4 address or a bracketed IPv6 address"));
            }
            if !port_ok(port) {
                return bad(format!("`{port}` is not a port from 1 to 65535"));
            }
        } else if let Some(hex) = part.strip_prefix("nccl:") {
            nccl += 1;
            if hex.len() != NCCL_ID_HEX || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("the NCCL id is not {NCCL_ID_HEX} hex digits"));
            }
        } else if let Some((r, w)) = part.strip_prefix("rank-").and_then(|rest| rest.split_once("-of-")) {
            placeholder += 1;
            let (Ok(r), Ok(w)) = (r.parse::<u32>(), w.parse::<u32>()) else {
                return bad(format!("`{part}` is not rank-R-of-W"));
            };
            if r >= w {
                return bad(format!("`{part}`: rank {r} is not below world {w}"));
            }
        } else if part.is_empty() {
            return bad("parts are separated by one space".into());
        } else {
            return bad(format!("{} is none of them", shown(part)));
        }
    }
    if !matches!((tcp, nccl, placeholder), (1, 0 | 1, 0) | (0, 0, 1)) {
        return bad("one ring address (with at most one NCCL id), or one placeholder".into());
    }
    Ok(value)
}

pub fn join_gang(req: pb::JoinGangRequest) -> Result<Command, Status> {
    Ok(Command::JoinGang {
        worker_id: worker_id("worker_id", &req.worker_id)?,
        task_id: task_id(&req.task_id)?,
        attempt: attempt(req.attempt)?,
        endpoint: endpoint(req.endpoint)?,
        now_ms: 0,
    })
}

pub fn abort_gang(req: pb::AbortGangRequest) -> Result<Command, Status> {
    Ok(Command::AbortGang {
        worker_id: worker_id("worker_id", &req.worker_id)?,
        task_id: task_id(&req.task_id)?,
        attempt: attempt(req.attempt)?,
        reason: long_text("reason", req.reason)?,
        now_ms: 0,
    })
}

/// Worker text the coordinator logs (failure messages, abort reasons) as one line: line breaks and tabs,
/// the only control characters `wire` lets in, written as `\n` and `\t`, so no worker can forge a line of
/// the text log.
pub fn one_line(text: &str) -> Cow<'_, str> {
    if !text.chars().any(forbidden) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if forbidden(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A refused command as a gRPC status; the message is the error's own, naming the id that was wrong.
pub fn status(error: Error) -> Status {
    let message = error.to_string();
    match error {
        Error::UnknownWorker { .. } => Status::not_found(format!("worker_id: {message}; register first")),
        Error::StaleSession { .. } => Status::failed_precondition(format!("{SESSION_HEADER}: {message}")),
        Error::UnknownTask { .. } => Status::not_found(format!("task_id: {message}")),
        Error::InvalidTaskId { .. } => Status::invalid_argument(format!("task_id: {message}")),
        Error::InvalidWorkerId { .. } => Status::invalid_argument(format!("worker_id: {message}")),
        Error::NotAGangTask { .. } => Status::invalid_argument(format!("task_id: {message}")),
        // Workers retry a resource_exhausted RegisterWorker, so a new worker waits for room.
        Error::TooManyWorkers { .. } => Status::resource_exhausted(message),
        // NotLeader: the service adds the leader's URL (`iro-leader`) when the follower knows it.
        Error::Unavailable { .. } | Error::Storage { .. } | Error::NotLeader { .. } => Status::unavailable(message),
        Error::InvalidPlan { .. }
        | Error::CorruptLog { .. }
        | Error::StateLocked { .. }
        | Error::LogCompacted { .. }
        | Error::StateMismatch { .. }
        | Error::Config { .. }
        | Error::CannotReject { .. }
        | Error::RunExists { .. }
        | Error::Bind { .. }
        | Error::Raft { .. } => Status::internal(message),
    }
}

fn unexpected(rpc: &str, reply: &Reply) -> Status {
    Status::internal(format!("{rpc}: the run state answered an unexpected {reply:?}"))
}

pub fn fence(fenced: &Fenced) -> pb::Fence {
    pb::Fence { kind: fenced.kind().to_owned(), reason: fenced.to_string() }
}

fn ms_u32(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}

pub fn register_response(
    reply: Reply,
    run_id: &str,
    run_config_json: &str,
) -> Result<pb::RegisterWorkerResponse, Status> {
    match reply {
        Reply::Registered { worker_id, heartbeat_interval_ms, session } => Ok(pb::RegisterWorkerResponse {
            session,
            worker_id: worker_id.to_string(),
            run_id: run_id.to_owned(),
            heartbeat_interval_ms: ms_u32(heartbeat_interval_ms),
            run_config_json: run_config_json.to_owned(),
        }),
        other => Err(unexpected("RegisterWorker", &other)),
    }
}

pub fn heartbeat_response(reply: Reply) -> Result<pb::HeartbeatResponse, Status> {
    match reply {
        Reply::Alive => Ok(pb::HeartbeatResponse { keep_working: true, ..Default::default() }),
        Reply::LeaseExtended { deadline_ms } => {
            Ok(pb::HeartbeatResponse { keep_working: true, lease_deadline_unix_ms: deadline_ms, fence: None })
        }
        Reply::Fenced(f) => {
            Ok(pb::HeartbeatResponse { keep_working: false, lease_deadline_unix_ms: 0, fence: Some(fence(&f)) })
        }
        other => Err(unexpected("Heartbeat", &other)),
    }
}

/// What a worker needs beyond the task id to run a task: derived from the run config, so workers and
/// coordinator cannot disagree on prompt ranges or output keys.
#[derive(Debug, Clone)]
pub struct Payloads {
    layout: RunLayout,
    shard_size: u64,
    prompts_per_iteration: u64,
    test_prompts: u64,
}

impl Payloads {
    pub fn new(config: &RunConfig) -> Result<Self, Error> {
        let layout =
            RunLayout::new(&config.run.id).map_err(|e| Error::Config { field: "run.id", message: e.to_string() })?;
        Ok(Self {
            layout,
            shard_size: config.cluster.shard_size.max(1) as u64,
            prompts_per_iteration: config.data.prompts_per_iteration as u64,
            test_prompts: config.data.test_prompts as u64,
        })
    }

    /// Rollout and eval: the prompt range `[prompt_start, prompt_end)` within the iteration's prompt
    /// slice (rollout) or the test set (eval), and the attempt-specific output key. Train: the folder
    /// the value model of this iteration is written to.
    pub fn json(&self, task: TaskId, attempt: u32) -> String {
        let sharded = |phase: ShardedPhase, prompts: u64| {
            let start = (u64::from(task.shard) * self.shard_size).min(prompts);
            let end = (start + self.shard_size).min(prompts);
            serde_json::json!({
                "output_key": self.layout.shard(task.iteration, phase, task.shard, attempt),
                "prompt_start": start,
                "prompt_end": end,
            })
        };
        let value = match task.phase {
            Phase::Rollout => sharded(ShardedPhase::Rollout, self.prompts_per_iteration),
            Phase::Eval => sharded(ShardedPhase::Eval, self.test_prompts),
            Phase::Train => serde_json::json!({
                "output_key": self.layout.value_files(task.iteration, attempt),
                "value_dir": self.layout.value_attempt(task.iteration, attempt),
            }),
        };
        value.to_string()
    }
}

pub fn lease_response(reply: Reply, payloads: &Payloads) -> Result<pb::LeaseTaskResponse, Status> {
    use pb::lease_task_response::Outcome;
    let Reply::Lease(lease) = reply else {
        return Err(unexpected("LeaseTask", &reply));
    };
    let spec = |task_id: TaskId, attempt: u32, deadline_ms: u64| pb::TaskSpec {
        task_id: task_id.to_string(),
        attempt,
        iteration: task_id.iteration,
        phase: crate::state::phase_name(task_id.phase).to_owned(),
        shard: task_id.shard,
        lease_deadline_unix_ms: deadline_ms,
        payload_json: payloads.json(task_id, attempt),
        ..Default::default()
    };
    let (outcome, retry_reason) = match lease {
        Lease::Task { task_id, attempt, deadline_ms } => (Outcome::Task(spec(task_id, attempt, deadline_ms)), ""),
        Lease::GangRank { task_id, attempt, rank, world, deadline_ms, join_deadline_ms } => (
            Outcome::Task(pb::TaskSpec {
                rank,
                world,
                join_deadline_unix_ms: join_deadline_ms,
                ..spec(task_id, attempt, deadline_ms)
            }),
            "",
        ),
        Lease::RetryAfter { ms, reason } => (
            Outcome::RetryAfterMs(ms_u32(ms).max(1)),
            match reason {
                WaitReason::PhaseBarrier => "phase_barrier",
                WaitReason::GangFull => "gang_full",
                WaitReason::GangGathering => "gang_gathering",
                WaitReason::Backoff => "backoff",
                WaitReason::Quarantined => "quarantined",
            },
        ),
        Lease::RunFinished => (Outcome::RunFinished(true), ""),
        Lease::RunFailed { reason } => (Outcome::RunFailed(reason), ""),
    };
    Ok(pb::LeaseTaskResponse { outcome: Some(outcome), retry_reason: retry_reason.to_owned() })
}

pub fn complete_response(reply: Reply) -> Result<pb::CompleteTaskResponse, Status> {
    match reply {
        Reply::Accepted { task_id, attempt } => Ok(pb::CompleteTaskResponse {
            accepted: true,
            reason: format!("attempt {attempt} of {task_id} is the accepted output"),
            fence: None,
        }),
        Reply::RankFinished { task_id, rank } => Ok(pb::CompleteTaskResponse {
            accepted: true,
            reason: format!("rank {rank} of {task_id} finished; rank 0's completion carries the task's output"),
            fence: None,
        }),
        Reply::Fenced(f) => {
            Ok(pb::CompleteTaskResponse { accepted: false, reason: f.to_string(), fence: Some(fence(&f)) })
        }
        other => Err(unexpected("CompleteTask", &other)),
    }
}

pub fn fail_response(reply: Reply) -> Result<pb::FailTaskResponse, Status> {
    match reply {
        Reply::Returned { will_retry, .. } => Ok(pb::FailTaskResponse { will_retry, accepted: true, fence: None }),
        Reply::Fenced(f) => Ok(pb::FailTaskResponse { will_retry: false, accepted: false, fence: Some(fence(&f)) }),
        other => Err(unexpected("FailTask", &other)),
    }
}

pub fn join_gang_response(reply: Reply) -> Result<pb::JoinGangResponse, Status> {
    use pb::join_gang_response::Outcome;
    let outcome = match reply {
        Reply::GangWaiting { joined, world, retry_after_ms } => {
            Outcome::Waiting(pb::GangWaiting { joined, world, retry_after_ms: ms_u32(retry_after_ms).max(1) })
        }
        Reply::GangReady { rank, world, endpoints } => Outcome::Ready(pb::GangReady { rank, world, endpoints }),
        Reply::Fenced(f) => Outcome::Fence(fence(&f)),
        other => return Err(unexpected("JoinGang", &other)),
    };
    Ok(pb::JoinGangResponse { outcome: Some(outcome) })
}

pub fn abort_gang_response(reply: Reply) -> Result<pb::AbortGangResponse, Status> {
    match reply {
        Reply::Returned { will_retry, .. } => Ok(pb::AbortGangResponse { will_retry, accepted: true, fence: None }),
        Reply::Fenced(f) => Ok(pb::AbortGangResponse { will_retry: false, accepted: false, fence: Some(fence(&f)) }),
        other => Err(unexpected("AbortGang", &other)),
    }
}

#[cfg(test)]
mod tests {
    use iro_common::layout::RunLayout;

    use super::*;

    fn complete_with(task: &str, attempt: u32, key: &str) -> Command {
        complete(pb::CompleteTaskRequest {
            worker_id: "w1".into(),
            task_id: task.into(),
            attempt,
            output_key: key.into(),
            sha256: "a".repeat(64),
            records: 1,
            tokens: 1,
        })
        .unwrap()
    }

    #[test]
    fn shard_outputs_must_sit_at_their_attempt_key() {
        let layout = RunLayout::new("r1").unwrap();
        let good = complete_with("iter-2/rollout/3", 2, "runs/r1/iter-2/rollout/shard-00003.attempt-2.jsonl");
        assert!(check_output_key(&good, &layout).is_ok());
        for (task, attempt, key) in [
            ("iter-2/rollout/3", 2, "runs/r1/iter-2/rollout/shard-00003.attempt-1.jsonl"), // another attempt's key
            ("iter-2/eval/3", 2, "runs/r1/iter-2/rollout/shard-00003.attempt-2.jsonl"),    // another phase's key
            ("iter-2/rollout/3", 2, "elsewhere/x.jsonl"),
        ] {
            let err = check_output_key(&complete_with(task, attempt, key), &layout).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("output_key") && err.message().contains(key), "{}", err.message());
        }
        // The train task reports its own attempt's files.json, nothing else.
        let files = "runs/r1/iter-2/value/attempt-3/model/files.json";
        assert!(check_output_key(&complete_with("iter-2/train/0", 3, files), &layout).is_ok());
        for (attempt, key) in [(2, files), (3, "runs/r1/iter-2/value/model"), (3, "runs/r1/iter-2/value/manifest.json")]
        {
            let err = check_output_key(&complete_with("iter-2/train/0", attempt, key), &layout).unwrap_err();
            assert!(err.message().contains("output_key") && err.message().contains(key), "{}", err.message());
        }
    }

    fn refused(result: Result<impl std::fmt::Debug, Status>, field: &str) -> String {
        let err = result.expect_err("the request should be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        assert!(err.message().starts_with(&format!("{field}: ")), "{field}: {}", err.message());
        // The refusal carries no control character of the value it refuses.
        assert!(!err.message().chars().any(forbidden), "{:?}", err.message());
        err.message().to_owned()
    }

    fn registration(name: &str, device: &str, cached_models: Vec<String>) -> pb::RegisterWorkerRequest {
        pb::RegisterWorkerRequest {
            name: name.into(),
            resources: Some(pb::WorkerResources { device: device.into(), memory_bytes: 1 << 30, cached_models }),
            worker_id: String::new(),
        }
    }

    fn failure(error: &str) -> pb::FailTaskRequest {
        pb::FailTaskRequest {
            worker_id: "w1".into(),
            task_id: "iter-1/rollout/0".into(),
            attempt: 1,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn names_and_devices_are_one_bounded_line() {
        assert!(register(registration("pod-7 (node a)", "cuda:0", vec![])).is_ok());
        for bad in
            ["", "  ", "two\nlines", "tab\there", "esc\u{1b}[31m", "nul\0", "del\u{7f}", "c1\u{85}", "rtl\u{202e}txt"]
        {
            refused(register(registration(bad, "cpu", vec![])), "name");
        }
        refused(register(registration(&"n".repeat(MAX_NAME + 1), "cpu", vec![])), "name");
        assert!(register(registration(&"n".repeat(MAX_NAME), "cpu", vec![])).is_ok());
        for bad in ["", "cuda:0\r", &"d".repeat(MAX_NAME + 1)] {
            refused(register(registration("w", bad, vec![])), "resources.device");
        }
        let mut missing = registration("w", "cpu", vec![]);
        missing.resources = None;
        refused(register(missing), "resources");
    }

    #[test]
    fn cached_models_are_bounded_in_count_length_and_total() {
        let models = |n: usize, len: usize| (0..n).map(|i| format!("{i:0len$}")).collect::<Vec<_>>();
        assert!(register(registration("w", "cpu", vec!["/models/smollm2-135m".into()])).is_ok());
        assert!(register(registration("w", "cpu", models(MAX_CACHED_MODELS, 8))).is_ok());
        let message =
            refused(register(registration("w", "cpu", models(MAX_CACHED_MODELS + 1, 8))), "resources.cached_models");
        assert!(message.contains("257 models"), "{message}");
        let message = refused(register(registration("w", "cpu", models(20, 1000))), "resources.cached_models");
        assert!(message.contains("20000 bytes"), "{message}");
        refused(register(registration("w", "cpu", models(1, MAX_KEY + 1))), "resources.cached_models");
        refused(register(registration("w", "cpu", vec!["/models/a\nforged".into()])), "resources.cached_models");
        refused(register(registration("w", "cpu", vec![String::new()])), "resources.cached_models");
    }

    #[test]
    fn ids_are_checked_and_echoed_escaped() {
        let lease = |id: &str| lease(pb::LeaseTaskRequest { worker_id: id.into() });
        assert!(lease("w-0001").is_ok());
        for bad in ["", "a/b", "..", "has space", "w\u{1b}]0;pwned\u{7}", &"w".repeat(129)] {
            refused(lease(bad), "worker_id");
        }
        let beat = |task: &str| {
            heartbeat(pb::HeartbeatRequest {
                worker_id: "w1".into(),
                task_id: task.into(),
                attempt: 1,
                ..Default::default()
            })
        };
        assert!(beat("iter-1/rollout/0").is_ok() && beat("").is_ok());
        for bad in ["iter-1/rollout", "iter-1/rollout/0\n", "iter-x/train/0", &"9".repeat(MAX_TASK_ID + 1)] {
            refused(beat(bad), "task_id");
        }
    }

    #[test]
    fn a_failure_message_keeps_line_breaks_and_tabs_but_no_other_control_character() {
        let chain = "task failed: CUDA out of memory\n\tframe #0: c10::Error\n\tframe #1: at::native::empty";
        let Command::FailTask { error, .. } = fail(failure(chain)).unwrap() else { panic!() };
        assert_eq!(error, chain);
        for bad in [
            "",
            " \n\t",
            "boom\r\n2026-12-03T00:00:00Z INFO forged",
            "boom\u{1b}[31m",
            "nul\0",
            "ff\u{c}",
            "ls\u{2028}",
        ] {
            refused(fail(failure(bad)), "error");
        }
        // Long chains are accepted and kept to their first MAX_TEXT bytes; beyond MAX_LONG_TEXT they are refused.
        let Command::FailTask { error, .. } = fail(failure(&"é".repeat(MAX_LONG_TEXT / 2))).unwrap() else { panic!() };
        assert!(error.len() <= MAX_TEXT + '…'.len_utf8() && error.ends_with('…'), "{}", error.len());
        let message = refused(fail(failure(&"x".repeat(MAX_LONG_TEXT + 1))), "error");
        assert!(message.contains(&format!("{}", MAX_LONG_TEXT + 1)), "{message}");

        let abort = |reason: &str| {
            abort_gang(pb::AbortGangRequest {
                worker_id: "w1".into(),
                task_id: "iter-1/train/0".into(),
                attempt: 1,
                reason: reason.into(),
            })
        };
        assert!(abort("peer 2 stopped answering\n\tall_reduce timed out").is_ok());
        refused(abort("peer\u{1b}[2J"), "reason");
        refused(abort(""), "reason");
    }

    #[test]
    fn a_worker_report_is_made_acceptable_to_the_door() {
        let raw = format!("\u{1b}[31mboom\r\n\tat {}", "x".repeat(MAX_LONG_TEXT));
        let text = report_text(&raw);
        assert!(text.starts_with("?[31mboom?\n\tat x"), "{text:?}");
        assert!(long_text("error", text).is_ok());
        assert!(long_text("error", report_text("  ")).is_ok());
        assert!(long_text("error", raw).is_err(), "the raw text is refused: the cleaning is what lets it through");
    }

    #[test]
    fn logged_worker_text_is_one_line() {
        assert!(matches!(one_line("plain text"), Cow::Borrowed(_)));
        assert_eq!(one_line("boom\n2026 INFO forged\tx"), "boom\\n2026 INFO forged\\tx");
        assert!(!one_line("a\r\n\u{1b}[31m\u{2028}").chars().any(forbidden));
    }

    #[test]
    fn output_keys_are_relative_keys_that_cannot_climb_out() {
        let done = |key: &str| {
            complete(pb::CompleteTaskRequest {
                worker_id: "w1".into(),
                task_id: "iter-1/rollout/0".into(),
                attempt: 1,
                output_key: key.into(),
                sha256: "a".repeat(64),
                records: 1,
                tokens: 1,
            })
        };
        for good in [
            "runs/r1/iter-1/rollout/shard-00000.attempt-1.jsonl",
            "runs/r1/iter-2/value/attempt-3/model/files.json",
            "k",
        ] {
            assert!(done(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "relative"),
            ("runs/r1/../../etc/passwd", "`..`"),
            ("..", "`..`"),
            ("runs/./r1", "`.`"),
            ("runs//r1", "empty segment"),
            ("runs/r1/", "empty segment"),
            ("runs\\r1\\x", "backslash"),
            ("runs/r1\n/x", "control"),
            ("runs/r1\u{0}", "control"),
        ] {
            let message = refused(done(bad), "output_key");
            assert!(message.contains(why), "{bad:?}: {message}");
        }
        refused(done(&"k".repeat(MAX_KEY + 1)), "output_key");
    }

    #[test]
    fn counts_cannot_overflow_a_sum() {
        let mut huge = pb::CompleteTaskRequest {
            worker_id: "w1".into(),
            task_id: "iter-1/rollout/0".into(),
            attempt: 1,
            output_key: "k".into(),
            sha256: "a".repeat(64),
            records: u64::MAX,
            tokens: 1,
        };
        refused(complete(huge.clone()), "records");
        huge.records = MAX_COUNT;
        assert!(complete(huge).is_ok());
    }

    #[test]
    fn a_gang_endpoint_is_a_ring_address_with_an_nccl_id_or_the_placeholder() {
        let join = |endpoint: &str| {
            join_gang(pb::JoinGangRequest {
                worker_id: "w1".into(),
                task_id: "iter-1/train/0".into(),
                attempt: 1,
                endpoint: endpoint.into(),
            })
        };
        let id = "0f".repeat(NCCL_ID_HEX / 2);
        for good in [
            "tcp://10.0.0.7:29500".to_owned(),
            format!("tcp://127.0.0.1:4000 nccl:{id}"),
            format!("tcp://worker-3.iro.default.svc.cluster.local:65535 nccl:{}", id.to_uppercase()),
            "tcp://[::1]:80".to_owned(),
            "tcp://[fd00::1:2]:1".to_owned(),
            "rank-0-of-2".to_owned(),
        ] {
            assert!(join(&good).is_ok(), "{good}");
        }
        for bad in [
            "".to_owned(),
            "10.0.0.7:29500".to_owned(),
            "tcp://host".to_owned(),
            "tcp://host:0".to_owned(),
            "tcp://host:65536".to_owned(),
            "tcp://host:+80".to_owned(),
            "tcp://host:080".to_owned(),
            "tcp://:80".to_owned(),
            "tcp://10.0.0.300:80".to_owned(),
            "tcp://fd00::1:80".to_owned(),
            "tcp://[fd00::zz]:80".to_owned(),
            "tcp://-host:80".to_owned(),
            "tcp://host-:80".to_owned(),
            "tcp://a..b:80".to_owned(),
            "tcp://under_score:80".to_owned(),
            format!("tcp://{}.x:80", "a".repeat(64)),
            "tcp://a b:1".to_owned(),
            "tcp://h:1;rm".to_owned(),
            "tcp://h:1  rank-0-of-2".to_owned(),
            "tcp://h:1\tnccl:00".to_owned(),
            "tcp://h:1\nrank-0-of-2".to_owned(),
            "tcp://h:1 nccl:00ff".to_owned(),
            format!("tcp://h:1 nccl:{}", "x".repeat(NCCL_ID_HEX)),
            format!("nccl:{id}"),
            format!("tcp://h:1 nccl:{id} nccl:{id}"),
            "tcp://h:1 tcp://h:2".to_owned(),
            "tcp://h:1 rank-0-of-2".to_owned(),
            "rank-2-of-2".to_owned(),
            "rank-a-of-2".to_owned(),
            "http://evil/".to_owned(),
            format!("tcp://{}:1", "a.".repeat(MAX_ENDPOINT)),
        ] {
            refused(join(&bad), "endpoint");
        }
    }
}
