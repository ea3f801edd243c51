//! proto ↔ run-state mapping, in one place. Requests are checked field by field *before* anything reaches
//! the driver, so a malformed request is answered `invalid_argument` naming the field and applies nothing;
//! replies map back to responses, with a fenced report as a normal answer carrying its `Fence`.

use iro_common::RunConfig;
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_proto as pb;
use tonic::Status;

use crate::error::Error;
use crate::plan::Phase;
use crate::state::{
    Command, Fenced, Lease, LeaseRef, Output, Progress, Reply, Resources, TaskId, WaitReason, WorkerId,
};

/// Longest free text kept from a request (names, errors, endpoints): the state and the status page stay
/// bounded whatever a worker sends.
pub const MAX_TEXT: usize = 4096;
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

pub fn worker_id(field: &str, value: &str) -> Result<WorkerId, Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty (the id RegisterWorker returned)"));
    }
    let id = WorkerId::new(value);
    id.check().map_err(|e| invalid(field, e))?;
    Ok(id)
}

pub fn task_id(value: &str) -> Result<TaskId, Status> {
    if value.is_empty() {
        return Err(invalid("task_id", "must not be empty"));
    }
    value.parse().map_err(|e: Error| invalid("task_id", e))
}

fn attempt(value: u32) -> Result<u32, Status> {
    if value == 0 {
        return Err(invalid("attempt", "must be at least 1: attempts count from 1, as LeaseTask hands them out"));
    }
    Ok(value)
}

/// Free text: required ones must not be blank; all are cut to `MAX_TEXT` bytes on a char boundary. Control
/// characters become spaces (line breaks, tabs) or U+FFFD: an error chain keeps its words, but no worker can
/// forge a line of the coordinator's text log or a terminal escape (review A14). Refusing the text instead
/// would lose a failure report.
fn text(field: &str, value: String, required: bool) -> Result<String, Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    let value = if value.chars().any(char::is_control) {
        value
            .chars()
            .map(|c| match c {
                '\n' | '\r' | '\t' => ' ',
                c if c.is_control() => '\u{fffd}',
                c => c,
            })
            .collect()
    } else {
        value
    };
    if value.len() <= MAX_TEXT {
        return Ok(value);
    }
    let cut = (0..=MAX_TEXT).rev().find(|i| value.is_char_boundary(*i)).unwrap_or(0);
    Ok(format!("{}…", &value[..cut]))
}

/// `name` must also be a single line: it shows up in log lines and on the status page.
fn name(value: String) -> Result<String, Status> {
    if value.chars().any(char::is_control) {
        return Err(invalid("name", "must not contain control characters"));
    }
    if value.len() > 256 {
        return Err(invalid("name", "must be at most 256 bytes"));
    }
    text("name", value, true)
}

pub fn register(req: pb::RegisterWorkerRequest) -> Result<(Option<WorkerId>, String, Resources), Status> {
    let id = if req.worker_id.is_empty() { None } else { Some(worker_id("worker_id", &req.worker_id)?) };
    let name = name(req.name)?;
    let resources = req.resources.ok_or_else(|| invalid("resources", "missing: say at least the device"))?;
    let device = text("resources.device", resources.device, true)?;
    let cached_models = resources
        .cached_models
        .into_iter()
        .take(256)
        .map(|m| text("resources.cached_models", m, false))
        .collect::<Result<_, _>>()?;
    Ok((id, name, Resources { device, memory_bytes: resources.memory_bytes, cached_models }))
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
    if req.output_key.is_empty() {
        return Err(invalid("output_key", "must not be empty: the object-store key of this attempt's output"));
    }
    if req.output_key.len() > 1024 || req.output_key.chars().any(char::is_control) {
        return Err(invalid("output_key", "must be a single line of at most 1024 bytes"));
    }
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
        return Err(invalid("output_key", format!("`{}` is not this attempt's output key `{want}`", output.key)));
    }
    Ok(())
}

