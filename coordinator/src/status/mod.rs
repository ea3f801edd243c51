//! The operators' view of a run, on its own HTTP port: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text) and `GET /` (a self-refreshing HTML page). All three render one `StatusReport`, built from a
//! snapshot of the run state and the driver's counters in a single read. Beside them, the probes
//! `GET /livez` and `GET /readyz` answer from the driver's published health, never queueing behind it.
//!
//! Access: by default the endpoint needs no token. It is read-only and shows no secret (worker names,
//! task ids, error messages), and browsers and scrapers cannot easily send a bearer token, so operators
//! keep it on the cluster network. With `status_requires_token` every GET but the probes must carry
//! `Authorization: Bearer <token>` with the read-only status token (Prometheus: `bearer_token_file`) or
//! the cluster token; either may be two tokens while it is rotated. With TLS the endpoint serves HTTPS
//! with the coordinator's certificate.

pub mod client;
pub mod metrics;
pub mod page;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::driver::telemetry::{Rejection, RpcMetrics, Telemetry, WINDOW_MS};
use crate::driver::{ClusterToken, Handle, Health, View};
use crate::state::{Counts, RunStatus, phase_name};

/// What the status routes need.
#[derive(Clone)]
pub struct StatusContext {
    pub handle: Handle,
    pub rpc: Arc<RpcMetrics>,
    pub run_id: String,
    /// Set when GETs (but the probes) must carry one of these tokens.
    pub tokens: Option<Vec<ClusterToken>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub run_id: String,
    /// running | finished | failed
    pub status: String,
    /// Why the run failed.
    pub failure: Option<String>,
    pub now_ms: u64,
    pub uptime_s: f64,
    pub iterations: u32,
    /// The active stage; None once the run is over.
    pub iteration: Option<u32>,
    pub phase: Option<String>,
    /// Tasks of the active stage by state.
    pub phase_tasks: Counts,
    /// Why no task of the active stage is leased right now: the manifests it reads are still being written
    /// (and, when a write keeps failing, which object and why). None when leases flow.
    #[serde(default)]
    pub leases_held_back: Option<String>,
    pub overall_tasks: Counts,
    pub stages: Vec<StageReport>,
    pub workers_alive: u64,
    pub workers_dead: u64,
    /// Records of workers dead for the retention (or dropped to make room) removed so far: the dead
    /// workers no longer counted in `workers_dead`.
    #[serde(default)]
    pub workers_removed: u64,
    pub workers: Vec<WorkerReport>,
    pub gang: Option<GangReport>,
    pub throughput: Throughput,
    /// Seconds until every task is done at the current rate (every task counted alike, so a long train
    /// step skews it); None when nothing finished recently or the run is over.
    pub eta_s: Option<f64>,
    /// Oldest first: lost leases and failed attempts, from the run state.
    pub recent_errors: Vec<ErrorReport>,
    /// Oldest first: requests the coordinator refused (unknown worker or task, ...).
    pub recent_rejections: Vec<Rejection>,
    pub log: LogReport,
    /// This replica's Raft state, when the coordinator runs replicated (`--raft-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft: Option<crate::raft::RaftStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub iteration: u32,
    pub phase: String,
    pub tasks: Counts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    pub id: String,
    pub name: String,
    pub device: String,
    pub alive: bool,
    pub last_heartbeat_age_ms: u64,
    pub current_task: Option<String>,
    pub attempt: Option<u32>,
    pub progress_done: u64,
    pub progress_total: u64,
    pub completed: u64,
    pub failures: u64,
    /// Set while the worker is quarantined (it failed too many tasks in a row): how long until it may take
    /// work again.
    #[serde(default)]
    pub quarantined_for_ms: Option<u64>,
}

