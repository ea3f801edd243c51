//! The object-store layout: the one place that turns a run id into keys. Every phase derives the
//! keys it reads and writes from here, so no two scripts can disagree on a directory name.
//!
//! ```text
//! runs/{run_id}/config.toml
//! runs/{run_id}/iter-{t}/rollout/shard-{s:05}.attempt-{a}.jsonl
//! runs/{run_id}/iter-{t}/rollout/manifest.json
//! runs/{run_id}/iter-{t}/value/attempt-{a}/model/...      V_t as attempt a of the train task published it
//! runs/{run_id}/iter-{t}/value/attempt-{a}/train/...      that attempt's training checkpoints
//! runs/{run_id}/iter-{t}/value/manifest.json              which attempt was accepted, and its files' sha256
//! runs/{run_id}/iter-{t}/eval/shard-{s:05}.attempt-{a}.jsonl, summary.json
//! runs/{run_id}/report/...
//! ```

use std::fmt;

use crate::error::{Error, Result};

/// A phase whose output is sharded by prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShardedPhase {
    Rollout,
    Eval,
}

impl fmt::Display for ShardedPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardedPhase::Rollout => "rollout",
            ShardedPhase::Eval => "eval",
        })
    }
}

/// Ids become path segments: only `[A-Za-z0-9._-]`, not starting with a dot, at most 128 bytes.
pub fn check_id(what: &'static str, value: &str) -> Result<()> {
    let invalid = |message: &str| Err(Error::InvalidId { what, value: value.to_owned(), message: message.to_owned() });
    if value.is_empty() || value.len() > 128 {
        return invalid("must be 1 to 128 characters");
    }
    if value.starts_with('.') {
        return invalid("must not start with '.'");
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return invalid("may only contain letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Key builder for one run. Cheap to clone; holds only the validated prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    root: String,
}

impl RunLayout {
    pub fn new(run_id: &str) -> Result<Self> {
        check_id("run id", run_id)?;
        Ok(Self { root: format!("runs/{run_id}") })
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn config(&self) -> String {
        format!("{}/config.toml", self.root)
    }

    pub fn iteration(&self, t: u32) -> String {
        format!("{}/iter-{t}", self.root)
    }

    pub fn shard(&self, t: u32, phase: ShardedPhase, shard: u32, attempt: u32) -> String {
        format!("{}/{phase}/shard-{shard:05}.attempt-{attempt}.jsonl", self.iteration(t))
    }

    pub fn manifest(&self, t: u32, phase: ShardedPhase) -> String {
        format!("{}/{phase}/manifest.json", self.iteration(t))
    }

    pub fn value_dir(&self, t: u32) -> String {
        format!("{}/value", self.iteration(t))
    }

    /// Everything one attempt of V_t's train task writes: attempts never share a key, so a late attempt
    /// cannot overwrite the accepted one's model or checkpoints.
    pub fn value_attempt(&self, t: u32, attempt: u32) -> String {
        format!("{}/attempt-{attempt}", self.value_dir(t))
    }

    /// The HF folder attempt `attempt` published V_t as.
    pub fn value_model(&self, t: u32, attempt: u32) -> String {
        format!("{}/model", self.value_attempt(t, attempt))
    }

    /// The list of that folder's files with their sha256, written last: what the train task reports.
    pub fn value_files(&self, t: u32, attempt: u32) -> String {
        format!("{}/files.json", self.value_model(t, attempt))
    }

    /// That attempt's training checkpoints.
    pub fn value_checkpoints(&self, t: u32, attempt: u32) -> String {
        format!("{}/train", self.value_attempt(t, attempt))
    }

    /// Which attempt of V_t was accepted; the only way a loader finds V_t.
    pub fn value_manifest(&self, t: u32) -> String {
        format!("{}/manifest.json", self.value_dir(t))
    }

    pub fn eval_summary(&self, t: u32) -> String {
        format!("{}/eval/summary.json", self.iteration(t))
    }

    pub fn report_dir(&self) -> String {
        format!("{}/report", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = RunLayout::new("demo-1").unwrap();
        assert_eq!(l.config(), "runs/demo-1/config.toml");
        assert_eq!(l.shard(2, ShardedPhase::Rollout, 7, 1), "runs/demo-1/iter-2/rollout/shard-00007.attempt-1.jsonl");
        assert_eq!(l.manifest(1, ShardedPhase::Eval), "runs/demo-1/iter-1/eval/manifest.json");
        assert_eq!(l.value_dir(3), "runs/demo-1/iter-3/value");
        assert_eq!(l.value_model(3, 2), "runs/demo-1/iter-3/value/attempt-2/model");
        assert_eq!(l.value_files(3, 2), "runs/demo-1/iter-3/value/attempt-2/model/files.json");
        assert_eq!(l.value_checkpoints(3, 2), "runs/demo-1/iter-3/value/attempt-2/train");
        assert_eq!(l.value_manifest(3), "runs/demo-1/iter-3/value/manifest.json");
        assert_eq!(l.eval_summary(3), "runs/demo-1/iter-3/eval/summary.json");
        assert_eq!(l.report_dir(), "runs/demo-1/report");
    }

    #[test]
    fn unsafe_run_ids_are_refused() {
        for id in ["", "..", "../etc", "a/b", ".hidden", "sp ace", &"x".repeat(129)] {
            let err = RunLayout::new(id).unwrap_err();
            assert_eq!(err.kind(), "invalid_id", "{id:?}");
        }
    }
}
