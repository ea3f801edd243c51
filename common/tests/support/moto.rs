//! A real S3-compatible server for tests: `moto_server` (PyPI `moto[server]`, installed into .deps/venv by
//! scripts/moto.sh) on a free loopback port, killed when the handle drops. Shared by common/tests/s3.rs and
//! worker/tests/pipeline_s3.rs (included by path).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, also when it panics.
pub struct MotoServer {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoServer {
    pub fn start(dir: &Path) -> Self {
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

    pub fn create_bucket(&self, bucket: &str) {
        let reply = http(self.port, "PUT", &format!("/{bucket}")).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "create bucket: {reply}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn find_moto_server() -> Option<PathBuf> {
    // Both crates sit one level below the workspace root.
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

impl MotoServer {
    /// Points the AWS_* variables at this server.
    ///
    /// # Safety
    /// Sets environment variables: only sound while no other thread of the process reads the environment
    /// (a test binary that holds this one test).
    pub unsafe fn export_env(&self) {
        // SAFETY: the caller guarantees no concurrent reader of the environment.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port));
            std::env::set_var("AWS_ALLOW_HTTP", "true");
        }
    }
}
