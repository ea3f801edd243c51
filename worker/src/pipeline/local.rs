//! The single-process driver: runs a run's tasks in plan order (per iteration: rollout shards, train, eval
//! shards) on one `Pipeline`, recording each accepted shard in the phase's manifest as soon as it is written.
//! A killed run resumes where it stopped: accepted shards are skipped, a published value function (one with a
//! value manifest) is not retrained, and a training cut short resumes from its newest checkpoint. Attempts never overwrite each other:
//! a resumed shard is written under the next attempt number.

use std::time::Duration;

use iro_common::layout::ShardedPhase;
use iro_common::records::{Manifest, ShardEntry, write_manifest};
use iro_common::store::sha256_hex;
use iro_common::values::{ValueManifest, read_value_manifest, write_value_manifest};

use super::Pipeline;
use super::report::{Summary, write_report};
use crate::error::{Error, Result};
use crate::runtime::{TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner};

/// Called while tasks run: (what, done, total) — shards of a phase, or optimizer steps of training.
pub type OnProgress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Runs every task that is not done yet, then writes the report.
pub fn run_local(pipeline: &mut Pipeline, on_progress: OnProgress<'_>) -> Result<Summary> {
    let iterations = pipeline.config.run.iterations;
    for t in 1..=iterations {
        sharded_phase(pipeline, t, ShardedPhase::Rollout, on_progress)?;
        if pipeline.block_on(read_value_manifest(&pipeline.store, &pipeline.layout, t))?.is_some() {
            tracing::info!(t, "V_{t} already published; skipping training");
        } else {
            // A new attempt, as for shards: it resumes from the newest checkpoint an earlier one left.
            let attempt = next_train_attempt(pipeline, t)?;
            let task = task_ref(t, TaskPhase::Train, 0, attempt);
            let out = run_with_progress(pipeline, &task, &format!("iter {t} train V_{t} (steps)"), on_progress)?;
            let accepted = ValueManifest::new(&pipeline.layout, &pipeline.config.run.id, t, attempt, &out.sha256);
            if out.key != accepted.key {
                return Err(Error::InvalidRequest(format!(
                    "the train task reported `{}`, not attempt {attempt}'s `{}`",
                    out.key, accepted.key
                )));
            }
            pipeline.block_on(write_value_manifest(&pipeline.store, &pipeline.layout, &accepted))?;
        }
        sharded_phase(pipeline, t, ShardedPhase::Eval, on_progress)?;
    }
    let (store, layout) = (pipeline.store.clone(), pipeline.layout.clone());
    let id = pipeline.config.run.id.clone();
    pipeline.block_on(write_report(&store, &layout, &id, iterations))
}

fn sharded_phase(pipeline: &mut Pipeline, t: u32, phase: ShardedPhase, on_progress: OnProgress<'_>) -> Result<()> {
    let c = &pipeline.config;
    let prompts = match phase {
        ShardedPhase::Rollout => c.data.prompts_per_iteration,
        ShardedPhase::Eval => pipeline.data.test_prompts().len(),
    };
    let shards = prompts.div_ceil(c.cluster.shard_size) as u32;
    let key = pipeline.layout.manifest(t, phase);
    // A probe, then the validating read (not the bytes twice).
    let mut manifest = if pipeline.block_on(pipeline.store.exists(&key))? {
        pipeline.block_on(iro_common::records::read_manifest(&pipeline.store, &pipeline.layout, t, phase))?
    } else {
        Manifest::new(&c.run.id, t, phase, shards)
    };
    if manifest.shard_count != shards {
        return Err(Error::InvalidRequest(format!(
            "{}: the manifest has {} shards, the config now gives {shards}: the config changed under a started run",
            pipeline.store.describe(&key),
            manifest.shard_count
        )));
    }
    let label = format!("iter {t} {phase} (shards)");
    let task_phase = if phase == ShardedPhase::Rollout { TaskPhase::Rollout } else { TaskPhase::Eval };
    for shard in manifest.missing() {
        on_progress(&label, (shards as usize - manifest.missing().len()) as u64, u64::from(shards));
        let attempt = next_attempt(pipeline, t, phase, shard)?;
        let out = run_with_progress(pipeline, &task_ref(t, task_phase, shard, attempt), &label, &mut |_, _, _| {})?;
        let bytes = pipeline.block_on(pipeline.store.get(&out.key))?;
        if sha256_hex(&bytes) != out.sha256 {
            return Err(Error::InvalidRequest(format!("{}: checksum differs from the task's report", out.key)));
        }
        manifest.accept(ShardEntry {
            shard,
            attempt,
            key: out.key,
            sha256: out.sha256,
            records: out.records,
            tokens: out.tokens,
            bytes: bytes.len() as u64,
        })?;
        pipeline.block_on(write_manifest(&pipeline.store, &manifest))?;
    }
    on_progress(&label, u64::from(shards), u64::from(shards));
    Ok(())
}

/// One more than the highest attempt of V_t's training already in the store.
fn next_train_attempt(pipeline: &Pipeline, t: u32) -> Result<u32> {
    let prefix = format!("{}/", pipeline.layout.value_dir(t));
    next_after(pipeline, &prefix, |k| k.strip_prefix(&prefix)?.strip_prefix("attempt-")?.split('/').next())
}

/// One more than the highest attempt of `shard` already in the store.
fn next_attempt(pipeline: &Pipeline, t: u32, phase: ShardedPhase, shard: u32) -> Result<u32> {
    let prefix = format!("{}/{phase}/", pipeline.layout.iteration(t));
    let stem = format!("shard-{shard:05}.attempt-");
    next_after(pipeline, &prefix, |k| k.rsplit('/').next()?.strip_prefix(&stem)?.strip_suffix(".jsonl"))
}

/// One more than the highest attempt number `attempt_of` finds among the keys under `prefix` (1 when none).
fn next_after(pipeline: &Pipeline, prefix: &str, attempt_of: impl Fn(&str) -> Option<&str>) -> Result<u32> {
    let keys = pipeline.block_on(pipeline.store.list(prefix))?;
    let highest = keys.iter().filter_map(|k| attempt_of(k)?.parse::<u32>().ok()).max();
    Ok(highest.map_or(1, |a| a + 1))
}

fn task_ref(t: u32, phase: TaskPhase, shard: u32, attempt: u32) -> TaskRef {
    TaskRef {
        task_id: format!("{t}-{phase}-{shard}"),
        attempt,
        iteration: t,
        phase,
        shard,
        rank: 0,
        world: 1,
        endpoints: Vec::new(),
    }
}

/// Runs one task on a scoped thread while this one reports its progress.
fn run_with_progress(
    pipeline: &mut Pipeline,
    task: &TaskRef,
    label: &str,
    on_progress: OnProgress<'_>,
) -> Result<TaskOutput> {
    let control = TaskControl::default();
    std::thread::scope(|s| {
        let handle = s.spawn(|| pipeline.run(task, &control));
        while !handle.is_finished() {
            let (done, total) = control.progress();
            if total > 0 {
                on_progress(label, done, total);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        handle.join().unwrap_or_else(|_| Err(Error::InvalidRequest(format!("task {} panicked", task.task_id))))
    })
}
