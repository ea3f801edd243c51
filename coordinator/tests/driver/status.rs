//! The operators' endpoint: `/status` JSON, `/metrics` Prometheus text and `/` HTML, with the numbers
//! of the run behind them, including a dead worker and its re-leased task.

use iro_coordinator::driver::ManualClock;
use iro_proto as pb;

use crate::support::*;

#[tokio::test]
async fn status_metrics_and_page_answer_with_their_content_types_and_the_run_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let a = register(&mut client, "pod-<a>").await;
    let first = take(&mut client, &a).await;
    clock.advance(20_000);
    assert!(complete(&mut client, &a, &first).await.accepted);
    let second = take(&mut client, &a).await;
    let heartbeat = pb::HeartbeatRequest {
        worker_id: a.clone(),
        task_id: second.task_id.clone(),
        attempt: second.attempt,
        progress_done: 10,
        progress_total: 64,
    };
    let beat = client.heartbeat(heartbeat).await.unwrap().into_inner();
    assert!(beat.keep_working && beat.lease_deadline_unix_ms > 0);
    clock.advance(4_000);

    let response = http(&server, "/status").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.content_type, "application/json");
    let report: iro_coordinator::status::StatusReport = serde_json::from_str(&response.body).unwrap();
    assert_eq!((report.run_id.as_str(), report.status.as_str()), ("itest", "running"));
    assert_eq!((report.iteration, report.phase.as_deref()), (Some(1), Some("rollout")));
    assert_eq!((report.phase_tasks.done, report.phase_tasks.leased, report.phase_tasks.pending), (1, 1, 0));
    assert_eq!((report.overall_tasks.done, report.overall_tasks.total()), (1, 4));
    assert_eq!(report.workers.len(), 1);
    let w = &report.workers[0];
    assert_eq!((w.name.as_str(), w.alive, w.last_heartbeat_age_ms), ("pod-<a>", true, 4_000));
    assert_eq!((w.current_task.as_deref(), w.progress_done, w.progress_total), (Some("iter-1/rollout/1"), 10, 64));
    // One task of 64 records in the 24 s this coordinator has run.
    assert!((report.throughput.tasks_per_minute - 2.5).abs() < 1e-9, "{:?}", report.throughput);
    assert!((report.throughput.records_per_second - 64.0 / 24.0).abs() < 1e-9, "{:?}", report.throughput);
    let eta = report.eta_s.unwrap();
    assert!((eta - 3.0 * 24.0).abs() < 1e-6, "3 tasks left at 24 s each: {eta}");

    let metrics = http(&server, "/metrics").await;
    assert_eq!(metrics.content_type, "text/plain; version=0.0.4; charset=utf-8");
    let build = format!("iro_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(metrics.body.lines().any(|l| l.starts_with("process_start_time_seconds ")), "{}", metrics.body);
    assert!(metrics.body.contains("iro_log_sync_duration_seconds_bucket{le=\"30\"}"), "{}", metrics.body);
    for line in [
        "iro_run_status{status=\"running\"} 1",
        "iro_tasks{phase=\"rollout\",state=\"done\"} 1",
        "iro_tasks{phase=\"rollout\",state=\"leased\"} 1",
        "iro_tasks{phase=\"eval\",state=\"pending\"} 1",
        "iro_current_stage_tasks{state=\"done\"} 1",
        "iro_workers{state=\"alive\"} 1",
        "iro_tasks_accepted_total 1",
        "iro_records_total 64",
        "iro_commands_total{command=\"lease_task\"} 2",
        "iro_rpc_requests_total{method=\"lease_task\",code=\"ok\"} 2",
        "iro_rpc_duration_seconds_count{method=\"complete_task\"} 1",
        // Labelled counters exist at zero before their first event; the build and the start time are there.
        "iro_fenced_total{kind=\"stale_attempt\"} 0",
        "iro_lease_losses_total{cause=\"infrastructure\"} 0",
        "iro_commands_total{command=\"abort_gang\"} 0",
        build.as_str(),
        "iro_leases_held_back 0",
    ] {
        assert!(metrics.body.lines().any(|l| l == line), "missing `{line}` in\n{}", metrics.body);
    }
    assert!(!metrics.body.contains(&a), "worker ids are never metric labels");
    assert!(!metrics.body.contains("iter-1/"), "task ids are never metric labels");

    let page = http(&server, "/").await;
    assert_eq!(page.content_type, "text/html; charset=utf-8");
    assert!(page.body.contains("http-equiv=\"refresh\""), "the page refreshes itself");
    assert!(page.body.contains("<progress value=\"1\" max=\"4\">"), "overall progress bar");
    assert!(page.body.contains("pod-&lt;a&gt;") && !page.body.contains("pod-<a>"), "worker names are escaped");
    server.shutdown().await;
}

