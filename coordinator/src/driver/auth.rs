//! The shared cluster token: every gRPC call carries `authorization: Bearer <token>`, checked in a tonic
//! interceptor before any handler runs. The comparison hashes both sides and compares the digests in
//! constant time, so neither the token's bytes nor its length leak through timing. The token is never
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

#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(String);

impl ClusterToken {
    /// A token must be usable as a header value: visible ASCII, no spaces, 16 to 4096 bytes.
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        let bad = |message: &str| Err(Error::Config { field: "token", message: message.to_owned() });
        if token.len() < 16 || token.len() > 4096 {
            return bad("must be 16 to 4096 characters long");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("may only contain visible ASCII characters (no spaces)");
        }
        Ok(Self(token))
    }

    /// The token from `file` (surrounding whitespace trimmed) if given, else from `env`'s value;
    /// None when neither is set. An empty or unreadable file is an error, not "no token".
    pub fn load(file: Option<&Path>, env: Option<String>) -> Result<Option<Self>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
                field: "token_file",
                message: format!("cannot read `{}`: {e}", path.display()),
            })?;
            return Self::new(text.trim())
                .map(Some)
                .map_err(|e| Error::Config { field: "token_file", message: format!("`{}`: {e}", path.display()) });
        }
        match env {
            Some(value) if !value.trim().is_empty() => Self::new(value.trim()).map(Some),
            _ => Ok(None),
        }
    }

    /// `Bearer <token>` as gRPC metadata, for clients.
    pub fn bearer(&self) -> MetadataValue<tonic::metadata::Ascii> {
        // Checked printable ASCII in `new`, so this cannot fail.
        format!("Bearer {}", self.0).parse().unwrap_or_else(|_| MetadataValue::from_static(""))
    }

    /// Whether an `authorization` header value carries this token, in time independent of both.
    pub fn matches_header(&self, header: &[u8]) -> bool {
        let expected = Sha256::digest(format!("Bearer {}", self.0).as_bytes());
        let given = Sha256::digest(header);
        constant_time_eq(&expected, &given)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
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
}

impl Bearer {
    pub fn new(token: Option<&ClusterToken>) -> Self {
        Self { header: token.map(ClusterToken::bearer) }
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
}
