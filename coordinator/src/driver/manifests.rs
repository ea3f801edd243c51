//! Publishing each finished rollout and eval stage's `manifest.json` to the run's object store: the only
//! way the next phase finds its input (common's `records` reads nothing else).
//!
//! The actor hands every stage it moves past to one writer task, in run order; the writer checks the
//! stage's accepted outputs, turns them into a `Manifest`, writes it (retrying with backoff while the store
//! fails), and then raises a watermark: the number of stages, from the first, whose manifests are durable.
//! The actor answers LeaseTask with "retry later" while the watermark is behind the active stage, so no
//! task of a stage can be leased before the manifest of the stage it reads has been written. A train stage
//! publishes V_t's value manifest (`iro_common::values`): the accepted attempt and the sha256 of its
//! `files.json`, the only way a loader finds V_t.
//!
//! Checking (review A8): before a manifest names an output, the writer reads every shard object (at most
//! `CHECKS_IN_FLIGHT` at once; JSONL shards are small) and compares its sha256 and record count with what
//! the worker reported; for V_t it checks `files.json` against its sha256 and every listed file's size (the
//! loaders hash the weights themselves). An output that is missing or wrong is not retried: the writer
//! hands a `Rejection` back to the actor, which applies `Command::RejectOutput`. That re-opens the task as a
//! new attempt, counted as a failure of the worker that reported it, so the task's attempt limit bounds how
//! often it can happen. The stage is queued again once it is done again. Only errors of the store itself
//! (unreachable, refusing) are retried, since waiting is all that helps them.
//!
//! Writes are idempotent (the same accepted attempts always give the same manifest). A coordinator that
//! restarts queues every stage it has moved past again; a stage whose manifest is already in the store,
//! naming the same attempts and checksums, is neither checked nor written again (review A16).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{Manifest, ShardEntry, read_manifest, write_manifest};
use iro_common::store::{Store, sha256_hex};
use iro_common::values::{ValueManifest, read_value_files, read_value_manifest, write_value_manifest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::plan::Phase;
use crate::state::{OutputProblem, Plan, RunState, RunStatus, ShardOutput, StageManifest, TaskId};

/// First wait after a failed write; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Shard objects read and hashed at once.
const CHECKS_IN_FLIGHT: usize = 8;

/// One stage, in run order.
struct Job {
    stage: usize,
    publish: Publish,
}

/// A stage's manifest to write: a rollout or eval stage's shard manifest, or a train stage's value manifest.
struct Publish {
    /// None for a train stage.
    phase: Option<ShardedPhase>,
    shard_count: u32,
    accepted: StageManifest,
}

/// An accepted output the writer found missing or wrong: for the actor to apply as `Command::RejectOutput`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub task_id: TaskId,
    pub attempt: u32,
    pub problem: OutputProblem,
    /// What was wrong, naming the object and the store.
    pub detail: String,
}

/// The actor's side: queues stages and knows how far publishing has got.
pub struct Publisher {
    jobs: mpsc::UnboundedSender<Job>,
    published: watch::Receiver<usize>,
    /// The write being retried and why it failed; None while writes succeed.
    trouble: watch::Receiver<Option<String>>,
    rejections: mpsc::UnboundedReceiver<Rejection>,
    /// Stages before this index have been queued.
    queued: usize,
    writer: JoinHandle<()>,
    /// For the check of a fresh start.
    store: Store,
    layout: RunLayout,
    run_id: String,
    force_fresh_start: bool,
}

