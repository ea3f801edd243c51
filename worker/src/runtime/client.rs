//! The worker's gRPC connection to the coordinator: the bearer token on every call, per-call timeouts,
//! and retries with backoff for the errors a restarting or briefly unreachable coordinator gives, so a
//! coordinator restart costs a worker a pause, not its run. Every other refusal (wrong token, malformed
//! request, unknown worker) is final and comes back as `Error::Coordinator` naming the call and the
//! coordinator's own reason.
//!
//! Retrying is safe because every call is idempotent on the coordinator's side: LeaseTask hands a held
//! lease back, a repeated CompleteTask or FailTask is fenced, JoinGang and Heartbeat only renew. The one
//! exception is RegisterWorker without an id, which may leave a stray registration behind when its reply
//! is lost; that worker record holds nothing and is soon declared dead.

use std::future::Future;
use std::time::{Duration, Instant};

use iro_coordinator::driver::{Bearer, ClientTls, ClusterToken, TOKEN_ENV};
use iro_proto::coordinator_client::CoordinatorClient;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::error::{Error, Result};

pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// First wait after a transient failure; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How patient the connection is.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// One call, including the coordinator's fsync of the command it applies.
    pub request: Duration,
    /// How long one call about a task keeps retrying while the coordinator is unreachable before the
    /// worker gives up on it (an idle worker's calls retry without limit: `Coordinator::retry_forever`).
    pub reconnect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), request: Duration::from_secs(30), reconnect: Duration::from_secs(300) }
    }
}

/// When a retrying call stops: at `deadline` (None: never), or at once when `cancel` fires (shutdown).
#[derive(Debug, Clone, Copy)]
pub struct Retry<'a> {
    pub deadline: Option<Instant>,
    pub cancel: Option<&'a CancellationToken>,
}

/// What a log line about a call names.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    pub call: &'static str,
    pub worker_id: &'a str,
    pub task_id: &'a str,
    pub attempt: u32,
}

/// A cheap, cloneable connection. The channel connects lazily and reconnects by itself; calls made
/// while it cannot connect fail with `Unavailable` and are retried here.
#[derive(Clone)]
pub struct Coordinator {
    client: Client,
    channel: Channel,
    bearer: Bearer,
    url: String,
    timeouts: Timeouts,
}

