//! Publishing each finished rollout and eval stage's `manifest.json` to the run's object store: the only
//! way the next phase finds its input (common's `records` reads nothing else).
//!
//! The actor hands every stage it moves past to one writer task, in run order; the writer turns the
//! stage's accepted outputs into a `Manifest`, writes it (retrying with backoff while the store fails),
//! and then raises a watermark: the number of stages, from the first, whose manifests are durable. The
//! actor answers LeaseTask with "retry later" while the watermark is behind the active stage, so no task
//! of a stage can be leased before the manifest of the stage it reads has been written. A train stage
//! publishes V_t's value manifest (`iro_common::values`): the accepted attempt and the sha256 of its
//! `files.json`, the only way a loader finds V_t.
//!
//! Writes are idempotent (the same accepted attempts always give the same manifest), so a coordinator
//! that restarts simply queues every stage it has moved past again.

use std::time::Duration;

use iro_common::layout::{RunLayout, ShardedPhase};
use iro_common::records::{Manifest, ShardEntry, write_manifest};
use iro_common::store::Store;
use iro_common::values::{ValueManifest, write_value_manifest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::plan::Phase;
use crate::state::{RunState, RunStatus, StageManifest};

/// First wait after a failed write; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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

/// The actor's side: queues stages and knows how far publishing has got.
pub struct Publisher {
    jobs: mpsc::UnboundedSender<Job>,
    published: watch::Receiver<usize>,
    /// The write being retried and why it failed; None while writes succeed.
    trouble: watch::Receiver<Option<String>>,
    /// Stages before this index have been queued.
    queued: usize,
    writer: JoinHandle<()>,
}

impl Publisher {
    /// Starts the writer task for `run_id`'s manifests in `store`.
    pub fn start(store: Store, run_id: &str) -> Result<Self> {
        let layout = RunLayout::new(run_id).map_err(|e| Error::Config { field: "run.id", message: e.to_string() })?;
        let (jobs, rx) = mpsc::unbounded_channel();
        let (published_tx, published) = watch::channel(0);
        let (trouble_tx, trouble) = watch::channel(None);
        let writer = Writer { store, layout, run_id: run_id.to_owned(), published: published_tx, trouble: trouble_tx };
        Ok(Self { jobs, published, trouble, queued: 0, writer: tokio::spawn(writer.run(rx)) })
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
            None => "waiting for the manifests of finished stages to be written".to_owned(),
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
}

impl Writer {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.recv().await {
            self.publish(&job.publish).await;
            self.published.send_replace(job.stage + 1);
        }
    }

    /// Writes one stage's manifest, retrying until it succeeds: the run cannot go on without it.
    async fn publish(&self, publish: &Publish) {
        let iteration = publish.accepted.iteration;
        let (phase, key) = match publish.phase {
            Some(phase) => (phase.to_string(), self.layout.manifest(iteration, phase)),
            None => ("train".to_owned(), self.layout.value_manifest(iteration)),
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1u32.. {
            match self.write(publish).await {
                Ok(shards) => {
                    tracing::info!(iteration, phase = %phase, shards, key, "manifest written");
                    self.trouble.send_replace(None);
                    return;
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

    async fn write(&self, publish: &Publish) -> iro_common::Result<usize> {
        let stage = &publish.accepted;
        let Some(phase) = publish.phase else {
            // The train task's one output: rank 0's `files.json`, checked against its sha256 before it is named.
            let Some(out) = stage.shards.first() else { return Ok(0) };
            let manifest = ValueManifest::new(&self.layout, &self.run_id, stage.iteration, out.attempt, &out.sha256);
            write_value_manifest(&self.store, &self.layout, &manifest).await?;
            return Ok(1);
        };
        let mut manifest = Manifest::new(&self.run_id, stage.iteration, phase, publish.shard_count);
        for shard in &stage.shards {
            // The task reports no size; ask the store, which also proves the accepted object is there.
            let bytes = self.store.size(&shard.key).await?;
            manifest.accept(ShardEntry {
                shard: shard.shard,
                attempt: shard.attempt,
                key: shard.key.clone(),
                sha256: shard.sha256.clone(),
                records: shard.records,
                tokens: shard.tokens,
                bytes,
            })?;
        }
        write_manifest(&self.store, &manifest).await?;
        Ok(manifest.shards.len())
    }
}
