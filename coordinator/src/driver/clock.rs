//! Where the driver's time comes from. The run state never reads a clock (time is a field of every
//! command); the driver stamps commands from a `Clock`, so tests swap in a `ManualClock` and move time
//! by hand instead of sleeping.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch (lease deadlines go on the wire as Unix times).
    fn now_ms(&self) -> u64;

    /// Resolves once `now_ms() >= at_ms`, or earlier: callers check the time again when it resolves.
    fn sleep_until(&self, at_ms: u64) -> Sleep<'_>;
}

/// The Unix time at start, moved on by a monotonic clock: an NTP step or a manual `date` while the
/// coordinator runs does not move it, so a wall-clock step can neither expire every worker at once nor
/// stretch leases. It drifts from the wall clock only by what the wall clock was corrected by since start
/// (seconds over days), which the lease and worker timeouts dwarf.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    epoch_ms: u64,
    started: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        let epoch_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Self { epoch_ms, started: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        self.epoch_ms.saturating_add(self.started.elapsed().as_millis() as u64)
    }

    fn sleep_until(&self, at_ms: u64) -> Sleep<'_> {
        // tokio's timer is monotonic too, so the sleep ends when `now_ms` reaches `at_ms`.
        let wait = Duration::from_millis(at_ms.saturating_sub(self.now_ms()));
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to; sleepers wake as soon as it passes their time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<u64>>,
}

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self { now: Arc::new(watch::Sender::new(start_ms)) }
    }

    pub fn advance(&self, ms: u64) -> u64 {
        let mut now = 0;
        self.now.send_modify(|t| {
            *t = t.saturating_add(ms);
            now = *t;
        });
        now
    }

    /// Sets the time; it may go backwards (the run state keeps its own time monotonic).
    pub fn set(&self, ms: u64) {
        self.now.send_replace(ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        *self.now.borrow()
    }

    fn sleep_until(&self, at_ms: u64) -> Sleep<'_> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as `self`, so wait_for only ends by reaching the time.
            let _ = rx.wait_for(|now| *now >= at_ms).await;
        })
    }
}