pub fn fail(req: pb::FailTaskRequest) -> Result<Command, Status> {
    Ok(Command::FailTask {
        worker_id: worker_id("worker_id", &req.worker_id)?,
        task_id: task_id(&req.task_id)?,
        attempt: attempt(req.attempt)?,
        error: text("error", req.error, true)?,
        released: req.released,
        retryable: req.retryable,
        now_ms: 0,
    })
}

/// What a gang rank publishes, and every other rank connects to: whitespace-separated parts, each
/// `tcp://host:port` (its ring address), `nccl:<hex>` (rank 0's NCCL unique id) or `rank-R-of-W` (a runner
/// without collectives). Anything else is refused rather than handed to the other ranks (review A14).
fn endpoint(value: String) -> Result<String, Status> {
    if value.len() > MAX_TEXT {
        return Err(invalid("endpoint", format!("must be at most {MAX_TEXT} bytes")));
    }
    let host_ok = |h: &str| {
        !h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
    };
    let part_ok = |p: &str| {
        if let Some(addr) = p.strip_prefix("tcp://") {
            return addr.rsplit_once(':').is_some_and(|(host, port)| host_ok(host) && port.parse::<u16>().is_ok());
        }
        if let Some(hex) = p.strip_prefix("nccl:") {
            return !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
        }
        p.strip_prefix("rank-")
            .and_then(|rest| rest.split_once("-of-"))
            .is_some_and(|(r, w)| r.parse::<u32>().is_ok() && w.parse::<u32>().is_ok())
    };
    if value.split_whitespace().next().is_none() || !value.split_whitespace().all(part_ok) {
        return Err(invalid(
            "endpoint",
            format!("`{}` is not `tcp://host:port`, `nccl:<hex>` or `rank-R-of-W` parts", value.escape_debug()),
        ));
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
        reason: text("reason", req.reason, true)?,
        now_ms: 0,
    })
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

    #[test]
    fn worker_text_cannot_forge_log_lines_and_counts_cannot_overflow_a_sum() {
        let fail = fail(pb::FailTaskRequest {
            worker_id: "w1".into(),
            task_id: "iter-1/rollout/0".into(),
            attempt: 1,
            error: "boom\n2026-12-03T00:00:00Z INFO forged line\u{1b}[31m".into(),
            ..Default::default()
        })
        .unwrap();
        let Command::FailTask { error, .. } = fail else { panic!() };
        assert!(!error.chars().any(char::is_control), "{error:?}");
        assert!(error.starts_with("boom 2026-12-03T00:00:00Z INFO forged line\u{fffd}[31m"), "{error:?}");

        let mut huge = pb::CompleteTaskRequest {
            worker_id: "w1".into(),
            task_id: "iter-1/rollout/0".into(),
            attempt: 1,
            output_key: "k".into(),
            sha256: "a".repeat(64),
            records: u64::MAX,
            tokens: 1,
        };
        let err = complete(huge.clone()).unwrap_err();
        assert!(err.message().contains("records"), "{}", err.message());
        huge.records = MAX_COUNT;
        assert!(complete(huge).is_ok());
    }

    #[test]
    fn a_gang_endpoint_must_be_ring_addresses_nccl_ids_or_the_placeholder() {
        let join = |endpoint: &str| {
            join_gang(pb::JoinGangRequest {
                worker_id: "w1".into(),
                task_id: "iter-1/train/0".into(),
                attempt: 1,
                endpoint: endpoint.into(),
            })
        };
        for good in ["tcp://10.0.0.7:29500", "tcp://127.0.0.1:4000 nccl:00ff", "tcp://[::1]:80", "rank-0-of-2"] {
            assert!(join(good).is_ok(), "{good}");
        }
        for bad in ["", "10.0.0.7:29500", "tcp://host:99999", "tcp://a b:1", "nccl:xyz", "http://evil/", "tcp://h:1;rm"]
        {
            let err = join(bad).unwrap_err();
            assert!(err.message().contains("endpoint"), "{bad}: {}", err.message());
        }
    }
}
