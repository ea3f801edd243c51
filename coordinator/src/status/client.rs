//! The other end of the status endpoint, for `iro status --coordinator URL[,URL...]`: a minimal HTTP/1.1 GET
//! (`http://`, or `https://` verified against a CA file; no client crate needed for one request) and a
//! terminal table of the report.

use std::fmt::Write;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::StatusReport;
use super::page::duration;
use crate::driver::{ClientTls, ClusterToken};
use crate::error::{Error, Result};

/// A response: status code, `content-type`, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET {base}{path}` where `base` is `http://host:port` (a trailing slash is fine).
pub async fn get(base: &str, path: &str, token: Option<&ClusterToken>) -> Result<HttpResponse> {
    get_with(base, path, token, None).await
}

/// `get`, and for an `https://host:port` base the TLS to verify the coordinator with.
pub async fn get_with(
    base: &str,
    path: &str,
    token: Option<&ClusterToken>,
    tls: Option<&ClientTls>,
) -> Result<HttpResponse> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let fail = |message: String| Error::Unavailable { message: format!("GET {url}: {message}") };
    let (authority, tls, default_port) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
        (Some(rest), _) => (rest, None, 80),
        (_, Some(rest)) => {
            let tls = tls.ok_or_else(|| fail("an https:// URL needs the CA to verify it with (--tls-ca)".into()))?;
            (rest, Some(tls), 443)
        }
        _ => return Err(fail("only http:// and https:// URLs are supported".into())),
    };
    let authority = authority.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(fail("expected http(s)://HOST:PORT".into()));
    }
    let has_port = authority.rsplit_once(':').is_some_and(|(_, port)| !port.contains(']'));
    let authority = if has_port { authority.to_owned() } else { format!("{authority}:{default_port}") };
    let host = authority.rsplit_once(':').map_or(authority.as_str(), |(host, _)| host).to_owned();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: */*\r\n");
    if let Some(token) = token {
        let _ = write!(request, "Authorization: Bearer {}\r\n", token.expose());
    }
    request.push_str("\r\n");
    let exchange = async {
        let stream = TcpStream::connect(&authority).await.map_err(|e| fail(e.to_string()))?;
        match tls {
            None => exchange(stream, &request).await,
            Some(tls) => {
                let stream = tls.connect(&host, stream).await.map_err(|e| format!("TLS: {e}")).map_err(fail)?;
                exchange(stream, &request).await
            }
        }
        .map_err(|e| fail(e.to_string()))
    };
    let bytes = tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| fail("timed out".into()))??;
    parse_response(&bytes).map_err(fail)
}

async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> std::io::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes).await {
        Ok(_) => Ok(bytes),
        // A TLS peer that closes without close_notify: the response is complete if its length says so,
        // which `parse_response` checks.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !bytes.is_empty() => Ok(bytes),
        Err(e) => Err(e),
    }
}

fn parse_response(bytes: &[u8]) -> std::result::Result<HttpResponse, String> {
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&bytes[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let mut content_type = String::new();
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.to_owned(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "content-length" => length = value.parse().ok(),
            _ => {}
        }
    }
    let raw = &bytes[split + 4..];
    let body = if chunked { dechunk(raw)? } else { raw.to_vec() };
    if length.is_some_and(|length| body.len() < length) {
        return Err(format!("truncated body: {} of {} bytes", body.len(), length.unwrap_or_default()));
    }
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok(HttpResponse { status, content_type, body })
}

fn dechunk(mut raw: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&raw[..end]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size `{size_text}`"))?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if raw.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// The coordinator's `/status`, parsed.
pub async fn fetch_status(base: &str, token: Option<&ClusterToken>) -> Result<StatusReport> {
    fetch_status_with(base, token, None).await
}

/// `fetch_status` with the TLS an `https://` base needs.
pub async fn fetch_status_with(
    base: &str,
    token: Option<&ClusterToken>,
    tls: Option<&ClientTls>,
) -> Result<StatusReport> {
    let response = get_with(base, "/status", token, tls).await?;
    if response.status != 200 {
        return Err(Error::Unavailable {
            message: format!("GET {base}/status answered {}: {}", response.status, response.body.trim()),
        });
    }
    serde_json::from_str(&response.body)
        .map_err(|e| Error::Unavailable { message: format!("GET {base}/status: not a status report: {e}") })
}

/// `fetch_status_with` on each of `bases` in order (every replica of a replicated coordinator serves
/// `/status`) until one answers with a report. With one base, its error as is; with several, when none
/// answers, an error naming each one's failure.
pub async fn fetch_status_from(
    bases: &[&str],
    token: Option<&ClusterToken>,
    tls: Option<&ClientTls>,
) -> Result<StatusReport> {
    let mut tried: Vec<&str> = Vec::new();
    let mut failures = Vec::new();
    for &base in bases {
        if tried.contains(&base) {
            continue;
        }
        tried.push(base);
        match fetch_status_with(base, token, tls).await {
            Ok(report) => return Ok(report),
            Err(e) => failures.push(e),
        }
    }
    match failures.len() {
        0 => Err(Error::Unavailable { message: "no status URL given".to_owned() }),
        1 => Err(failures.remove(0)),
        n => {
            let each: Vec<String> = failures
                .into_iter()
                .map(|e| match e {
                    Error::Unavailable { message } => message,
                    other => other.to_string(),
                })
                .collect();
            Err(Error::Unavailable { message: format!("none of the {n} status URLs answered: {}", each.join("; ")) })
        }
    }
}

/// The report as a terminal table (what `iro status` prints).
pub fn render_table(report: &StatusReport) -> String {
    let mut out = String::new();
    let stage = match (report.iteration, &report.phase) {
        (Some(t), Some(phase)) => format!("iteration {t}/{}, {phase}", report.iterations),
        _ => "-".to_owned(),
    };
    let _ = writeln!(out, "run {}  {}  {stage}", report.run_id, report.status);
    if let Some(reason) = &report.failure {
        let _ = writeln!(out, "failure: {reason}");
    }
    if let Some(why) = &report.leases_held_back {
        let _ = writeln!(out, "leases held back: {why}");
    }
    let _ = writeln!(
        out,
        "throughput {:.1} tasks/min, {:.1} records/s   ETA {}   log {} commands",
        report.throughput.tasks_per_minute,
        report.throughput.records_per_second,
        report.eta_s.map_or_else(|| "-".to_owned(), duration),
        report.log.index
    );
    let _ = writeln!(out, "\n{:<18} {:>8} {:>8} {:>8} {:>8}", "tasks", "pending", "leased", "done", "failed");
    let mut row = |label: &str, c: &crate::state::Counts| {
        let _ = writeln!(out, "{label:<18} {:>8} {:>8} {:>8} {:>8}", c.pending, c.leased, c.done, c.failed);
    };
    row("current phase", &report.phase_tasks);
    row("overall", &report.overall_tasks);
    let _ = writeln!(
        out,
        "\nworkers: {} alive, {} dead\n{:<12} {:<20} {:<8} {:<11} {:>9} {:<22} {:>6}",
        report.workers_alive, report.workers_dead, "id", "name", "device", "state", "heartbeat", "task", "done"
    );
    for w in &report.workers {
        let task = match (&w.current_task, w.attempt) {
            (Some(task), Some(attempt)) => format!("{task}#{attempt}"),
            _ => "idle".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<12} {:<20} {:<8} {:<11} {:>9} {:<22} {:>6}",
            w.id,
            w.name,
            w.device,
            w.state(),
            format!("{} ago", duration(w.last_heartbeat_age_ms as f64 / 1000.0)),
            task,
            w.completed
        );
    }
    if !report.recent_errors.is_empty() {
        let _ = writeln!(out, "\nrecent errors:");
        for e in &report.recent_errors {
            let _ = writeln!(out, "  {} {} ({}): {}", duration(e.age_ms as f64 / 1000.0), e.task, e.cause, e.message);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, r.content_type.as_str(), r.body.as_str()), (200, "application/json", "{}"));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body, "abcde");
        assert!(parse_response(b"garbage").is_err());
    }
}