impl Publisher {
    /// Starts the writer task for `run_id`'s manifests in `store`.
    pub fn start(store: Store, run_id: &str) -> Result<Self> {
        let layout = RunLayout::new(run_id).map_err(|e| Error::Config { field: "run.id", message: e.to_string() })?;
        let (jobs, rx) = mpsc::unbounded_channel();
        let (published_tx, published) = watch::channel(0);
        let (trouble_tx, trouble) = watch::channel(None);
        let (rejections_tx, rejections) = mpsc::unbounded_channel();
        let writer = Writer {
            store: store.clone(),
            layout: layout.clone(),
            run_id: run_id.to_owned(),
            published: published_tx,
            trouble: trouble_tx,
            rejections: rejections_tx,
        };
        Ok(Self {
            jobs,
            published,
            trouble,
            rejections,
            queued: 0,
            writer: tokio::spawn(writer.run(rx)),
            store,
            layout,
            run_id: run_id.to_owned(),
            force_fresh_start: false,
        })
    }

    /// Lets `check_fresh_start` pass over a store that already holds the run (`--force-fresh-state`).
    pub fn force_fresh_start(mut self, force: bool) -> Self {
        self.force_fresh_start = force;
        self
    }

    /// Called when the command log is empty (a new state folder): refuses a store that already holds a
    /// manifest of this run (review A16). The run would start over at attempt 1 and write its outputs to
    /// the keys the manifests name, so readers of the old run, or a resumed old state folder, would see
    /// the new bytes under checksums that no longer match. Forced, it only says so.
    pub async fn check_fresh_start(&self, plan: &Plan) -> Result<()> {
        for stage in 0..plan.stage_count() {
            let key = match plan.stage(stage) {
                (t, Phase::Rollout) => self.layout.manifest(t, ShardedPhase::Rollout),
                (t, Phase::Train) => self.layout.value_manifest(t),
                (t, Phase::Eval) => self.layout.manifest(t, ShardedPhase::Eval),
            };
            let found = self.store.exists(&key).await.map_err(|e| Error::Config {
                field: "run.store",
                message: format!("cannot check whether the run was started before: {e}"),
            })?;
            if !found {
                continue;
            }
            let found = self.store.describe(&key);
            if self.force_fresh_start {
                tracing::warn!(
                    run = self.run_id,
                    found,
                    "starting the run over from a fresh state folder although the store holds its manifests \
                     (forced); its outputs are overwritten"
                );
                return Ok(());
            }
            return Err(Error::RunExists { run_id: self.run_id.clone(), found });
        }
        Ok(())
    }

    /// Queues every stage `state` has moved past and that is not queued yet. Call only once the
    /// commands that moved past them are durable: a manifest must never name an acceptance that a
    /// restart could forget.
    pub fn queue_finished(&mut self, state: &RunState) {
        let finished = active_stage(state);
        while self.queued < finished {
            let (iteration, phase) = state.plan().stage(self.queued);
            let sharded = match phase {
                Phase::Train => None,
                Phase::Rollout => Some(ShardedPhase::Rollout),
                Phase::Eval => Some(ShardedPhase::Eval),
            };
            let publish = match state.manifest(iteration, phase) {
                Ok(accepted) => Publish { phase: sharded, shard_count: state.plan().tasks_in(phase), accepted },
                Err(e) => {
                    // Cannot happen for a stage of the plan; skipping would open the gate on a
                    // missing manifest, so stop queueing (leases stay held back) and say why.
                    tracing::error!(iteration, error = %e, "cannot build the manifest of a finished stage");
                    return;
                }
            };
            if self.jobs.send(Job { stage: self.queued, publish }).is_err() {
                tracing::error!("the manifest writer has stopped; leases stay held back");
                return;
            }
            self.queued += 1;
        }
    }

    /// After a RejectOutput re-opened `stage`: it is queued again once it is done again. Jobs already
    /// queued for it and later stages are stale; the writer skips them, being still at `stage`.
    pub fn rewind(&mut self, stage: usize) {
        self.queued = self.queued.min(stage);
    }

    /// The next output the writer rejected. Never resolves once the writer has stopped.
    pub async fn rejected(&mut self) -> Rejection {
        match self.rejections.recv().await {
            Some(rejection) => rejection,
            None => std::future::pending().await,
        }
    }

