//! The driver task: the one owner of the `RunState` (TGI's router/queue pattern). Everyone else holds a
//! cheap `Handle` that sends it messages with oneshot replies. It stamps each command with the clock,
//! applies it, appends it to the command log, and replies only once the log is durable. Messages that
//! queue up while a write is in flight form the next batch, which shares one fsync (group commit).
//! Between messages it sleeps until the state's next deadline and then applies `ExpireLeases`.
//! With a manifest `Publisher`, it queues every stage it moves past for publishing once the move is
//! durable, and holds LeaseTask back ("retry later") until the stages before the active one are
//! published, so no worker can start a stage before the manifest it reads exists.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::clock::Clock;
use super::log::{CommandLog, Recovered};
use super::manifests::Publisher;
use super::snapshots::Snapshots;
use super::telemetry::Telemetry;
use crate::error::{Error, Result};
use crate::state::{
    Applied, Command, Lease, Plan, Progress, Reply, Resources, RunState, RunStatus, Snapshot, StageManifest,
    WaitReason, WorkerId,
};

/// Messages waiting beyond this many are left for the next batch, bounding one batch's latency.
const MAX_BATCH: usize = 512;
/// Callers wait (backpressure) once this many messages are queued.
const QUEUE: usize = 8192;

#[derive(Debug, Clone, Default)]
pub struct DriverOptions {
    /// After a restart that recovered commands, no lease or worker expires before this much time has
    /// passed: workers that kept working while the coordinator was down get to heartbeat first.
    /// None: one worker timeout of the plan.
    pub restart_grace_ms: Option<u64>,
    /// Snapshot the run state every this many log entries, and drop the log segments snapshots cover.
    /// None: `snapshots::DEFAULT_SNAPSHOT_EVERY`; Some(0): never (the log keeps every entry).
    pub snapshot_every: Option<u64>,
}

/// What a read sees: the state, the driver's counters, and the time of the read.
pub struct View<'a> {
    pub state: &'a RunState,
    pub telemetry: &'a Telemetry,
    pub now_ms: u64,
    /// Commands in the durable log (recovered plus appended).
    pub log_index: u64,
    /// Why LeaseTask is answered "retry later" for now (manifests still being written); None when it is not.
    pub held_back: Option<String>,
}

type ReadFn = Box<dyn FnOnce(View<'_>) + Send>;
type ReplyTx = oneshot::Sender<Result<Applied>>;

enum Msg {
    Apply {
        command: Command,
        reply: ReplyTx,
    },
    /// RegisterWorker with the id picked by the driver when the caller has none.
    Register {
        worker_id: Option<WorkerId>,
        name: String,
        resources: Resources,
        reply: ReplyTx,
    },
    Read(ReadFn),
    Stop(oneshot::Sender<()>),
}

/// A cheap, cloneable way to talk to the driver task.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    run: watch::Receiver<RunStatus>,
    clock: Arc<dyn Clock>,
    /// Stages whose manifests are published, counted from the first, and how many stages there are;
    /// None when the driver publishes no manifests.
    published: Option<(watch::Receiver<usize>, usize)>,
}

fn stopped() -> Error {
    Error::Unavailable { message: "the coordinator driver has stopped".into() }
}

