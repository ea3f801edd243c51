//! The driver task: the one owner of the `RunState` (TGI's router/queue pattern). Everyone else holds a
//! cheap `Handle` that sends it messages with oneshot replies. The handle stamps each command with the
//! clock as it arrives; the driver applies it, appends it to the command log unless it changed nothing
//! durable (idle polls, lease-less heartbeats), and replies only once the log is durable. Messages that
//! queue up while a write is in flight form the next batch, which shares one fsync (group commit).
//! Between messages it sleeps until the state's next deadline and then, once the queue is drained,
//! applies `ExpireLeases`. When the driver itself could not run for a while (a stalled fsync, a paused
//! VM), nothing expires until workers have had time to heartbeat again, as after a restart. After a
//! failed log write it refuses every command, reports itself unhealthy, and ends with the error.
//! With a manifest `Publisher`, it queues every stage it moves past for publishing once the move is
//! durable, and holds LeaseTask back ("retry later") until the stages before the active one are
//! published, so no worker can start a stage before the manifest it reads exists. An accepted output the
//! publisher found missing or wrong comes back as a rejection, which the driver applies and logs as
//! `RejectOutput` like any command: the task is leased again as a new attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::clock::Clock;
use super::log::{CommandLog, Recovered};
use super::manifests::{Publisher, Rejection};
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
/// A due tick waits for the queue to drain, but for at most this many batches (a full queue's worth),
/// so a steady stream of requests cannot starve expiry.
const MAX_DEFERRED_TICKS: u32 = (QUEUE / MAX_BATCH) as u32;
/// While anything can expire the driver wakes at least this often, so that a wake-up much later than
/// asked for shows that it did not run in between (a paused VM).
const PULSE_MS: u64 = 1_000;
/// How long a driver whose log write failed keeps answering (refusals, status, failing probes) before
/// it ends, so that callers and probes see why before the process exits.
const LOG_ERROR_EXIT_MS: u64 = 5_000;

#[derive(Debug, Clone, Default)]
pub struct DriverOptions {
    /// After a restart that recovered commands, no lease or worker expires before this much time has
    /// passed: workers that kept working while the coordinator was down get to heartbeat first.
    /// None: one worker timeout of the plan.
    pub restart_grace_ms: Option<u64>,
    /// Snapshot the run state every this many log entries, and drop the log segments snapshots cover.
    /// None: `snapshots::DEFAULT_SNAPSHOT_EVERY`; Some(0): never (the log keeps every entry).
    pub snapshot_every: Option<u64>,
    /// After a failed log write, how long the driver keeps answering (refusing commands, failing its
    /// health checks) before its task ends with the error. None: 5 s.
    pub log_error_exit_ms: Option<u64>,
}

/// What `/livez` and `/readyz` report; published by the driver as it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The log is replayed and every write so far succeeded.
    Serving,
    /// A log write failed: the state may run ahead of the log, so the driver refuses every command and
    /// ends shortly; a restart replays the log.
    LogFailed { error: String },
    /// The driver task has ended.
    Stopped,
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
    /// The replica's Raft state; None for the single-process driver.
    pub raft: Option<crate::raft::RaftStatus>,
}