    /// `rejected` of the writer when there is one; never resolves without (a `select!` branch that is off).
    pub async fn next_rejection(publisher: Option<&mut Self>) -> Rejection {
        match publisher {
            Some(publisher) => publisher.rejected().await,
            None => std::future::pending().await,
        }
    }

    /// A rejected output, if one is waiting.
    pub fn try_rejected(&mut self) -> Option<Rejection> {
        self.rejections.try_recv().ok()
    }

    /// Whether the stage `state` has open may be leased: every stage before it is published. A failed
    /// run is never held back: its workers should hear that it failed.
    pub fn gate_open(&self, state: &RunState) -> bool {
        matches!(state.status(), RunStatus::Failed { .. }) || *self.published.borrow() >= active_stage(state)
    }

    /// Why leases are being held back, for the status page; None while the gate is open.
    pub fn held_back(&self, state: &RunState) -> Option<String> {
        if self.gate_open(state) {
            return None;
        }
        Some(match self.trouble.borrow().as_ref() {
            Some(trouble) => format!("waiting for a manifest: {trouble} (retrying)"),
            None => "waiting for the manifests of finished stages to be checked and written".to_owned(),
        })
    }

    /// A receiver of the watermark (stages published, counted from the first).
    pub fn watermark(&self) -> watch::Receiver<usize> {
        self.published.clone()
    }

    /// Stops the writer, abandoning a write in progress (a restart writes it again).
    pub fn stop(self) {
        self.writer.abort();
    }
}

/// The index of the active stage; `stage_count()` once the run finished (every stage is behind it).
fn active_stage(state: &RunState) -> usize {
    match state.current_stage() {
        Some((iteration, phase)) => state.plan().stage_of(iteration, phase),
        None => state.plan().stage_count(),
    }
}

struct Writer {
    store: Store,
    layout: RunLayout,
    run_id: String,
    published: watch::Sender<usize>,
    trouble: watch::Sender<Option<String>>,
    rejections: mpsc::UnboundedSender<Rejection>,
}

