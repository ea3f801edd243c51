//! The worker's gRPC connection to the coordinator: the bearer token on every call, per-call timeouts,
//! and retries with backoff for the errors a restarting or briefly unreachable coordinator gives, so a
//! coordinator restart costs a worker a pause, not its run. Every other refusal (wrong token, malformed
//! request, unknown worker) is final and comes back as `Error::Coordinator` naming the call and the
//! coordinator's own reason.
//!
//! A Raft-replicated coordinator (issue 14) is a list of URLs, one per replica: only the leader serves
//! worker calls, and a follower's `Unavailable` names the leader (`iro_coordinator::driver::routing`),
//! which the next try goes to at once; a replica that does not answer is left for the next listed one.
//!
//! Retrying is safe because every call is idempotent on the coordinator's side: LeaseTask hands a held
//! lease back, a repeated CompleteTask or FailTask is fenced, JoinGang and Heartbeat only renew. The one
//! exception is RegisterWorker without an id, which may leave a stray registration behind when its reply
//! is lost; that worker record holds nothing and is soon declared dead.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iro_coordinator::driver::routing::{leader_hint, parse_urls};
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

/// Channels one worker keeps at most: the listed replicas, plus leaders learned from hints (a replaced
/// leader may come back under a new address), the oldest learned one dropped first.
const MAX_CHANNELS: usize = 16;

/// A cheap, cloneable connection to the coordinator: to one URL, or to every replica of a Raft-replicated
/// one (issue 14), of which only the leader serves worker calls. Each URL has its own channel, which
/// connects lazily and reconnects by itself; calls go to the "current" URL, shared by all clones. A
/// follower answers `Unavailable` naming the leader (`iro-leader`, `driver::routing`): the call moves
/// there and is retried at once. Other transient failures move it to the next listed URL and are retried
/// here with backoff.
#[derive(Clone)]
pub struct Coordinator {
    routes: Arc<Routes>,
    bearer: Bearer,
    timeouts: Timeouts,
}

/// The replicas behind one `Coordinator` and its clones.
struct Routes {
    /// The URLs the operator listed, in order: where a failure without a hint moves on to.
    listed: Vec<String>,
    tls: Option<ClientTls>,
    timeouts: Timeouts,
    table: Mutex<Table>,
}

/// Never locked across an await.
struct Table {
    /// One channel per URL: the listed ones first, in order, then learned ones, oldest first.
    channels: Vec<(String, Channel)>,
    /// The index in `channels` calls go to.
    current: usize,
}

impl Coordinator {
    /// `urls`: one coordinator gRPC URL, or a comma-separated list of every replica of one cluster
    /// (`driver::routing::parse_urls`); calls start at the first. With `tls`, every URL must be
    /// `https://` and every coordinator's certificate must chain to its CA; an `https://` URL without
    /// it, or TLS settings with an `http://` URL, is refused here rather than quietly talking plaintext
    /// or trusting whatever answers.
    pub fn new(urls: &str, token: Option<&ClusterToken>, tls: Option<&ClientTls>, timeouts: Timeouts) -> Result<Self> {
        let listed = parse_urls(urls).map_err(Error::Coordinator)?;
        let channels =
            listed.iter().map(|url| Ok((url.clone(), channel(url, tls, timeouts)?))).collect::<Result<Vec<_>>>()?;
        let table = Mutex::new(Table { channels, current: 0 });
        let routes = Arc::new(Routes { listed, tls: tls.cloned(), timeouts, table });
        Ok(Self { routes, bearer: Bearer::new(token), timeouts })
    }

    /// The same connection, with every call carrying the session RegisterWorker returned: without it
    /// the coordinator refuses them, and once another process registers under this worker id, it
    /// refuses this one's (`FailedPrecondition`, final). It shares the current URL with `self`.
    pub fn in_session(&self, session: &str) -> Self {
        let bearer = self.bearer.clone().with_session(session);
        Self { routes: self.routes.clone(), bearer, timeouts: self.timeouts }
    }

