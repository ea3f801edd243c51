//! The store against a real S3-compatible server: `moto_server` (PyPI `moto[server]`, installed into
//! .deps/venv by scripts/moto.sh), started here on a free loopback port and killed when the test ends.
//! Credentials, region and endpoint reach the store through the environment, as in a deployment.
//!
//! This file holds a single test on purpose: it sets environment variables, which is only sound while no
//! other thread of the process reads them.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use iro_common::store::Store;

/// Kills the server when the test ends, also when it panics.
struct MotoServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoServer {
    fn start(dir: &Path) -> Self {
        let binary = find_moto_server().unwrap_or_else(|| {
            panic!(
                "moto_server not found in .deps/venv/bin or on PATH: run scripts/moto.sh to install it \
                 (this test needs a real S3-compatible server and never passes without one)"
            )
        });
        let port = free_port();
        let log = dir.join("moto.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = MotoServer { child, port, log };
        server.wait_until_it_answers(Duration::from_secs(60));
        server
    }

    fn wait_until_it_answers(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("moto_server exited with {status}; log:\n{}", self.log_text());
            }
            if http(self.port, "GET", "/").is_ok_and(|reply| reply.starts_with("HTTP/1.")) {
                return;
            }
            assert!(start.elapsed() < limit, "moto_server did not answer within {limit:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn create_bucket(&self, bucket: &str) {
        let reply = http(self.port, "PUT", &format!("/{bucket}")).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "create bucket: {reply}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn find_moto_server() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/venv/bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join("moto_server")).find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A minimal HTTP/1.1 request with no body; returns the whole reply.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

#[tokio::test]
async fn s3_store_against_moto_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = MotoServer::start(dir.path());
    server.create_bucket("iro-test");

    // SAFETY: this binary runs this one test, and nothing else in the process reads the environment meanwhile.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", server.port));
        std::env::set_var("AWS_ALLOW_HTTP", "true");
    }

    let store = Store::open("s3://iro-test/team/exp1").unwrap();
    assert_eq!(store.url(), "s3://iro-test/team/exp1");
    support::basic_contract(&store).await;
    support::manifest_round_trip(&store).await;

    // The prefix is real: seen from the bucket root, every key sits under it.
    let root = Store::open("s3://iro-test").unwrap();
    let keys = root.list("").await.unwrap();
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with("team/exp1/")), "{keys:?}");
    assert!(keys.contains(&"team/exp1/runs/run-7/iter-2/rollout/manifest.json".to_owned()), "{keys:?}");

    // A bucket that does not exist is an error naming the store, not a silent empty answer.
    let missing = Store::open("s3://no-such-bucket").unwrap();
    for err in [missing.put("x", "y").await.unwrap_err(), missing.get("x").await.unwrap_err()] {
        eprintln!("missing bucket: {err}");
        assert_eq!(err.kind(), "store_io", "{err}");
        assert!(err.to_string().contains("s3://no-such-bucket") && err.to_string().contains("bucket does not exist"));
    }

    drop(server);
}