pub(crate) type ReadFn = Box<dyn FnOnce(View<'_>) + Send>;
pub(crate) type ReplyTx = oneshot::Sender<Result<Applied>>;

/// What a `Handle` sends its driver: the single-process `Actor` here, or a Raft replica's (`raft::node`).
pub(crate) enum Msg {
    Apply {
        command: Command,
        /// The session the call presented; checked against the worker's current registration when set.
        session: Option<String>,
        reply: ReplyTx,
    },
    /// RegisterWorker with the id picked by the driver when the caller has none.
    Register {
        worker_id: Option<WorkerId>,
        name: String,
        resources: Resources,
        now_ms: u64,
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
    health: watch::Receiver<Health>,
    clock: Arc<dyn Clock>,
    /// Stages whose manifests are published, counted from the first, and how many stages there are;
    /// None when the driver publishes no manifests.
    published: Option<(watch::Receiver<usize>, usize)>,
}

fn stopped() -> Error {
    Error::Unavailable { message: "the coordinator driver has stopped".into() }
}

impl Handle {
    pub(crate) fn from_parts(
        tx: mpsc::Sender<Msg>,
        run: watch::Receiver<RunStatus>,
        health: watch::Receiver<Health>,
        clock: Arc<dyn Clock>,
        published: Option<(watch::Receiver<usize>, usize)>,
    ) -> Self {
        Self { tx, run, health, clock, published }
    }

    /// Applies `command` with its time replaced by the clock's reading now, as it arrives; returns once
    /// it is durable (or, when it changed nothing durable, once everything before it is).
    pub async fn apply(&self, command: Command) -> Result<Applied> {
        self.apply_in_session(command, None).await
    }

    /// `apply` for a call that presented `session`: refused with `StaleSession` unless it is the session of
    /// the worker's current registration. Checked by the driver as it applies the command, so no
    /// registration can slip in between check and apply; a refused command changes nothing and is not
    /// logged, and one that passed replays the same without the check.
    pub async fn apply_in_session(&self, mut command: Command, session: Option<String>) -> Result<Applied> {
        // Stamped on arrival, not when the driver gets to it: a heartbeat that waited in the queue behind
        // a slow log write still counts from when the worker sent it.
        command.set_now_ms(self.clock.now_ms());
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Apply { command, session, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Registers a worker; with no id the driver picks a fresh one (ids must be in the log, so they are
    /// chosen before the command is logged, by the only task that knows which are taken).
    pub async fn register(&self, worker_id: Option<WorkerId>, name: String, resources: Resources) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        let now_ms = self.clock.now_ms();
        self.tx.send(Msg::Register { worker_id, name, resources, now_ms, reply }).await.map_err(|_| stopped())?;
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

    /// The driver's health, without queueing behind its work (probes must answer during a slow write).
    pub fn health(&self) -> Health {
        if self.tx.is_closed() {
            return Health::Stopped;
        }
        self.health.borrow().clone()
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
/// before any lease is handed out, and each stage's as it finishes; an empty log over a store that
/// already holds the run's manifests is refused (`Publisher::check_fresh_start`).
pub async fn start(
    plan: Plan,
    mut log: Box<dyn CommandLog>,
    clock: Arc<dyn Clock>,
    options: DriverOptions,
    mut publisher: Option<Publisher>,
) -> Result<(Handle, JoinHandle<Result<()>>)> {
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
                    state = *snapshot;
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
    if recovered == 0
        && let Some(publisher) = &publisher
    {
        publisher.check_fresh_start(state.plan()).await?;
    }
    let published = publisher.as_mut().map(|p| {
        p.queue_finished(&state);
        (p.watermark(), state.plan().stage_count())
    });
    let (tx, rx) = mpsc::channel(QUEUE);
    let (run_tx, run_rx) = watch::channel(state.status().clone());
    let (health_tx, health_rx) = watch::channel(Health::Serving);
    let worker_timeout_ms = state.plan().worker_timeout_ms;
    let actor = Actor {
        state,
        log: Some(log),
        clock: clock.clone(),
        telemetry: Telemetry::new(now, recovered),
        log_index: recovered,
        run: run_tx,
        quiet_until_ms: if recovered > 0 { now.saturating_add(grace) } else { 0 },
        gap_grace_ms: grace.max(worker_timeout_ms),
        last_tick_ms: None,
        deferred_ticks: 0,
        publisher,
        snapshots: Snapshots::new(options.snapshot_every, loaded.snapshot_index),
        health: health_tx,
        log_failure: None,
        exit_at: None,
        exit_after: Duration::from_millis(options.log_error_exit_ms.unwrap_or(LOG_ERROR_EXIT_MS)),
    };
    let task = tokio::spawn(actor.run(rx));
    Ok((Handle { tx, run: run_rx, health: health_rx, clock, published }, task))
}

struct Actor {
    state: RunState,
    /// None while a write is in flight on the blocking pool, or forever after it panicked.
    log: Option<Box<dyn CommandLog>>,
    clock: Arc<dyn Clock>,
    telemetry: Telemetry,
    log_index: u64,
    run: watch::Sender<RunStatus>,
    /// The restart grace, or the grace after a gap in the driver's own running: no expiry before this.
    quiet_until_ms: u64,
    /// How long expiry waits after such a gap: the restart grace, and at least a worker timeout (in which
    /// every live worker heartbeats).
    gap_grace_ms: u64,
    /// When the timer last fired; the next tick waits for a later time, so a deadline that a tick
    /// could not clear never spins.
    last_tick_ms: Option<u64>,
    /// Batches a due tick has waited for the queue to drain.
    deferred_ticks: u32,
    /// Writes the manifests of finished stages; None: no manifests (tests, benchmarks).
    publisher: Option<Publisher>,
    /// When to snapshot the state and compact the log.
    snapshots: Snapshots,
    health: watch::Sender<Health>,
    /// The failed log write the driver ends with.
    log_failure: Option<Error>,
    /// When a driver whose log write failed ends.
    exit_at: Option<tokio::time::Instant>,
    exit_after: Duration,
}

enum Next {
    Msg(Msg),
    /// The manifest writer rejected an accepted output.
    Rejected(Rejection),
    /// The timer (or the pulse) fired.
    Wake,
    /// The delay after a failed log write is over.
    Exit,
    Closed,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) -> Result<()> {
        let mut stop: Option<oneshot::Sender<()>> = None;
        while stop.is_none() {
            let deadline = self.timer_deadline();
            let mut batch = Batch::default();
            let now = self.clock.now_ms();
            // A due deadline skips the wait: a steady stream of requests cannot starve expiry.
            if deadline.is_none_or(|at| at > now) {
                let wake = deadline.map(|at| at.min(now.saturating_add(PULSE_MS)));
                let clock = self.clock.clone();
                let sleep = async move {
                    match wake {
                        Some(at) => clock.sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let exit = sleep_until_or_never(self.exit_at);
                let rejected = Publisher::next_rejection(self.publisher.as_mut());
                let next = tokio::select! {
                    msg = rx.recv() => msg.map_or(Next::Closed, Next::Msg),
                    rejection = rejected => Next::Rejected(rejection),
                    () = sleep => Next::Wake,
                    () = exit => Next::Exit,
                };
                if let Some(at) = wake {
                    // Woken well after the time asked for: the driver was not running in between.
                    let late = self.clock.now_ms().saturating_sub(at);
                    self.note_gap(late, "waiting");
                }
                match next {
                    Next::Closed | Next::Exit => break,
                    // The clock may wake a sleeper early, and the pulse fires before the deadline:
                    // whether to tick is decided below, after the queue is drained.
                    Next::Wake => {}
                    Next::Msg(msg) => stop = self.take(msg, &mut batch),
                    Next::Rejected(rejection) => self.reject(rejection, &mut batch),
                }
            }
            while let Some(rejection) = self.publisher.as_mut().and_then(Publisher::try_rejected) {
                self.reject(rejection, &mut batch);
            }
            let mut drained = false;
            while stop.is_none() && batch.len < MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => stop = self.take(msg, &mut batch),
                    Err(_) => {
                        drained = true;
                        break;
                    }
                }
            }
            // Ticks only after the queued messages: heartbeats that waited behind a slow write apply
            // first, so the tick cannot declare dead a worker whose proof of life is in the queue.
            if stop.is_none() && self.timer_deadline().is_some_and(|at| at <= self.clock.now_ms()) {
                if drained || self.deferred_ticks >= MAX_DEFERRED_TICKS {
                    self.deferred_ticks = 0;
                    self.tick(&mut batch);
                } else {
                    self.deferred_ticks += 1;
                }
            }
            if !batch.is_empty() {
                self.commit(batch).await;
            }
        }
        self.snapshots.finish().await;
        tracing::info!(commands = self.log_index, "coordinator driver stopped");
        if let Some(publisher) = self.publisher.take() {
            publisher.stop();
        }
        self.health.send_replace(Health::Stopped);
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        match self.log_failure.take() {
            Some(error) => {
                tracing::error!(
                    path = error.path().unwrap_or_default(),
                    error = %error,
                    "coordinator driver ended after a failed command log write; a restart replays the log"
                );
                Err(error)
            }
            None => Ok(()),
        }
    }

    /// A gap in the driver's own running (a stalled fsync, a paused VM, a clock step) of more than half
    /// a worker timeout: workers' heartbeats sat in the queue or the network meanwhile, through no fault
    /// of theirs. Treated like a restart: nothing expires until they have had time to get through.
    fn note_gap(&mut self, gap_ms: u64, during: &'static str) {
        if gap_ms <= self.state.plan().worker_timeout_ms / 2 {
            return;
        }
        let until = self.clock.now_ms().saturating_add(self.gap_grace_ms);
        self.quiet_until_ms = self.quiet_until_ms.max(until);
        tracing::warn!(
            gap_ms,
            during,
            quiet_until_ms = self.quiet_until_ms,
            "the coordinator did not run for over half a worker timeout; no lease or worker expires until \
             workers have had time to heartbeat again"
        );
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

    /// Applies the manifest writer's rejection of an accepted output as a RejectOutput command: logged like
    /// any other, so a replay re-opens the same task. Once it applies, the publisher queues the re-opened
    /// stage again when it is done again.
    fn reject(&mut self, rejection: Rejection, batch: &mut Batch) {
        let Rejection { task_id, attempt, problem, detail } = rejection;
        let stage = self.state.plan().stage_of(task_id.iteration, task_id.phase);
        let now_ms = self.clock.now_ms();
        self.apply(Command::RejectOutput { task_id, attempt, problem, detail, now_ms }, None, batch);
        match batch.replies.last() {
            Some((_, Ok(_))) => {
                if let Some(publisher) = &mut self.publisher {
                    publisher.rewind(stage);
                }
            }
            Some((_, Err(error))) => tracing::error!(
                task = %task_id,
                attempt,
                error = %error,
                "the manifest writer rejected an output that cannot be re-opened; leases of the next stage \
                 stay held back"
            ),
            None => {}
        }
    }

    /// Handles one message; returns the stop reply when it asks the driver to stop.
    fn take(&mut self, msg: Msg, batch: &mut Batch) -> Option<oneshot::Sender<()>> {
        match msg {
            Msg::Apply { command, session, reply } => {
                if let Some(refused) = self.stale_session(&command, session.as_deref()) {
                    batch.len += 1;
                    self.telemetry.observe(&command, &Err(refused.clone()), self.state.now_ms());
                    batch.replies.push((Some(reply), Err(refused)));
                } else {
                    self.apply(command, Some(reply), batch);
                }
            }
            Msg::Register { worker_id, name, resources, now_ms, reply } => {
                let worker_id = worker_id.unwrap_or_else(|| self.state.fresh_worker_id());
                let session = super::auth::new_session();
                self.apply(Command::RegisterWorker { worker_id, name, resources, now_ms, session }, Some(reply), batch);
            }
            Msg::Read(read) => batch.reads.push(read),
            Msg::Stop(reply) => return Some(reply),
        }
        None
    }

    fn stale_session(&self, command: &Command, session: Option<&str>) -> Option<Error> {
        super::auth::stale_session(&self.state, command, session)
    }

    /// Applies a command stamped with its arrival time, and queues it for the log if it changed
    /// anything durable.
    fn apply(&mut self, command: Command, reply: Option<ReplyTx>, batch: &mut Batch) {
        batch.len += 1;
        if let Some(message) = &self.telemetry.log_error {
            let error = Error::Unavailable {
                message: format!(
                    "the command log could not be written ({message}); the coordinator exits, and its restart replays the log"
                ),
            };
            batch.replies.push((reply, Err(error)));
            return;
        }
        let (mut command, held_back) = self.hold_back(command);
        // Never earlier than the state's time (commands stamped on arrival can be dequeued out of time
        // order): what is logged is then the time the state really used, even when commands in between
        // are not logged, so a replay computes the same deadlines.
        let now = command.now_ms().max(self.state.now_ms());
        command.set_now_ms(now);
        let mut result = self.state.apply(command.clone());
        self.telemetry.observe(&command, &result, now);
        // A refused command changed nothing, so it need not be logged (a replay would refuse it again);
        // nor need one that changed only liveness, which lives in memory (the restart grace covers it).
        let durable = result.as_ref().is_ok_and(|applied| !self.state.changes_only_liveness(&command, &applied.reply));
        if held_back {
            let wait = Lease::RetryAfter { ms: self.state.plan().retry_after_ms, reason: WaitReason::PhaseBarrier };
            result = result.map(|applied| Applied { reply: Reply::Lease(wait), events: applied.events });
        }
        if durable {
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
                    let began_ms = self.clock.now_ms();
                    let done = tokio::task::spawn_blocking(move || {
                        let result = log.append(&entries);
                        (log, result)
                    })
                    .await;
                    // Nothing was applied while the write ran: heartbeats queued up behind it.
                    self.note_gap(self.clock.now_ms().saturating_sub(began_ms), "writing the command log");
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
                // would forget. Refuse everything, fail the health checks, and end shortly, so the
                // process exits and its restart replays the log.
                self.telemetry.note_log_error(&error);
                self.health.send_replace(Health::LogFailed { error: error.to_string() });
                self.exit_at = Some(tokio::time::Instant::now() + self.exit_after);
                self.log_failure = Some(error.clone());
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
                raft: None,
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

/// Resolves at `at`, or never when there is none (a `select!` branch that is off).
pub(crate) async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Default)]
struct Batch {
    len: usize,
    entries: Vec<Command>,
    replies: Vec<(Option<ReplyTx>, Result<Applied>)>,
    reads: Vec<ReadFn>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.replies.is_empty() && self.reads.is_empty()
    }
}