impl Handle {
    /// Applies `command` with its time replaced by the driver's clock; returns once it is durable.
    pub async fn apply(&self, command: Command) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Apply { command, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Registers a worker; with no id the driver picks a fresh one (ids must be in the log, so they are
    /// chosen before the command is logged, by the only task that knows which are taken).
    pub async fn register(&self, worker_id: Option<WorkerId>, name: String, resources: Resources) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Register { worker_id, name, resources, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` on the driver's state after the current batch is durable.
    pub async fn read<T: Send + 'static>(&self, f: impl FnOnce(View<'_>) -> T + Send + 'static) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let read: ReadFn = Box::new(move |view| {
            let _ = reply.send(f(view));
        });
        self.tx.send(Msg::Read(read)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    pub async fn snapshot(&self) -> Result<Snapshot> {
        self.read(|v| v.state.snapshot()).await
    }

    pub async fn manifest(&self, iteration: u32, phase: crate::plan::Phase) -> Result<StageManifest> {
        self.read(move |v| v.state.manifest(iteration, phase)).await?
    }

    /// The run's status as of the last applied batch.
    pub fn run_status(&self) -> RunStatus {
        self.run.borrow().clone()
    }

    /// Resolves once the run has finished or failed (or the driver stopped). A finished run resolves
    /// only once the last stage's manifest is published too, so its outputs are readable.
    pub async fn run_over(&self) -> RunStatus {
        let mut run = self.run.clone();
        let result = run.wait_for(|s| *s != RunStatus::Running).await.map(|s| s.clone());
        let status = result.unwrap_or_else(|_| self.run_status());
        if status == RunStatus::Finished
            && let Some((published, stages)) = &self.published
        {
            // An error means the writer stopped (the driver is shutting down): nothing more to wait for.
            let _ = published.clone().wait_for(|n| *n >= *stages).await;
        }
        status
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Flushes and stops the driver; later calls answer `Unavailable`.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the driver: loads the log's latest snapshot and replays the entries after it into the state
/// for `plan`, and spawns the task.
/// With a `publisher`, the manifests of every stage the replayed run has finished are (re)written
/// before any lease is handed out, and each stage's as it finishes.
pub async fn start(
    plan: Plan,
    mut log: Box<dyn CommandLog>,
    clock: Arc<dyn Clock>,
    options: DriverOptions,
    mut publisher: Option<Publisher>,
) -> Result<(Handle, JoinHandle<()>)> {
    let grace = options.restart_grace_ms.unwrap_or(plan.worker_timeout_ms);
    // Loading and replaying a long log is blocking work: keep it off the async workers. Entries are
    // applied as they stream in, so memory holds the state, never the history.
    let (log, state, loaded) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut state = RunState::new(plan.clone())?;
        let loaded = log.load(&mut |item| {
            match item {
                Recovered::Snapshot { index, state: snapshot } => {
                    if snapshot.plan() != &plan {
                        return Err(Error::StateMismatch {
                            path: format!("snapshot at entry {index}"),
                            message: "it was taken of a run with another plan".into(),
                        });
                    }
                    state = snapshot;
                }
                // A command refused when first applied is refused again, changing nothing again.
                Recovered::Entry { command, .. } => {
                    let _ = state.apply(command);
                }
            }
            Ok(())
        })?;
        Ok((log, state, loaded))
    })
    .await
    .map_err(|e| Error::Unavailable { message: format!("loading the command log panicked: {e}") })??;
    let recovered = loaded.last_index;
    let now = clock.now_ms();
    if recovered > 0 {
        tracing::info!(
            commands = recovered,
            snapshot_index = loaded.snapshot_index,
            replayed = recovered - loaded.snapshot_index,
            status = ?state.status(),
            stage = ?state.current_stage(),
            "resumed the run from the command log"
        );
    }
    let published = publisher.as_mut().map(|p| {
        p.queue_finished(&state);
        (p.watermark(), state.plan().stage_count())
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let (run_tx, run_rx) = watch::channel(state.status().clone());
    let actor = Actor {
        state,
        log: Some(log),
        clock: clock.clone(),
        telemetry: Telemetry::new(now, recovered),
        log_index: recovered,
        run: run_tx,
        quiet_until_ms: if recovered > 0 { now.saturating_add(grace) } else { 0 },
        last_tick_ms: None,
        publisher,
        snapshots: Snapshots::new(options.snapshot_every, loaded.snapshot_index),
    };
    let task = tokio::spawn(actor.run(rx));
    Ok((Handle { tx, run: run_rx, clock, published }, task))
}

struct Actor {
    state: RunState,
    /// None while a write is in flight on the blocking pool, or forever after it panicked.
    log: Option<Box<dyn CommandLog>>,
    clock: Arc<dyn Clock>,
    telemetry: Telemetry,
    log_index: u64,
    run: watch::Sender<RunStatus>,
    /// The restart grace: no expiry before this time.
    quiet_until_ms: u64,
    /// When the timer last fired; the next tick waits for a later time, so a deadline that a tick
    /// could not clear never spins.
    last_tick_ms: Option<u64>,
    /// Writes the manifests of finished stages; None: no manifests (tests, benchmarks).
    publisher: Option<Publisher>,
    /// When to snapshot the state and compact the log.
    snapshots: Snapshots,
}

enum Next {
    Msg(Msg),
    Tick,
    Closed,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut stop: Option<oneshot::Sender<()>> = None;
        while stop.is_none() {
            let deadline = self.timer_deadline();
            let mut batch = Batch::default();
            // Checked before waiting for messages too, so a steady stream of requests cannot starve expiry.
            if deadline.is_some_and(|at| at <= self.clock.now_ms()) {
                self.tick(&mut batch);
            } else {
                let clock = self.clock.clone();
                let sleep = async move {
                    match deadline {
                        Some(at) => clock.sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let next = tokio::select! {
                    msg = rx.recv() => msg.map_or(Next::Closed, Next::Msg),
                    () = sleep => Next::Tick,
                };
                match next {
                    Next::Closed => break,
                    // The system clock caps its sleeps, so a wake-up may come before the deadline.
                    Next::Tick if deadline.is_some_and(|at| at > self.clock.now_ms()) => continue,
                    Next::Tick => self.tick(&mut batch),
                    Next::Msg(msg) => stop = self.take(msg, &mut batch),
                }
            }
            while stop.is_none() && batch.len < MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => stop = self.take(msg, &mut batch),
                    Err(_) => break,
                }
            }
            self.commit(batch).await;
        }
        self.snapshots.finish().await;
        tracing::info!(commands = self.log_index, "coordinator driver stopped");
        if let Some(publisher) = self.publisher.take() {
            publisher.stop();
        }
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
    }

    /// When to send the next ExpireLeases: the state's next deadline, not before the restart grace
    /// ends, and never while the run is over (nothing can expire usefully then).
    fn timer_deadline(&self) -> Option<u64> {
        if *self.state.status() != RunStatus::Running || self.telemetry.log_error.is_some() {
            return None;
        }
        let at = self.state.next_deadline_ms()?.max(self.quiet_until_ms);
        Some(match self.last_tick_ms {
            Some(last) => at.max(last.saturating_add(1)),
            None => at,
        })
    }

    fn tick(&mut self, batch: &mut Batch) {
        let now = self.clock.now_ms();
        self.last_tick_ms = Some(now);
        self.apply(Command::ExpireLeases { now_ms: now }, None, batch);
    }

    /// Handles one message; returns the stop reply when it asks the driver to stop.
    fn take(&mut self, msg: Msg, batch: &mut Batch) -> Option<oneshot::Sender<()>> {
        match msg {
            Msg::Apply { command, reply } => self.apply(command, Some(reply), batch),
            Msg::Register { worker_id, name, resources, reply } => {
                let worker_id = worker_id.unwrap_or_else(|| self.state.fresh_worker_id());
                self.apply(Command::RegisterWorker { worker_id, name, resources, now_ms: 0 }, Some(reply), batch);
            }
            Msg::Read(read) => batch.reads.push(read),
            Msg::Stop(reply) => return Some(reply),
        }
        None
    }

    fn apply(&mut self, command: Command, reply: Option<ReplyTx>, batch: &mut Batch) {
        batch.len += 1;
        let now = self.clock.now_ms();
        if let Some(message) = &self.telemetry.log_error {
            let error = Error::Unavailable {
                message: format!("the command log could not be written ({message}); restart the coordinator"),
            };
            batch.replies.push((reply, Err(error)));
            return;
        }
        let (mut command, held_back) = self.hold_back(command);
        stamp(&mut command, now);
        let mut result = self.state.apply(command.clone());
        self.telemetry.observe(&command, &result, now);
        if held_back {
            let wait = Lease::RetryAfter { ms: self.state.plan().retry_after_ms, reason: WaitReason::PhaseBarrier };
            result = result.map(|applied| Applied { reply: Reply::Lease(wait), events: applied.events });
        }
        // A refused command changed nothing, so it need not be logged (a replay would refuse it again).
        if result.is_ok() {
            batch.entries.push(command);
        }
        batch.replies.push((reply, result));
    }

    /// A LeaseTask while the manifests the active stage reads are still being written becomes a
    /// lease-less heartbeat (the worker stays alive, nothing is leased); the caller answers it "retry
    /// later". Returns whether it did.
    fn hold_back(&self, command: Command) -> (Command, bool) {
        let gate_open = self.publisher.as_ref().is_none_or(|p| p.gate_open(&self.state));
        match command {
            Command::LeaseTask { worker_id, now_ms } if !gate_open => {
                (Command::Heartbeat { worker_id, lease: None, progress: Progress::default(), now_ms }, true)
            }
            other => (other, false),
        }
    }

    /// Makes the batch durable, then answers it.
    async fn commit(&mut self, mut batch: Batch) {
        if !batch.entries.is_empty() {
            let written = match self.log.take() {
                None => Err(Error::Unavailable { message: "the command log is gone after a failed write".into() }),
                Some(mut log) => {
                    let entries = std::mem::take(&mut batch.entries);
                    let count = entries.len();
                    let started = Instant::now();
                    let done = tokio::task::spawn_blocking(move || {
                        let result = log.append(&entries);
                        (log, result)
                    })
                    .await;
                    match done {
                        Ok((log, result)) => {
                            self.log = Some(log);
                            result.map(|()| {
                                self.telemetry.note_log_write(count, started.elapsed().as_secs_f64());
                                self.log_index += count as u64;
                            })
                        }
                        Err(e) => Err(Error::Unavailable { message: format!("the log write panicked: {e}") }),
                    }
                }
            };
            if let Err(error) = written {
                // The state now runs ahead of the log: serving it could acknowledge what a restart
                // would forget. Refuse everything until an operator restarts from the log.
                self.telemetry.note_log_error(&error);
                let unavailable = Error::Unavailable { message: format!("could not persist the command: {error}") };
                for (_, result) in &mut batch.replies {
                    if result.is_ok() {
                        *result = Err(unavailable.clone());
                    }
                }
            }
        }
        // Only what is durable may be published; after a failed write nothing more is.
        if self.telemetry.log_error.is_none()
            && let Some(publisher) = &mut self.publisher
        {
            publisher.queue_finished(&self.state);
        }
        for (reply, result) in batch.replies {
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        let now = self.clock.now_ms();
        // Only reads need it (the status page): not worth a gate check on every committed batch.
        let held_back =
            if batch.reads.is_empty() { None } else { self.publisher.as_ref().and_then(|p| p.held_back(&self.state)) };
        for read in batch.reads {
            read(View {
                state: &self.state,
                telemetry: &self.telemetry,
                now_ms: now,
                log_index: self.log_index,
                held_back: held_back.clone(),
            });
        }
        self.run.send_if_modified(|status| {
            let changed = status != self.state.status();
            if changed {
                *status = self.state.status().clone();
            }
            changed
        });
        self.snapshot_hook().await;
    }

    /// After the batch is answered: snapshot the state once enough entries have gone by. Only a durable
    /// state may be snapshotted, so never once a write failed.
    async fn snapshot_hook(&mut self) {
        if self.telemetry.log_error.is_none() {
            self.snapshots.after_commit(self.log.as_mut(), &self.state, self.log_index).await;
        }
    }
}

#[derive(Default)]
struct Batch {
    len: usize,
    entries: Vec<Command>,
    replies: Vec<(Option<ReplyTx>, Result<Applied>)>,
    reads: Vec<ReadFn>,
}

/// Time enters the state only here: the command carries the driver's clock reading.
fn stamp(command: &mut Command, now: u64) {
    match command {
        Command::RegisterWorker { now_ms, .. }
        | Command::Heartbeat { now_ms, .. }
        | Command::LeaseTask { now_ms, .. }
        | Command::CompleteTask { now_ms, .. }
        | Command::FailTask { now_ms, .. }
        | Command::ExpireLeases { now_ms }
        | Command::JoinGang { now_ms, .. }
        | Command::AbortGang { now_ms, .. } => *now_ms = now,
    }
}