    /// Where calls go now.
    pub fn url(&self) -> String {
        self.routes.current().0
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

    /// The current URL and a client for it.
    fn client(&self) -> (String, Client) {
        let (url, channel) = self.routes.current();
        (url, CoordinatorClient::with_interceptor(channel, self.bearer.clone()))
    }

    /// One call, no retry: for heartbeats, which come again at the next tick anyway. A transient failure
    /// still moves the current URL (to the leader a follower named, else to the next listed one), so
    /// that the next heartbeat goes where it can land.
    pub async fn once<T, Fut>(&self, call: &'static str, f: impl FnOnce(Client) -> Fut) -> Result<T>
    where
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let (url, client) = self.client();
        match f(client).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                if is_transient(&status) && !self.routes.follow_hint(&url, &status) {
                    self.routes.rotate(&url, &status);
                }
                Err(refused(call, &url, &status))
            }
        }
    }

    /// Makes the call, retrying transient failures with backoff until `retry` says stop. A follower's
    /// hint is followed at once, without backoff; a second hint in a row waits like any other retry, so
    /// that replicas with stale news of the leader cannot make the worker spin.
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
        let mut hopped = false;
        loop {
            retries += 1;
            let (url, client) = self.client();
            let status = match f(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_transient(&status) => status,
                Err(status) => return Err(refused(context.call, &url, &status)),
            };
            let followed = self.routes.follow_hint(&url, &status);
            let now = Instant::now();
            let at_once = followed && !hopped;
            let wait = if at_once { Duration::ZERO } else { backoff };
            if retry.deadline.is_some_and(|deadline| now + wait > deadline) {
                return Err(Error::Coordinator(format!(
                    "{} to {url}: gave up after {retries} tries in {:.1?}: {}",
                    context.call,
                    now - started,
                    describe(&status)
                )));
            }
            let cancelled = || Error::Cancelled(format!("{} to {url}: shutting down", context.call));
            hopped = at_once;
            if at_once {
                if retry.cancel.is_some_and(CancellationToken::is_cancelled) {
                    return Err(cancelled());
                }
                continue;
            }
            if !followed {
                self.routes.rotate(&url, &status);
            }
            tracing::warn!(
                call = context.call,
                worker_id = context.worker_id,
                task_id = context.task_id,
                attempt = context.attempt,
                retry = retries,
                error = %describe(&status),
                next = %self.url(),
                "coordinator {url} unreachable; retrying in {backoff:?}"
            );
            let sleep = tokio::time::sleep(jittered(backoff));
            match retry.cancel {
                Some(cancel) => tokio::select! {
                    () = sleep => {}
                    () = cancel.cancelled() => return Err(cancelled()),
                },
                None => sleep.await,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> (String, Channel) {
        let table = self.lock();
        table.channels[table.current].clone()
    }

    /// Moves the current URL to the leader `status` names, if it names one other than `tried` (a hint
    /// naming the replica that gave it is no hint). False when there is no such hint, or its URL cannot
    /// be dialled with this worker's TLS settings (an `http://` leader for a TLS worker: never followed).
    fn follow_hint(&self, tried: &str, status: &Status) -> bool {
        if status.code() != Code::Unavailable {
            return false;
        }
        let Some(leader) = leader_hint(status) else { return false };
        if leader == tried {
            return false;
        }
        let mut table = self.lock();
        let from = table.channels[table.current].0.clone();
        let index = match table.channels.iter().position(|(url, _)| *url == leader) {
            Some(index) => index,
            None => {
                let channel = match channel(&leader, self.tls.as_ref(), self.timeouts) {
                    Ok(channel) => channel,
                    Err(e) => {
                        tracing::warn!(from = tried, leader, error = %e, "ignoring the leader hint");
                        return false;
                    }
                };
                if table.channels.len() >= MAX_CHANNELS.max(self.listed.len() + 1) {
                    // The oldest learned channel goes: a listed one never does.
                    let oldest = self.listed.len();
                    table.channels.remove(oldest);
                    if table.current > oldest {
                        table.current -= 1;
                    }
                }
                table.channels.push((leader.clone(), channel));
                table.channels.len() - 1
            }
        };
        if index != table.current {
            table.current = index;
            tracing::info!(
                from = %from,
                to = %leader,
                why = "the replica is not the leader and named it",
                tried,
                "switching coordinator replica"
            );
        }
        true
    }

    /// After a failure without a hint at `tried`: moves the current URL to the listed one after it (the
    /// first listed after a learned one), unless another call already moved it.
    fn rotate(&self, tried: &str, status: &Status) {
        let mut table = self.lock();
        if table.channels[table.current].0 != tried {
            return;
        }
        let next = match self.listed.iter().position(|url| url == tried) {
            Some(i) => (i + 1) % self.listed.len(),
            None => 0,
        };
        if next != table.current {
            table.current = next;
            tracing::info!(from = tried, to = %self.listed[next], why = %describe(status), "switching coordinator replica");
        }
    }
}

/// The lazily connected channel to `url`, under the TLS rules of `Coordinator::new`.
fn channel(url: &str, tls: Option<&ClientTls>, timeouts: Timeouts) -> Result<Channel> {
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
    Ok(endpoint.connect_lazy())
}

/// A final refusal by the coordinator at `url`, worded for the operator who has to fix it.
fn refused(call: &str, url: &str, status: &Status) -> Error {
    let hint = match status.code() {
        Code::Unauthenticated => {
            format!(" (check the cluster token: --token-file or {TOKEN_ENV} must hold the coordinator's token)")
        }
        Code::NotFound if status.message().starts_with("worker_id") => {
            " (the coordinator does not know this worker: was its state folder replaced?)".to_owned()
        }
        _ => String::new(),
    };
    Error::Coordinator(format!("{call} refused by {url}: {}{hint}", describe(status)))
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

#[cfg(test)]
mod tests {
    use iro_coordinator::driver::routing::LEADER_HEADER;
    use tonic::metadata::MetadataMap;

    use super::*;

    fn not_the_leader(leader: &str) -> Status {
        let mut metadata = MetadataMap::new();
        metadata.insert(LEADER_HEADER, leader.parse().unwrap());
        Status::with_metadata(Code::Unavailable, "not the leader", metadata)
    }

    fn urls(routes: &Routes) -> Vec<String> {
        routes.lock().channels.iter().map(|(url, _)| url.clone()).collect()
    }

    #[tokio::test]
    async fn hints_add_channels_up_to_the_cap_and_listed_ones_stay() {
        let coordinator =
            Coordinator::new("http://127.0.0.1:1, http://127.0.0.1:2", None, None, Timeouts::default()).unwrap();
        let routes = &coordinator.routes;
        assert_eq!(coordinator.url(), "http://127.0.0.1:1");
        assert!(!routes.follow_hint("http://127.0.0.1:1", &not_the_leader("http://127.0.0.1:1")), "names itself");
        assert!(!routes.follow_hint("http://127.0.0.1:1", &Status::unavailable("electing")), "no hint");
        let other = Status::with_metadata(Code::Internal, "", not_the_leader("http://127.0.0.1:9").metadata().clone());
        assert!(!routes.follow_hint("http://127.0.0.1:1", &other), "only Unavailable carries a hint");
        assert!(routes.follow_hint("http://127.0.0.1:1", &not_the_leader("http://127.0.0.1:2/")));
        assert_eq!(coordinator.url(), "http://127.0.0.1:2", "a listed leader: no new channel");
        assert_eq!(urls(routes).len(), 2);
        for port in 100..120 {
            let tried = coordinator.url();
            assert!(routes.follow_hint(&tried, &not_the_leader(&format!("http://127.0.0.1:{port}"))));
            assert_eq!(coordinator.url(), format!("http://127.0.0.1:{port}"));
        }
        let kept = urls(routes);
        assert_eq!(kept.len(), MAX_CHANNELS);
        assert_eq!(kept[..2], ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        assert_eq!(kept[2], "http://127.0.0.1:106", "the oldest learned ones went");
        assert_eq!(kept[MAX_CHANNELS - 1], "http://127.0.0.1:119");
        // A learned leader known already: no new channel.
        assert!(routes.follow_hint("http://127.0.0.1:119", &not_the_leader("http://127.0.0.1:110")));
        assert_eq!((coordinator.url(), urls(routes).len()), ("http://127.0.0.1:110".to_owned(), MAX_CHANNELS));
    }

    #[tokio::test]
    async fn a_failure_without_a_hint_moves_to_the_next_listed_url_once() {
        let list = "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3";
        let coordinator = Coordinator::new(list, None, None, Timeouts::default()).unwrap();
        let in_session = coordinator.in_session("nonce");
        let routes = &coordinator.routes;
        let down = Status::unavailable("connection refused");
        routes.rotate("http://127.0.0.1:1", &down);
        assert_eq!(in_session.url(), "http://127.0.0.1:2", "clones share the route");
        // A second call that failed at :1 too does not skip :2.
        routes.rotate("http://127.0.0.1:1", &down);
        assert_eq!(coordinator.url(), "http://127.0.0.1:2");
        routes.rotate("http://127.0.0.1:2", &down);
        routes.rotate("http://127.0.0.1:3", &down);
        assert_eq!(coordinator.url(), "http://127.0.0.1:1", "around the list");
        // From a learned leader, back to the start of the list.
        assert!(routes.follow_hint("http://127.0.0.1:1", &not_the_leader("http://127.0.0.1:7")));
        routes.rotate("http://127.0.0.1:7", &down);
        assert_eq!(coordinator.url(), "http://127.0.0.1:1");
        // One URL: nowhere else to go.
        let one = Coordinator::new("http://127.0.0.1:1", None, None, Timeouts::default()).unwrap();
        one.routes.rotate("http://127.0.0.1:1", &down);
        assert_eq!(one.url(), "http://127.0.0.1:1");
    }
}