impl WorkerReport {
    /// alive | dead | quarantined, as the page and `iro status` show it.
    pub fn state(&self) -> &'static str {
        match (self.alive, self.quarantined_for_ms) {
            (false, _) => "dead",
            (true, Some(_)) => "quarantined",
            (true, None) => "alive",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GangReport {
    pub task: String,
    pub attempt: u32,
    pub world: u32,
    pub joined: u32,
    pub started: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub window_s: f64,
    pub tasks_per_minute: f64,
    pub records_per_second: f64,
    /// Since this coordinator process started.
    pub tasks_accepted: u64,
    pub records: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub at_ms: u64,
    pub age_ms: u64,
    pub task: String,
    pub cause: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogReport {
    /// Commands in the durable log; a refused request does not move it.
    pub index: u64,
    /// Of those, replayed at start.
    pub recovered: u64,
    /// Why the coordinator stopped taking commands, if it did.
    pub error: Option<String>,
}

/// Counter snapshots for `/metrics`, taken in the same read as the report.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub applied: BTreeMap<&'static str, u64>,
    pub rejected: BTreeMap<(&'static str, &'static str), u64>,
    pub fenced: BTreeMap<&'static str, u64>,
    pub losses: BTreeMap<&'static str, u64>,
    pub outputs_rejected: BTreeMap<&'static str, u64>,
    pub log_batches: u64,
    pub log_entries: u64,
    pub log_sync: crate::driver::telemetry::Histogram,
    /// When this coordinator started (ms since the Unix epoch).
    pub started_ms: u64,
}

pub fn report(run_id: &str, view: View<'_>) -> StatusReport {
    let View { state, telemetry, now_ms, log_index, held_back, raft } = view;
    let snapshot = state.snapshot();
    let (status, failure) = match &snapshot.run {
        RunStatus::Running => ("running", None),
        RunStatus::Finished => ("finished", None),
        RunStatus::Failed { reason } => ("failed", Some(reason.clone())),
    };
    let workers: Vec<WorkerReport> = snapshot
        .workers
        .iter()
        .map(|w| WorkerReport {
            id: w.id.to_string(),
            name: w.name.clone(),
            device: w.resources.device.clone(),
            alive: w.alive,
            last_heartbeat_age_ms: now_ms.saturating_sub(w.last_seen_ms),
            current_task: w.current.map(|t| t.to_string()),
            attempt: w.attempt,
            progress_done: w.progress.done,
            progress_total: w.progress.total,
            completed: w.completed,
            failures: w.failures,
            quarantined_for_ms: w.quarantined_until_ms.map(|until| until.saturating_sub(snapshot.now_ms)),
        })
        .collect();
    let alive = workers.iter().filter(|w| w.alive).count() as u64;
    let (tasks_per_minute, records_per_second) = telemetry.throughput(now_ms);
    let remaining = snapshot.overall.pending + snapshot.overall.leased;
    let eta_s = (status == "running" && tasks_per_minute > 0.0).then(|| remaining as f64 * 60.0 / tasks_per_minute);
    StatusReport {
        run_id: run_id.to_owned(),
        status: status.to_owned(),
        failure,
        now_ms,
        uptime_s: now_ms.saturating_sub(telemetry.started_ms) as f64 / 1000.0,
        iterations: snapshot.iterations,
        iteration: snapshot.iteration,
        phase: snapshot.phase.map(|p| phase_name(p).to_owned()),
        phase_tasks: snapshot.phase_counts,
        leases_held_back: held_back,
        overall_tasks: snapshot.overall,
        stages: snapshot
            .stages
            .iter()
            .map(|s| StageReport { iteration: s.iteration, phase: phase_name(s.phase).to_owned(), tasks: s.counts })
            .collect(),
        workers_alive: alive,
        workers_dead: workers.len() as u64 - alive,
        workers_removed: snapshot.workers_removed,
        workers,
        gang: snapshot.gang.as_ref().map(|g| GangReport {
            task: g.task.to_string(),
            attempt: g.attempt,
            world: g.world,
            joined: g.ranks.iter().filter(|r| r.joined).count() as u32,
            started: g.started,
        }),
        throughput: Throughput {
            window_s: now_ms.saturating_sub(telemetry.started_ms).clamp(1_000, WINDOW_MS) as f64 / 1000.0,
            tasks_per_minute,
            records_per_second,
            tasks_accepted: telemetry.tasks_accepted,
            records: telemetry.records,
            tokens: telemetry.tokens,
        },
        eta_s,
        recent_errors: snapshot
            .recent_errors
            .iter()
            .map(|e| ErrorReport {
                at_ms: e.at_ms,
                age_ms: now_ms.saturating_sub(e.at_ms),
                task: e.task.to_string(),
                cause: e.cause.kind().to_owned(),
                message: e.message.clone(),
            })
            .collect(),
        recent_rejections: telemetry.recent_rejections.iter().cloned().collect(),
        log: LogReport { index: log_index, recovered: telemetry.recovered, error: telemetry.log_error.clone() },
        raft,
    }
}

fn counters(telemetry: &Telemetry) -> Counters {
    Counters {
        applied: telemetry.applied.clone(),
        rejected: telemetry.rejected.clone(),
        fenced: telemetry.fenced.clone(),
        losses: telemetry.losses.clone(),
        outputs_rejected: telemetry.outputs_rejected.clone(),
        log_batches: telemetry.log_batches,
        log_entries: telemetry.log_entries,
        log_sync: telemetry.log_sync.clone(),
        started_ms: telemetry.started_ms,
    }
}

pub fn router(context: StatusContext) -> Router {
    Router::new()
        .route("/", get(page_route))
        .route("/status", get(status_route))
        .route("/metrics", get(metrics_route))
        .route("/livez", get(probe_route))
        .route("/readyz", get(probe_route))
        .with_state(context)
}

/// `/livez` and `/readyz`: 200 while the driver serves, 503 once a command log write failed or the
/// driver ended. They need no token (kubelet probes carry none) and say nothing but that. Readiness
/// also means "the log is replayed": the status listener serves only once it is. Both fail after a log
/// error, so the Service stops routing workers here and the kubelet restarts the pod even if the
/// process were not to exit by itself. A slow write is not a failure: the probes answer meanwhile.
async fn probe_route(State(context): State<StatusContext>) -> Response {
    match context.handle.health() {
        Health::Serving => (StatusCode::OK, "ok\n").into_response(),
        Health::LogFailed { error } => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("the command log could not be written: {error}\n"))
                .into_response()
        }
        Health::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "the coordinator driver has stopped\n").into_response(),
    }
}

