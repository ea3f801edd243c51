//! TLS for both of the coordinator's listeners and for the clients that dial them (review A5), through
//! rustls with the aws-lc-rs provider (the one object_store's S3 client already links into every binary).
//! The coordinator presents one certificate on gRPC and on the status endpoint; with a client CA, gRPC
//! callers must present a certificate that CA issued (mTLS), while the status endpoint asks for none
//! (Prometheus and browsers rarely hold one; the status token guards it). Workers and `iro status` verify
//! the coordinator against a CA file and never fall back to plaintext or to the system roots, so a
//! worker cannot be pointed at an impostor that hands it a run config and collects its token.
//!
//! Certificates are read once, at start: a rotated certificate takes a restart (a coordinator restart
//! replays its log and costs workers a pause; cert-manager's renewals are days ahead of expiry).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

/// A handshake that has not finished in this long is dropped, so a client that opens connections and
/// sends nothing cannot hold the status endpoint's handshake slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes of the status endpoint in progress at once; more wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 64;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes aws-lc-rs the process's rustls provider, for the rustls configs tonic builds itself (it asks for
/// the process default). Idempotent; a provider installed earlier by someone else is left alone.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config { field, message: format!("cannot read `{}`: {e}", path.display()) })
}

fn certificates(field: &'static str, what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config { field, message: format!("{what}: not PEM certificates: {e}") })?;
    if certs.is_empty() {
        return Err(Error::Config { field, message: format!("{what}: holds no `BEGIN CERTIFICATE` block") });
    }
    Ok(certs)
}

fn private_key(field: &'static str, what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Config {
        field,
        message: format!("{what}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
    })
}

fn roots(field: &'static str, what: &str, pem: &[u8]) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(field, what, pem)? {
        roots.add(cert).map_err(|e| Error::Config { field, message: format!("{what}: not a usable CA: {e}") })?;
    }
    Ok(roots)
}

/// Puts the file's name in front of a config error about the field it was read for.
fn name_file(error: Error, files: &[(&'static str, Option<&Path>)]) -> Error {
    match error {
        Error::Config { field, message } => match files.iter().find(|(f, _)| *f == field) {
            Some((_, Some(path))) => Error::Config { field, message: format!("`{}`: {message}", path.display()) },
            _ => Error::Config { field, message },
        },
        other => other,
    }
}

/// The coordinator's certificate chain and key, and optionally the CA its gRPC clients' certificates
/// must chain to.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    /// Built (and so checked: the key matches the certificate) when loaded.
    http: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mtls", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// `--tls-cert`, `--tls-key` and, for mTLS, `--tls-client-ca`: PEM files.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let cert_pem = read("tls_cert", cert)?;
        let key_pem = read("tls_key", key)?;
        let client_ca_pem = client_ca.map(|p| read("tls_client_ca", p)).transpose()?;
        Self::from_pem(cert_pem, key_pem, client_ca_pem).map_err(|e| {
            name_file(e, &[("tls_cert", Some(cert)), ("tls_key", Some(key)), ("tls_client_ca", client_ca)])
        })
    }

    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>, client_ca_pem: Option<Vec<u8>>) -> Result<Self> {
        let chain = certificates("tls_cert", "the certificate", &cert_pem)?;
        let key = private_key("tls_key", "the key", &key_pem)?;
        if let Some(ca) = &client_ca_pem {
            roots("tls_client_ca", "the client CA", ca)?;
        }
        let mut http = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config { field: "tls_cert", message: e.to_string() })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| Error::Config {
                field: "tls_key",
                message: format!("does not go with the certificate: {e}"),
            })?;
        // `iro status` and scrapers speak HTTP/1.1; the status router needs nothing more.
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { cert_pem, key_pem, client_ca_pem, http: Arc::new(http) })
    }

    /// Whether gRPC callers must present a client certificate.
    pub fn mtls(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    pub(crate) fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let config = tonic::transport::ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT);
        match &self.client_ca_pem {
            // Required, not optional: a caller without a certificate fails the handshake.
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)).client_auth_optional(false),
            None => config,
        }
    }

    /// The status endpoint's listener: TLS handshakes run in their own tasks, so one slow client does not
    /// hold up the others; finished connections are handed to axum.
    pub(crate) fn http_listener(&self, listener: TcpListener) -> Result<TlsListener> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::Bind { addr: "status listener".into(), message: e.to_string() })?;
        let acceptor = TlsAcceptor::from(self.http.clone());
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let accept = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "status endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "status endpoint: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "status endpoint: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, accept })
    }
}

/// What axum serves the status routes from when TLS is on.
pub(crate) struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The accept task ended (it only does when this listener is dropped): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// How a client (a worker, `iro status`, a test) verifies the coordinator: the CA its certificate chains
/// to, the name to check it against (default: the host of the URL), and for mTLS its own certificate.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_cert", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// `--tls-ca` and, for mTLS, `--tls-cert` with `--tls-key`: PEM files. Either both of those or neither.
    pub fn load(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let ca_pem = read("tls_ca", ca)?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read("tls_cert", cert)?, read("tls_key", key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::Config { field: "tls_key", message: "is needed with --tls-cert".into() });
            }
            (None, Some(_)) => {
                return Err(Error::Config { field: "tls_cert", message: "is needed with --tls-key".into() });
            }
        };
        Self::from_pem(ca_pem, identity)
            .map_err(|e| name_file(e, &[("tls_ca", Some(ca)), ("tls_cert", cert), ("tls_key", key)]))
    }

    pub fn from_pem(ca_pem: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>) -> Result<Self> {
        let roots = roots("tls_ca", "the CA", &ca_pem)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config { field: "tls_ca", message: e.to_string() })?
            .with_root_certificates(roots);
        let mut config = match &identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    certificates("tls_cert", "the client certificate", cert)?,
                    private_key("tls_key", "the client key", key)?,
                )
                .map_err(|e| Error::Config {
                    field: "tls_key",
                    message: format!("does not go with the client certificate: {e}"),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self { ca_pem, identity, domain: None, config: Arc::new(config) })
    }

    /// Checks the coordinator's certificate against `name` instead of the URL's host (a worker that
    /// dials an IP address, or a Service name the certificate does not carry).
    pub fn with_domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    pub fn has_client_cert(&self) -> bool {
        self.identity.is_some()
    }

    /// For tonic's `Endpoint::tls_config`.
    pub fn grpc(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }

    /// A TLS connection to the status endpoint at `host` (checked against the domain override if set).
    pub(crate) async fn connect(
        &self,
        host: &str,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.domain.as_deref().unwrap_or(host);
        // An IPv6 literal in a URL comes bracketed; the certificate's IP SAN does not.
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}`: {e}")))?;
        TlsConnector::from(self.config.clone()).connect(server_name, stream).await
    }
}
