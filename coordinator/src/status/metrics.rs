//! `/metrics` in the Prometheus text format (0.0.4). Labels come only from closed sets: phase, task
//! state, worker state, command, error kind, fence kind, loss cause, RPC method and code. Worker and
//! task ids never become labels; the only per-run label is the run id on `iro_run_info`.

use std::fmt::Write;

use super::{Counters, StatusReport};
use crate::driver::telemetry::{Histogram, LATENCY_BUCKETS, RpcMetrics};
use crate::state::Counts;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn states(counts: &Counts) -> [(&'static str, u64); 4] {
    [("pending", counts.pending), ("leased", counts.leased), ("done", counts.done), ("failed", counts.failed)]
}

pub fn render(report: &StatusReport, counters: &Counters, rpc: &RpcMetrics) -> String {
    let mut out = Out(String::with_capacity(8 * 1024));

    out.family("iro_build_info", "gauge", "The iro build serving this endpoint (always 1).");
    out.sample("iro_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    out.family(
        "process_start_time_seconds",
        "gauge",
        "When this coordinator started, in seconds since the Unix epoch.",
    );
    out.sample("process_start_time_seconds", &[], counters.started_ms as f64 / 1000.0);
    out.family("iro_run_info", "gauge", "The run this coordinator drives (always 1).");
    out.sample("iro_run_info", &[("run_id", &report.run_id)], 1);
    out.family("iro_run_status", "gauge", "1 for the run's current status.");
    for status in ["running", "finished", "failed"] {
        out.sample("iro_run_status", &[("status", status)], u8::from(report.status == status));
    }
    out.family("iro_iteration", "gauge", "The active iteration (0 once the run is over).");
    out.sample("iro_iteration", &[], report.iteration.unwrap_or(0));
    out.family("iro_iterations", "gauge", "Iterations in the run.");
    out.sample("iro_iterations", &[], report.iterations);
    out.family("iro_current_phase", "gauge", "1 for the active phase.");
    for phase in ["rollout", "train", "eval"] {
        out.sample("iro_current_phase", &[("phase", phase)], u8::from(report.phase.as_deref() == Some(phase)));
    }

    out.family("iro_tasks", "gauge", "Tasks of the whole run by phase (summed over iterations) and state.");
    for phase in ["rollout", "train", "eval"] {
        let mut counts = Counts::default();
        for stage in report.stages.iter().filter(|s| s.phase == phase) {
            counts.pending += stage.tasks.pending;
            counts.leased += stage.tasks.leased;
            counts.done += stage.tasks.done;
            counts.failed += stage.tasks.failed;
        }
        for (state, n) in states(&counts) {
            out.sample("iro_tasks", &[("phase", phase), ("state", state)], n);
        }
    }
    out.family("iro_current_stage_tasks", "gauge", "Tasks of the active (iteration, phase) by state.");
    for (state, n) in states(&report.phase_tasks) {
        out.sample("iro_current_stage_tasks", &[("state", state)], n);
    }

    out.family("iro_workers", "gauge", "Registered workers by liveness.");
    out.sample("iro_workers", &[("state", "alive")], report.workers_alive);
    out.sample("iro_workers", &[("state", "dead")], report.workers_dead);
    out.family(
        "iro_workers_removed_total",
        "counter",
        "Records of dead workers removed (dead for the retention, or dropped to make room); no longer in iro_workers.",
    );
    out.sample("iro_workers_removed_total", &[], report.workers_removed);
    out.family("iro_workers_quarantined", "gauge", "Live workers that failed too many tasks in a row and get no work.");
    out.sample("iro_workers_quarantined", &[], report.workers.iter().filter(|w| w.state() == "quarantined").count());
    out.family("iro_workers_busy", "gauge", "Workers holding a lease.");
    out.sample("iro_workers_busy", &[], report.workers.iter().filter(|w| w.current_task.is_some()).count());

    // No precomputed rates (not base units): dashboards take rate() of the _total counters below.
    out.family("iro_leases_held_back", "gauge", "1 while the active stage's leases wait for the manifests it reads.");
    out.sample("iro_leases_held_back", &[], u8::from(report.leases_held_back.is_some()));
    if let Some(eta) = report.eta_s {
        out.family(
            "iro_eta_seconds",
            "gauge",
            "Estimated seconds until the run's tasks are done, at the current rate.",
        );
        out.sample("iro_eta_seconds", &[], eta);
    }
    out.family("iro_tasks_accepted_total", "counter", "Accepted task outputs since this coordinator started.");
    out.sample("iro_tasks_accepted_total", &[], report.throughput.tasks_accepted);
    out.family("iro_records_total", "counter", "Records in accepted outputs since this coordinator started.");
    out.sample("iro_records_total", &[], report.throughput.records);
    out.family("iro_tokens_total", "counter", "Tokens in accepted outputs since this coordinator started.");
    out.sample("iro_tokens_total", &[], report.throughput.tokens);

    out.family("iro_commands_total", "counter", "Commands applied to the run state, by command.");
    for (command, n) in &counters.applied {
        out.sample("iro_commands_total", &[("command", command)], n);
    }
    out.family("iro_commands_rejected_total", "counter", "Commands the run state refused, by command and error kind.");
    for ((command, kind), n) in &counters.rejected {
        out.sample("iro_commands_rejected_total", &[("command", command), ("kind", kind)], n);
    }
    out.family("iro_fenced_total", "counter", "Reports ignored because the lease was not the sender's, by fence kind.");
    for (kind, n) in &counters.fenced {
        out.sample("iro_fenced_total", &[("kind", kind)], n);
    }
    out.family("iro_lease_losses_total", "counter", "Leases that ended without a completion, by cause.");
    for (cause, n) in &counters.losses {
        out.sample("iro_lease_losses_total", &[("cause", cause)], n);
    }

    out.family(
        "iro_outputs_rejected_total",
        "counter",
        "Accepted outputs the manifest writer found missing or wrong and re-opened as a new attempt, by problem.",
    );
    for (problem, n) in &counters.outputs_rejected {
        out.sample("iro_outputs_rejected_total", &[("problem", problem)], n);
    }

    out.family("iro_log_index", "gauge", "Commands in the durable command log.");
    out.sample("iro_log_index", &[], report.log.index);
    out.family("iro_log_writes_total", "counter", "Batched, fsync'd writes of the command log.");
    out.sample("iro_log_writes_total", &[], counters.log_batches);
    out.family("iro_log_entries_total", "counter", "Commands written to the command log.");
    out.sample("iro_log_entries_total", &[], counters.log_entries);
    out.family("iro_log_sync_duration_seconds", "histogram", "Each batched write and fsync of the command log.");
    histogram(&mut out, "iro_log_sync_duration_seconds", &[], &counters.log_sync);
    out.family("iro_log_healthy", "gauge", "0 once the command log could not be written (commands are refused).");
    out.sample("iro_log_healthy", &[], u8::from(report.log.error.is_none()));

    if let Some(raft) = &report.raft {
        out.family("iro_raft_term", "gauge", "This replica's Raft term.");
        out.sample("iro_raft_term", &[], raft.term);
        out.family("iro_raft_is_leader", "gauge", "1 on the replica that leads (answers workers), 0 elsewhere.");
        out.sample("iro_raft_is_leader", &[], u8::from(raft.role == "leader"));
        out.family("iro_raft_commit_index", "gauge", "The highest Raft entry this replica knows committed.");
        out.sample("iro_raft_commit_index", &[], raft.commit_index);
        out.family("iro_raft_applied_index", "gauge", "The highest Raft entry applied to this replica's run state.");
        out.sample("iro_raft_applied_index", &[], raft.applied_index);
        out.family("iro_raft_leader_changes_total", "counter", "Changes of the leader this replica has seen.");
        out.sample("iro_raft_leader_changes_total", &[], raft.leader_changes);
    }

    out.family("iro_rpc_requests_total", "counter", "gRPC calls by method and status code.");
    for ((method, code), n) in rpc.calls() {
        out.sample("iro_rpc_requests_total", &[("method", method), ("code", code)], n);
    }
    out.family("iro_auth_failures_total", "counter", "Calls refused for a missing or wrong cluster token.");
    out.sample("iro_auth_failures_total", &[], rpc.auth_failures.load(std::sync::atomic::Ordering::Relaxed));
    out.family("iro_rpc_duration_seconds", "histogram", "gRPC handler latency by method.");
    for (method, h) in rpc.latency() {
        histogram(&mut out, "iro_rpc_duration_seconds", &[("method", method)], &h);
    }
    out.0
}

/// One histogram's `_bucket` (cumulative, `le` last), `_sum` and `_count` samples.
fn histogram(out: &mut Out, name: &str, labels: &[(&str, &str)], h: &Histogram) {
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += h.counts[i];
        let le = bound.to_string();
        out.sample(&bucket, &[labels, &[("le", le.as_str())]].concat(), cumulative);
    }
    out.sample(&bucket, &[labels, &[("le", "+Inf")]].concat(), h.count);
    out.sample(&format!("{name}_sum"), labels, h.sum);
    out.sample(&format!("{name}_count"), labels, h.count);
}