impl Coordinator {
    /// With `tls`, `url` must be `https://` and the coordinator's certificate must chain to its CA; an
    /// `https://` URL without it, or TLS settings with an `http://` URL, is refused here rather than
    /// quietly talking plaintext or trusting whatever answers.
    pub fn new(url: &str, token: Option<&ClusterToken>, tls: Option<&ClientTls>, timeouts: Timeouts) -> Result<Self> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::Coordinator(format!("`{url}` is not a usable coordinator URL: {e}")))?
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .tcp_nodelay(true);
        match (url.starts_with("https://"), tls) {
            (true, Some(tls)) => {
                iro_coordinator::driver::tls::install_crypto_provider();
                endpoint = endpoint
                    .tls_config(tls.grpc())
                    .map_err(|e| Error::Coordinator(format!("TLS settings for `{url}`: {e}")))?;
            }
            (false, None) => {}
            (true, None) => {
                return Err(Error::Coordinator(format!(
                    "`{url}` is https:// but no CA to verify the coordinator with was given (--tls-ca)"
                )));
            }
            (false, Some(_)) => {
                return Err(Error::Coordinator(format!(
                    "TLS settings were given but `{url}` is not https://: use https:// to talk TLS"
                )));
            }
        }
        let channel = endpoint.connect_lazy();
        let bearer = Bearer::new(token);
        let client = CoordinatorClient::with_interceptor(channel.clone(), bearer.clone());
        Ok(Self { client, channel, bearer, url: url.to_owned(), timeouts })
    }

    /// The same connection, with every call carrying the session RegisterWorker returned: without it
    /// the coordinator refuses them, and once another process registers under this worker id, it
    /// refuses this one's (`FailedPrecondition`, final).
    pub fn in_session(&self, session: &str) -> Self {
        let bearer = self.bearer.clone().with_session(session);
        let client = CoordinatorClient::with_interceptor(self.channel.clone(), bearer.clone());
        Self { client, channel: self.channel.clone(), bearer, url: self.url.clone(), timeouts: self.timeouts }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// A retry bound of one reconnect timeout from now: for calls about a task, whose lease is gone long
    /// before this anyway.
    pub fn retry<'a>(&self, cancel: Option<&'a CancellationToken>) -> Retry<'a> {
        Retry { deadline: Some(Instant::now() + self.timeouts.reconnect), cancel }
    }

    /// No bound: for an idle worker's RegisterWorker and LeaseTask, so that a coordinator rescheduled for
    /// longer than the reconnect timeout (a volume that takes minutes to re-attach) does not make every
    /// worker exit and burn the Job's restarts (review A15). Shutdown still stops it.
    pub fn retry_forever<'a>(&self, cancel: Option<&'a CancellationToken>) -> Retry<'a> {
        Retry { deadline: None, cancel }
    }

    /// One call, no retry: for heartbeats, which come again at the next tick anyway.
    pub async fn once<T, Fut>(&self, call: &'static str, f: impl FnOnce(Client) -> Fut) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        f(self.client.clone()).await.map(Response::into_inner).map_err(|status| self.refused(call, &status))
    }

    /// Makes the call, retrying transient failures with backoff until `retry` says stop.
    pub async fn call<T, Fut>(
        &self,
        context: CallContext<'_>,
        retry: Retry<'_>,
        mut f: impl FnMut(Client) -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut retries = 0u32;
        loop {
            retries += 1;
            let status = match f(self.client.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_transient(&status) => status,
                Err(status) => return Err(self.refused(context.call, &status)),
            };
            let now = Instant::now();
            if retry.deadline.is_some_and(|deadline| now + backoff > deadline) {
                return Err(Error::Coordinator(format!(
                    "{} to {}: gave up after {retries} tries in {:.1?}: {}",
                    context.call,
                    self.url,
                    now - started,
                    describe(&status)
                )));
            }
            tracing::warn!(
                call = context.call,
                worker_id = context.worker_id,
                task_id = context.task_id,
                attempt = context.attempt,
                retry = retries,
                error = %describe(&status),
                "coordinator {} unreachable; retrying in {backoff:?}",
                self.url
            );
            let sleep = tokio::time::sleep(jittered(backoff));
            match retry.cancel {
                Some(cancel) => tokio::select! {
                    () = sleep => {}
                    () = cancel.cancelled() => {
                        return Err(Error::Cancelled(format!("{} to {}: shutting down", context.call, self.url)));
                    }
                },
                None => sleep.await,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A final refusal, worded for the operator who has to fix it.
    fn refused(&self, call: &str, status: &Status) -> Error {
        let hint = match status.code() {
            Code::Unauthenticated => {
                format!(" (check the cluster token: --token-file or {TOKEN_ENV} must hold the coordinator's token)")
            }
            Code::NotFound if status.message().starts_with("worker_id") => {
                " (the coordinator does not know this worker: was its state folder replaced?)".to_owned()
            }
            _ => String::new(),
        };
        Error::Coordinator(format!("{call} refused by {}: {}{hint}", self.url, describe(status)))
    }
}

/// `backoff` scaled by a random factor in [0.5, 1.5): a hundred workers that lost the coordinator together
/// do not all come back in the same millisecond.
fn jittered(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is randomly keyed: enough randomness for spreading retries, without a crate.
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    backoff.mul_f64(0.5 + (random % 1024) as f64 / 1024.0)
}

/// Errors a restarting, overloaded or briefly unreachable coordinator gives; everything else is an
/// answer that asking again would not change.
fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::ResourceExhausted
    )
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