#[tokio::test]
async fn a_silent_worker_shows_as_dead_and_its_task_is_leased_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let a = register(&mut client, "pod-a").await;
    let b = register(&mut client, "pod-b").await;
    let held = take(&mut client, &a).await;

    // pod-b keeps heartbeating; pod-a goes silent past the worker timeout.
    clock.advance(WORKER_TIMEOUT_MS / 2);
    client.heartbeat(pb::HeartbeatRequest { worker_id: b.clone(), ..Default::default() }).await.unwrap();
    clock.advance(WORKER_TIMEOUT_MS / 2);
    let report = wait_for(&server, "pod-a to be declared dead", |r| r.workers_dead == 1).await;
    let dead = report.workers.iter().find(|w| w.id == a).unwrap();
    assert!(!dead.alive && dead.current_task.is_none());
    assert_eq!(report.recent_errors.len(), 1);
    assert_eq!(report.recent_errors[0].cause, "worker_dead");
    assert_eq!(report.recent_errors[0].task, held.task_id);

    clock.advance(1_000); // the lost task's first backoff
    let retaken = take(&mut client, &b).await;
    assert_eq!((retaken.task_id.as_str(), retaken.attempt), (held.task_id.as_str(), 2));
    let page = http(&server, "/").await.body;
    assert!(page.contains("class=\"dead\""), "the page marks the dead worker");
    let metrics = http(&server, "/metrics").await.body;
    assert!(metrics.contains("iro_workers{state=\"dead\"} 1\n"));
    assert!(metrics.contains("iro_lease_losses_total{cause=\"worker_dead\"} 1\n"), "{metrics}");

    // The dead worker's late completion is fenced, and the heartbeat tells it to stop.
    let late = complete(&mut client, &a, &held).await;
    assert_eq!(late.fence.unwrap().kind, "stale_attempt");
    let beat =
        pb::HeartbeatRequest { worker_id: a.clone(), task_id: held.task_id.clone(), attempt: 1, ..Default::default() };
    let beat = client.heartbeat(beat).await.unwrap().into_inner();
    assert!(!beat.keep_working && beat.fence.is_some());
    server.shutdown().await;
}

/// `promtool check metrics` (Debian's `prometheus` package) on a live `/metrics` with every kind of series in
/// it: counters, gauges, histograms, labelled families at zero and at one. Where promtool is not installed
/// the test says so loudly and returns (set `PROMTOOL` to point at one elsewhere); that is not a pass.
#[tokio::test]
async fn live_metrics_pass_promtool_check_metrics() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
    if let Err(e) = std::process::Command::new(&promtool).arg("--version").output() {
        eprintln!(
            "\n*** SKIPPED live_metrics_pass_promtool_check_metrics: cannot run `{promtool}` ({e}); install Debian's \
             `prometheus` package (or set PROMTOOL) to check /metrics ***\n"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let mut client = client(&server).await;
    let a = register(&mut client, "pod-a").await;
    let b = register(&mut client, "pod-b").await;
    let task = take(&mut client, &a).await;
    assert!(complete(&mut client, &a, &task).await.accepted);
    take(&mut client, &b).await;
    // b goes silent and loses its lease: the loss counters and the dead-worker gauge move too.
    clock.advance(WORKER_TIMEOUT_MS / 2);
    heartbeat_idle(&mut client, &a).await;
    clock.advance(WORKER_TIMEOUT_MS / 2 + 1);
    heartbeat_idle(&mut client, &a).await;
    wait_for(&server, "b to be declared dead", |r| r.workers_dead == 1).await;
    let body = http(&server, "/metrics").await.body;
    assert!(body.contains("iro_lease_losses_total{cause=\"worker_dead\"} 1"), "{body}");

    let mut check = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics ({}): {said}\n{body}", out.status);
    server.shutdown().await;
}

async fn heartbeat_idle(client: &mut Client, worker: &str) {
    let request = pb::HeartbeatRequest { worker_id: worker.into(), ..Default::default() };
    client.heartbeat(request).await.unwrap();
}

/// `iro status --coordinator A,B`: a replica that does not answer is passed over for the next; when none
/// answers, the error names each.
#[tokio::test]
async fn status_tries_each_listed_url_until_one_answers() {
    use iro_coordinator::status::client::fetch_status_from;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let server = start(dir.path(), &clock).await;
    let closed = || {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        format!("http://{addr}")
    };
    let (down, also_down) = (closed(), closed());
    let up = server.status_url();
    let report = fetch_status_from(&[&down, &up], None, None).await.unwrap();
    assert_eq!(report.run_id, "itest");
    let error = fetch_status_from(&[&down, &also_down, &down], None, None).await.unwrap_err().to_string();
    assert!(error.contains("none of the 2 status URLs answered"), "{error}");
    assert!(
        error.contains(&format!("GET {down}/status")) && error.contains(&format!("GET {also_down}/status")),
        "{error}"
    );
    let one = fetch_status_from(&[&down], None, None).await.unwrap_err().to_string();
    assert!(one.starts_with(&format!("coordinator unavailable: GET {down}/status")), "{one}");
}
