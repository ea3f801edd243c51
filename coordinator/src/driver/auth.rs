//! The shared cluster token: every gRPC call carries `authorization: Bearer <token>`, checked in a tonic
//! interceptor before any handler runs. The comparison hashes both sides and compares the digests in
//! constant time, so neither the token's bytes nor its length leak through timing. A token file may hold
//! two tokens, both accepted, so that a token can be rotated without stopping the run. The token is never
//! logged: `ClusterToken`'s Debug prints a placeholder.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use super::telemetry::RpcMetrics;
use crate::error::{Error, Result};

/// The environment variable both sides read when no token file is given.
pub const TOKEN_ENV: &str = "IRO_CLUSTER_TOKEN";

/// How many tokens one token file may hold: the one in use and, while rotating, the next (or the last).
pub const MAX_TOKENS: usize = 2;

/// A bearer token, and while it is being rotated a second one that is accepted too. Clients send the
/// first; a server accepts either, so a rotation needs no moment at which every process changes at once:
/// (1) give the server `old` and `new` (two lines), (2) move the clients to `new`, (3) drop `old`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken {
    tokens: Vec<String>,
}

impl ClusterToken {
    /// A token must be usable as a header value: visible ASCII, no spaces, 16 to 4096 bytes.
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        check_token(&token)?;
        Ok(Self { tokens: vec![token] })
    }

    /// `first` (sent by clients) and `also` (accepted as well): a token in rotation.
    pub fn rotating(first: impl Into<String>, also: impl Into<String>) -> Result<Self> {
        let mut token = Self::new(first)?;
        let also = also.into();
        check_token(&also)?;
        token.tokens.push(also);
        Ok(token)
    }

    /// The token(s) of a token file: one a line (surrounding whitespace and blank lines ignored), at most
    /// `MAX_TOKENS`. `field` names the flag in errors.
    pub fn from_file(path: &Path, field: &'static str) -> Result<Self> {
        let fail = |message: String| Error::Config { field, message: format!("`{}`: {message}", path.display()) };
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.is_empty() || lines.len() > MAX_TOKENS {
            return Err(fail(format!(
                "holds {} tokens; it must hold one, or two (one a line) while a token is rotated",
                lines.len()
            )));
        }
        for (i, line) in lines.iter().enumerate() {
            check_token(line).map_err(|e| fail(format!("line {}: {e}", i + 1)))?;
        }
        Ok(Self { tokens: lines.into_iter().map(str::to_owned).collect() })
    }

    /// The token from `file` if given, else from `env`'s value; None when neither is set. An empty or
    /// unreadable file is an error, not "no token".
    pub fn load(file: Option<&Path>, env: Option<String>) -> Result<Option<Self>> {
        if let Some(path) = file {
            return Self::from_file(path, "token_file").map(Some);
        }
        match env {
            Some(value) if !value.trim().is_empty() => Self::new(value.trim()).map(Some),
            _ => Ok(None),
        }
    }

    /// `Bearer <token>` as gRPC metadata, for clients: the first token.
    pub fn bearer(&self) -> MetadataValue<tonic::metadata::Ascii> {
        // Checked printable ASCII in `new`, so this cannot fail.
        format!("Bearer {}", self.expose()).parse().unwrap_or_else(|_| MetadataValue::from_static(""))
    }

    /// Whether an `authorization` header value carries one of these tokens, in time independent of the
    /// header and of which token (if any) it matched.
    pub fn matches_header(&self, header: &[u8]) -> bool {
        let given = Sha256::digest(header);
        let mut matched = false;
        for token in &self.tokens {
            let expected = Sha256::digest(format!("Bearer {token}").as_bytes());
            matched |= constant_time_eq(&expected, &given);
        }
        matched
    }

    /// The token clients send.
    pub fn expose(&self) -> &str {
        &self.tokens[0]
    }

    /// How many tokens are accepted (2 while rotating).
    pub fn accepted(&self) -> usize {
        self.tokens.len()
    }

    /// Whether any token of `self` is also one of `other`'s: the status token must not open gRPC.
    pub fn shares_a_token_with(&self, other: &ClusterToken) -> bool {
        self.tokens.iter().any(|t| other.tokens.contains(t))
    }
}