impl Writer {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let next = *self.published.borrow();
            if job.stage != next {
                // Queued before a rejection sent the run back to stage `next`; that stage comes again
                // once it is redone, and the later ones after it.
                tracing::debug!(stage = job.stage, next, "skipping a manifest queued before a rejection");
                continue;
            }
            match self.publish(&job.publish).await {
                Ok(()) => {
                    self.published.send_replace(job.stage + 1);
                }
                Err(rejections) => {
                    for rejection in rejections {
                        if self.rejections.send(rejection).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Checks and writes one stage's manifest (Ok once it is in the store), retrying while the store fails:
    /// the run cannot go on without it. Outputs found missing or wrong end the turn instead, unwritten.
    async fn publish(&self, publish: &Publish) -> std::result::Result<(), Vec<Rejection>> {
        let iteration = publish.accepted.iteration;
        let (phase, key) = match publish.phase {
            Some(phase) => (phase.to_string(), self.layout.manifest(iteration, phase)),
            None => ("train".to_owned(), self.layout.value_manifest(iteration)),
        };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let written = match publish.phase {
                Some(sharded) => self.write_shards(sharded, publish).await,
                None => self.write_value(publish).await,
            };
            match written {
                Ok(Written::Now(shards)) => {
                    tracing::info!(iteration, phase = %phase, shards, key, "manifest checked and written");
                    self.trouble.send_replace(None);
                    return Ok(());
                }
                Ok(Written::AlreadyThere) => {
                    tracing::info!(iteration, phase = %phase, key, "manifest already in the store, unchanged");
                    self.trouble.send_replace(None);
                    return Ok(());
                }
                Ok(Written::Rejected(rejections)) => {
                    for r in &rejections {
                        tracing::warn!(
                            iteration,
                            phase = %phase,
                            task = %r.task_id,
                            attempt = r.attempt,
                            problem = r.problem.kind(),
                            "rejecting an accepted output ({}) and re-opening its task instead of writing {key}: {}",
                            r.problem.kind(),
                            r.detail
                        );
                    }
                    self.trouble.send_replace(None);
                    return Err(rejections);
                }
                Err(e) => {
                    tracing::error!(
                        iteration,
                        phase = %phase,
                        attempt,
                        key,
                        error = %e,
                        "cannot write the manifest; leases of the next stage wait for it (retrying in {backoff:?})"
                    );
                    self.trouble.send_replace(Some(format!("{key} cannot be written (attempt {attempt}): {e}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn write_shards(&self, phase: ShardedPhase, publish: &Publish) -> iro_common::Result<Written> {
        let stage = &publish.accepted;
        if let Some(existing) = self.existing(read_manifest(&self.store, &self.layout, stage.iteration, phase).await)?
            && existing.shard_count == publish.shard_count
            && existing.shards.len() == stage.shards.len()
            && existing.shards.iter().zip(&stage.shards).all(|(e, s)| same_entry(e, s))
        {
            return Ok(Written::AlreadyThere);
        }
        // Owned items and store: a stream over borrowed ones makes the writer's future not provably Send.
        let store = self.store.clone();
        let checked: Vec<Checked> = futures::stream::iter(stage.shards.clone())
            .map(move |shard| {
                let store = store.clone();
                async move { check_shard(&store, &shard).await }
            })
            .buffered(CHECKS_IN_FLIGHT)
            .try_collect()
            .await?;
        let mut manifest = Manifest::new(&self.run_id, stage.iteration, phase, publish.shard_count);
        let mut rejections = Vec::new();
        for (shard, checked) in stage.shards.iter().zip(checked) {
            match checked {
                Checked::Good { bytes } => manifest.accept(ShardEntry {
                    shard: shard.shard,
                    attempt: shard.attempt,
                    key: shard.key.clone(),
                    sha256: shard.sha256.clone(),
                    records: shard.records,
                    tokens: shard.tokens,
                    bytes,
                })?,
                Checked::Bad(problem, detail) => rejections.push(Rejection {
                    task_id: TaskId::new(stage.iteration, stage.phase, shard.shard),
                    attempt: shard.attempt,
                    problem,
                    detail,
                }),
            }
        }
        if !rejections.is_empty() {
            return Ok(Written::Rejected(rejections));
        }
        write_manifest(&self.store, &manifest).await?;
        Ok(Written::Now(manifest.shards.len()))
    }

    /// The train task's one output: rank 0's `files.json`, checked against its sha256, and every file it
    /// lists present at its size, before the value manifest names it.
    async fn write_value(&self, publish: &Publish) -> iro_common::Result<Written> {
        let stage = &publish.accepted;
        let Some(out) = stage.shards.first() else { return Ok(Written::Now(0)) };
        let manifest = ValueManifest::new(&self.layout, &self.run_id, stage.iteration, out.attempt, &out.sha256);
        let existing = self.existing(read_value_manifest(&self.store, &self.layout, stage.iteration).await)?;
        if existing.flatten().as_ref() == Some(&manifest) {
            return Ok(Written::AlreadyThere);
        }
        let reject = |problem, detail| {
            let task_id = TaskId::new(stage.iteration, Phase::Train, 0);
            Ok(Written::Rejected(vec![Rejection { task_id, attempt: out.attempt, problem, detail }]))
        };
        if out.key != manifest.key {
            // The wire refuses such a completion; should one get here, no manifest may name it.
            let detail = format!("the output key `{}` is not attempt {}'s `{}`", out.key, out.attempt, manifest.key);
            return reject(OutputProblem::Malformed, detail);
        }
        let files = match read_value_files(&self.store, &manifest).await {
            Ok(files) => files,
            Err(e) => match problem_of(&e) {
                Some(problem) => return reject(problem, e.to_string()),
                None => return Err(e),
            },
        };
        let folder = manifest.model_key();
        for file in &files.files {
            let key = format!("{folder}/{}", file.name);
            match self.store.size(&key).await {
                Ok(bytes) if bytes == file.bytes => {}
                Ok(bytes) => {
                    let detail = format!(
                        "{} holds {bytes} bytes, its files.json says {}",
                        self.store.describe(&key),
                        file.bytes
                    );
                    return reject(OutputProblem::Malformed, detail);
                }
                Err(e @ iro_common::Error::ObjectMissing { .. }) => {
                    return reject(OutputProblem::Missing, format!("{e} (listed in its files.json)"));
                }
                Err(e) => return Err(e),
            }
        }
        write_value_manifest(&self.store, &self.layout, &manifest).await?;
        Ok(Written::Now(1))
    }

    /// A manifest already in the store, when it can be read: None when there is none or it is unreadable
    /// (it is then written over); the store's own failures are errors, retried.
    fn existing<T>(&self, read: iro_common::Result<T>) -> iro_common::Result<Option<T>> {
        match read {
            Ok(found) => Ok(Some(found)),
            Err(iro_common::Error::ObjectMissing { .. }) => Ok(None),
            Err(e @ (iro_common::Error::StoreUnreachable { .. } | iro_common::Error::StoreIo { .. })) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "a manifest in the store cannot be read; writing it again");
                Ok(None)
            }
        }
    }
}

/// How a stage's write went, short of a store failure.
enum Written {
    /// Written now, naming this many outputs.
    Now(usize),
    AlreadyThere,
    Rejected(Vec<Rejection>),
}

/// One shard object's check.
enum Checked {
    Good { bytes: u64 },
    Bad(OutputProblem, String),
}

/// Reads `shard`'s object and compares it with what its worker reported: the sha256, and the record count
/// the next phase checks again when it reads it.
async fn check_shard(store: &Store, shard: &ShardOutput) -> iro_common::Result<Checked> {
    let bytes = match store.get(&shard.key).await {
        Ok(bytes) => bytes,
        Err(e @ iro_common::Error::ObjectMissing { .. }) => {
            return Ok(Checked::Bad(OutputProblem::Missing, e.to_string()));
        }
        Err(e) => return Err(e),
    };
    let actual = sha256_hex(&bytes);
    if actual != shard.sha256 {
        let detail =
            format!("{} hashes to sha256 {actual}, its worker reported {}", store.describe(&shard.key), shard.sha256);
        return Ok(Checked::Bad(OutputProblem::ChecksumMismatch, detail));
    }
    // What `records::decode_jsonl` counts: every line that is not blank.
    let mut records = 0u64;
    for line in bytes.split(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(text) if text.trim().is_empty() => {}
            Ok(_) => records += 1,
            Err(e) => {
                let detail = format!("{} line {} is not UTF-8: {e}", store.describe(&shard.key), records + 1);
                return Ok(Checked::Bad(OutputProblem::Malformed, detail));
            }
        }
    }
    if records != shard.records {
        let detail =
            format!("{} holds {records} records, its worker reported {}", store.describe(&shard.key), shard.records);
        return Ok(Checked::Bad(OutputProblem::Malformed, detail));
    }
    Ok(Checked::Good { bytes: bytes.len() as u64 })
}

/// Whether a manifest entry in the store names exactly this accepted output (its size came from the object).
fn same_entry(entry: &ShardEntry, shard: &ShardOutput) -> bool {
    (entry.shard, entry.attempt, &entry.key, &entry.sha256, entry.records, entry.tokens)
        == (shard.shard, shard.attempt, &shard.key, &shard.sha256, shard.records, shard.tokens)
}

/// The problem with an output that reading its `files.json` showed; None for the store's own failures.
fn problem_of(e: &iro_common::Error) -> Option<OutputProblem> {
    match e {
        iro_common::Error::ObjectMissing { .. } => Some(OutputProblem::Missing),
        iro_common::Error::ChecksumMismatch { .. } => Some(OutputProblem::ChecksumMismatch),
        iro_common::Error::MalformedJson { .. } | iro_common::Error::ManifestInvalid { .. } => {
            Some(OutputProblem::Malformed)
        }
        _ => None,
    }
}