/// Err: the response to send instead (unauthorized, or the driver is gone).
async fn collect(context: &StatusContext, headers: &HeaderMap) -> Result<(StatusReport, Counters), Response> {
    if let Some(tokens) = &context.tokens {
        let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        // Every token is compared (no early exit), so the time says nothing about which one matched.
        let matched = tokens.iter().fold(false, |any, token| any | token.matches_header(given));
        if !matched {
            context.rpc.auth_failure();
            return Err((
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this status endpoint requires `Authorization: Bearer <status token>`\n",
            )
                .into_response());
        }
    }
    let run_id = context.run_id.clone();
    context
        .handle
        .read(move |view| {
            let counters = counters(view.telemetry);
            (report(&run_id, view), counters)
        })
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response())
}

async fn status_route(State(context): State<StatusContext>, headers: HeaderMap) -> Response {
    match collect(&context, &headers).await {
        Ok((report, _)) => axum::Json(report).into_response(),
        Err(response) => response,
    }
}

async fn metrics_route(State(context): State<StatusContext>, headers: HeaderMap) -> Response {
    match collect(&context, &headers).await {
        Ok((report, counters)) => {
            ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::render(&report, &counters, &context.rpc))
                .into_response()
        }
        Err(response) => response,
    }
}

async fn page_route(State(context): State<StatusContext>, headers: HeaderMap) -> Response {
    match collect(&context, &headers).await {
        Ok((report, _)) => axum::response::Html(page::render(&report)).into_response(),
        Err(response) => response,
    }
}
