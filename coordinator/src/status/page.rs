//! `GET /`: one small HTML page rendered on the server, refreshed by the browser every few seconds
//! (a meta refresh, no script). Everything a worker sent (names, errors) is escaped.

use std::fmt::Write;

use super::StatusReport;
use crate::state::Counts;

pub const REFRESH_S: u32 = 5;

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bar(label: &str, counts: &Counts) -> String {
    let total = counts.total().max(1);
    format!(
        "<tr><td>{}</td><td><progress value=\"{}\" max=\"{total}\"></progress></td>\
         <td>{} / {} done</td><td>{} leased</td><td>{} pending</td><td>{} failed</td></tr>\n",
        escape(label),
        counts.done,
        counts.done,
        counts.total(),
        counts.leased,
        counts.pending,
        counts.failed
    )
}

pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn render(report: &StatusReport) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let stage = match (report.iteration, &report.phase) {
        (Some(t), Some(phase)) => format!("iteration {t} of {}, {phase}", report.iterations),
        _ => "—".to_owned(),
    };
    let _ = write!(
        html,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <title>iro {run}: {status}</title><style>\
         body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}\
         td,th{{padding:2px 10px;text-align:left}}tr:nth-child(even){{background:#f4f4f4}}\
         progress{{width:18em}}.dead{{color:#b00}}.quarantined{{color:#c60}}.failed{{color:#b00;font-weight:bold}}\
         </style></head><body>\n<h1>iro run <code>{run}</code>: <span class=\"{status}\">{status}</span></h1>\n\
         <p>{stage} · workers {alive} alive, {dead} dead{removed} · {tpm:.1} tasks/min, {rps:.1} records/s · ETA {eta} \
         · log {index} commands</p>\n",
        run = escape(&report.run_id),
        status = escape(&report.status),
        alive = report.workers_alive,
        dead = report.workers_dead,
        removed = match report.workers_removed {
            0 => String::new(),
            n => format!(" ({n} more dead and removed)"),
        },
        tpm = report.throughput.tasks_per_minute,
        rps = report.throughput.records_per_second,
        eta = report.eta_s.map_or_else(|| "—".to_owned(), duration),
        index = report.log.index,
    );
    if let Some(reason) = &report.failure {
        let _ = writeln!(html, "<p class=\"failed\">{}</p>", escape(reason));
    }
    if let Some(error) = &report.log.error {
        let _ = writeln!(html, "<p class=\"failed\">command log: {}</p>", escape(error));
    }
    if let Some(why) = &report.leases_held_back {
        let _ = writeln!(html, "<p>leases held back: {}</p>", escape(why));
    }
    html.push_str("<h2>Progress</h2>\n<table>\n");
    html.push_str(&bar("overall", &report.overall_tasks));
    for stage in &report.stages {
        html.push_str(&bar(&format!("iter {} {}", stage.iteration, stage.phase), &stage.tasks));
    }
    html.push_str("</table>\n");
    if let Some(gang) = &report.gang {
        let _ = writeln!(
            html,
            "<p>train gang {} attempt {}: {} of {} ranks joined{}</p>",
            escape(&gang.task),
            gang.attempt,
            gang.joined,
            gang.world,
            if gang.started { ", running" } else { "" }
        );
    }
    html.push_str(
        "<h2>Workers</h2>\n<table><tr><th>name</th><th>id</th><th>device</th><th>state</th>\
         <th>last heartbeat</th><th>task</th><th>progress</th><th>done</th><th>failures</th></tr>\n",
    );
    for w in &report.workers {
        let task = match (&w.current_task, w.attempt) {
            (Some(task), Some(attempt)) => format!("{} (attempt {attempt})", escape(task)),
            _ => "idle".to_owned(),
        };
        let _ = writeln!(
            html,
            "<tr class=\"{class}\"><td>{name}</td><td>{id}</td><td>{device}</td><td>{class}</td><td>{age} ago</td>\
             <td>{task}</td><td>{done}/{total}</td><td>{completed}</td><td>{failures}</td></tr>",
            class = w.state(),
            name = escape(&w.name),
            id = escape(&w.id),
            device = escape(&w.device),
            age = duration(w.last_heartbeat_age_ms as f64 / 1000.0),
            done = w.progress_done,
            total = w.progress_total,
            completed = w.completed,
            failures = w.failures,
        );
    }
    html.push_str("</table>\n");
    if !report.recent_errors.is_empty() || !report.recent_rejections.is_empty() {
        html.push_str("<h2>Recent errors</h2>\n<ul>\n");
        for e in report.recent_errors.iter().rev() {
            let _ = writeln!(
                html,
                "<li>{} ago · {} · {}: {}</li>",
                duration(e.age_ms as f64 / 1000.0),
                escape(&e.task),
                escape(&e.cause),
                escape(&e.message)
            );
        }
        for r in report.recent_rejections.iter().rev() {
            let age = report.now_ms.saturating_sub(r.at_ms);
            let _ = writeln!(
                html,
                "<li>{} ago · refused {} ({}): {}</li>",
                duration(age as f64 / 1000.0),
                escape(&r.command),
                escape(&r.kind),
                escape(&r.message)
            );
        }
        html.push_str("</ul>\n");
    }
    let _ = writeln!(
        html,
        "<p><small>refreshes every {REFRESH_S}s · <a href=\"/status\">/status</a> · \
         <a href=\"/metrics\">/metrics</a></small></p>\n</body></html>"
    );
    html
}