fn check_token(token: &str) -> Result<()> {
    let bad = |message: &str| Err(Error::Config { field: "token", message: message.to_owned() });
    if token.len() < 16 || token.len() > 4096 {
        return bad("must be 16 to 4096 characters long");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("may only contain visible ASCII characters (no spaces)");
    }
    Ok(())
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A fresh session nonce (`wire::SESSION_LEN` hex digits) from the kernel's random source. Chosen by the
/// driver and written into the RegisterWorker command, so a replay restores the same one.
/// The refusal of a call whose session is not its worker's current one. An unknown worker is left to the
/// state (it answers UnknownWorker); a worker registered before sessions existed (an old log) has none
/// to compare.
pub fn stale_session(
    state: &crate::state::RunState,
    command: &crate::state::Command,
    session: Option<&str>,
) -> Option<Error> {
    let (session, worker) = (session?, command.worker_id()?);
    match state.session_of(worker) {
        Some(current) if !current.is_empty() && current != session => {
            Some(Error::StaleSession { worker_id: worker.to_string() })
        }
        _ => None,
    }
}

pub fn new_session() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let from_kernel = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    if !from_kernel {
        // No /dev/urandom (not Linux): SipHash under std's randomly keyed hasher, over the time and a counter.
        use std::hash::{BuildHasher, Hasher};
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        for half in bytes.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            hasher.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
            );
            half.copy_from_slice(&hasher.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The server-side check: a tonic interceptor closure over the token. With no token configured every
/// call passes (the server then listens on loopback only).
pub fn interceptor(
    token: Option<ClusterToken>,
    metrics: Arc<RpcMetrics>,
) -> impl FnMut(Request<()>) -> std::result::Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(token) = &token else {
            return Ok(request);
        };
        match request.metadata().get("authorization") {
            Some(value) if token.matches_header(value.as_bytes()) => Ok(request),
            Some(_) => {
                metrics.auth_failure();
                Err(Status::unauthenticated("wrong cluster token in `authorization`"))
            }
            None => {
                metrics.auth_failure();
                Err(Status::unauthenticated(
                    "missing `authorization: Bearer <token>` metadata: this coordinator requires the cluster token",
                ))
            }
        }
    }
}

/// The client-side half: adds the bearer token to every request (workers, tests, benchmarks). A named
/// type, so a client that stores it can spell its type:
/// `CoordinatorClient<InterceptedService<Channel, Bearer>>`.
#[derive(Clone, Default)]
pub struct Bearer {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The worker's session nonce (`iro-session`), once it has registered.
    session: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Bearer {
    pub fn new(token: Option<&ClusterToken>) -> Self {
        Self { header: token.map(ClusterToken::bearer), session: None }
    }

    /// Also sends `session` (what RegisterWorker returned) on every call; an empty one (a coordinator
    /// that predates sessions) sends nothing.
    pub fn with_session(mut self, session: &str) -> Self {
        self.session = (!session.is_empty()).then(|| session.parse().ok()).flatten();
        self
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.header.is_some() { "Bearer(<redacted>)" } else { "Bearer(none)" })
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert("authorization", header.clone());
        }
        if let Some(session) = &self.session {
            request.metadata_mut().insert(super::wire::SESSION_HEADER, session.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rules() {
        assert!(ClusterToken::new("short").is_err());
        assert!(ClusterToken::new("has a space in it ok").is_err());
        let token = ClusterToken::new("0123456789abcdef").unwrap();
        assert_eq!(format!("{token:?}"), "ClusterToken(<redacted>)");
        assert!(token.matches_header(b"Bearer 0123456789abcdef"));
        assert!(!token.matches_header(b"Bearer 0123456789abcdeg"));
        assert!(!token.matches_header(b"0123456789abcdef"));
        assert!(!token.matches_header(b""));
    }

    #[test]
    fn token_file_is_trimmed_and_wins_over_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file-0123456789\n").unwrap();
        let token = ClusterToken::load(Some(&path), Some("from-env-0123456789".into())).unwrap().unwrap();
        assert_eq!(token.expose(), "from-file-0123456789");
        let token = ClusterToken::load(None, Some("from-env-0123456789".into())).unwrap().unwrap();
        assert_eq!(token.expose(), "from-env-0123456789");
        assert!(ClusterToken::load(None, None).unwrap().is_none());
        std::fs::write(&path, "\n").unwrap();
        assert!(ClusterToken::load(Some(&path), None).is_err(), "an empty token file is an error");
    }

    #[test]
    fn a_token_file_with_two_lines_accepts_both_tokens_and_clients_send_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "new-token-0123456789\n\nold-token-0123456789\n").unwrap();
        let token = ClusterToken::load(Some(&path), None).unwrap().unwrap();
        assert_eq!((token.expose(), token.accepted()), ("new-token-0123456789", 2));
        assert!(token.matches_header(b"Bearer new-token-0123456789"));
        assert!(token.matches_header(b"Bearer old-token-0123456789"));
        assert!(!token.matches_header(b"Bearer other-token-0123456789"));
        std::fs::write(&path, "a-token-0123456789\nb-token-0123456789\nc-token-0123456789\n").unwrap();
        let error = ClusterToken::load(Some(&path), None).unwrap_err().to_string();
        assert!(error.contains("holds 3 tokens") && error.contains("token_file"), "{error}");
        std::fs::write(&path, "a-token-0123456789\nshort\n").unwrap();
        let error = ClusterToken::load(Some(&path), None).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
