//! The records both sides exchange through the object store: rollout and eval rows (JSON Lines, readable by
//! pandas and `datasets`), and the per-phase manifest that says which attempt of each shard was accepted.
//! The next phase reads only through the manifest, verifying each object's sha256, so a late or duplicate
//! attempt a stalled worker left behind is never read.

use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::{RunLayout, ShardedPhase};
use crate::store::{Store, sha256_hex};

/// One candidate response of a rollout (IRO step 1-3). The rollout of iteration t stores every candidate per
/// prompt (1 at t = 1; W·K from guided search after), each with its reward, one JSON line per candidate;
/// `selected` marks the ones value training learns from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub prompt_id: String,
    /// The prompt as the policy saw it (already formatted: TL;DR template or chat template).
    pub prompt: String,
    pub iteration: u32,
    /// What generated it: `sample` (t = 1), `cbs` (guided search), or a baseline's name.
    pub method: String,
    /// The sampling seed of this prompt, so a candidate can be regenerated exactly.
    pub seed: u64,
    /// Index of this candidate among the prompt's candidates, from 0.
    pub candidate: u32,
    pub response: String,
    /// Response token ids in the policy's tokenizer (prompt excluded).
    pub token_ids: Vec<u32>,
    /// The frozen base policy's log-probability of each response token (for the KL estimate).
    pub logprobs: Vec<f32>,
    /// The response ended with EOS (false: cut at max_new_tokens).
    pub finished: bool,
    /// Training reward r(x, y); `None` until scored.
    pub reward: Option<f64>,
    /// The guided-search score Σ V_i / beta_i of the final row, when search produced it.
    #[serde(default)]
    pub value_score: Option<f64>,
    /// How many times the reweight/resample step picked this candidate: 0 or 1 for `argmax`; softmax
    /// sampling draws with replacement, so a candidate can be picked more than once.
    #[serde(default)]
    pub selected: u32,
}

/// One evaluated response. Carries AlpacaEval's fields (`instruction`, `output`, `generator`, `dataset`) so the
/// file is a valid AlpacaEval model-outputs file, plus what our own summary needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// The prompt as people read it: AlpacaEval's instruction, or the TL;DR prompt text.
    pub instruction: String,
    /// The decoded response.
    pub output: String,
    /// Who produced `output`: for example `iro/iter-2` or `best_of_n`.
    pub generator: String,
    /// AlpacaEval's subset name (`helpful_base`, ...), when the prompt came from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub prompt_id: String,
    pub method: String,
    pub iteration: u32,
    /// Evaluation reward-model score; `None` until scored.
    pub reward: Option<f64>,
    /// Tokens the method sampled for this prompt (every candidate of a search or Best-of-N, not only `output`).
    pub tokens: u64,
    /// Tokens of `output`.
    #[serde(default)]
    pub length: u64,
    /// The reference answer (GPT-4's output, the human TL;DR summary), when the data has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The evaluation reward of the reference answer, for the win rate against it; `None` where the reward
    /// itself compares with the reference (embedding similarity), so a win rate against it means nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_reward: Option<f64>,
    /// An upper bound on KL(method ‖ base) in nats for this prompt, where the method has one (selection among
    /// n samples costs at most log n); `None` for methods without a bound (ARGS's greedy decoding).
    #[serde(default)]
    pub kl_bound: Option<f64>,
    /// Wall time the method spent on this prompt (its batch's time shared equally).
    #[serde(default)]
    pub seconds: f64,
    /// How the value functions of this iteration rank held-out candidates of this prompt (on IRO's rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<ValueDiagnostics>,
}

/// How V_t's training went (`iter-{t}/value/attempt-{a}/model/training.json`): a final loss not below the constant
/// predictor's (0.5·Var of the targets) means V_t learned nothing beyond the mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueTraining {
    pub examples: usize,
    pub steps: usize,
    /// The last optimizer step's effective-batch loss.
    pub final_loss: f64,
    pub first_loss: f64,
    pub constant_loss: f64,
    pub mean_target: f64,
    /// A ridge-fitted head (`value.head_fit = "ridge"`): the shrinkage cross-validation chose (a multiple of the
    /// row count) and that choice's held-out-prompt loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ridge_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cv_loss: Option<f64>,
}

/// The value functions against the reward on one prompt's held-out candidates: the N plain samples Best-of-N
/// draws for it (the same seeds at every iteration), each scored by the training reward and by the values,
/// on the complete response and on its first `prefix_tokens` tokens (what CBS's first selection sees).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueDiagnostics {
    pub rewards: Vec<f64>,
    /// V_t alone.
    pub value: Vec<f64>,
    /// The guiding score Σ_{i ≤ t} V_i / β_i.
    pub guide: Vec<f64>,
    pub prefix_tokens: u32,
    pub value_prefix: Vec<f64>,
    pub guide_prefix: Vec<f64>,
}

/// Serialises records as JSON Lines: one object per line, each line ending in `\n`.
pub fn encode_jsonl<T: Serialize>(records: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, record) in records.iter().enumerate() {
        serde_json::to_writer(&mut out, record)
            .map_err(|e| Error::Encode { what: format!("JSON Lines record {}", i + 1), message: e.to_string() })?;
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses JSON Lines; blank lines are skipped. `location` names the file or key in the error, which also gives
/// the 1-based line number.
pub fn decode_jsonl<T: DeserializeOwned>(bytes: &[u8], location: &str) -> Result<Vec<T>> {
    let mut records = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let malformed =
            |message: String| Error::MalformedJson { location: location.to_owned(), line: Some(i + 1), message };
        let line = std::str::from_utf8(line).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(line).map_err(|e| malformed(e.to_string()))?);
    }
    Ok(records)
}

/// Bump when the manifest's meaning changes; readers refuse versions they do not know.
pub const MANIFEST_VERSION: u32 = 1;

/// Which attempt of each shard of one sharded phase (rollout or eval) of one iteration was accepted.
/// Written by the coordinator at `RunLayout::manifest(t, phase)`; the only way the next phase finds its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub run_id: String,
    pub iteration: u32,
    #[serde(with = "phase_serde")]
    pub phase: ShardedPhase,
    /// Shards the phase was cut into; the manifest is complete when each has an accepted attempt.
    pub shard_count: u32,
    /// Accepted shards, sorted by shard index, at most one each.
    pub shards: Vec<ShardEntry>,
}

/// One accepted shard: where its object is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard: u32,
    pub attempt: u32,
    pub key: String,
    pub sha256: String,
    /// JSON lines in the object.
    pub records: u64,
    /// Tokens generated to produce it.
    pub tokens: u64,
    pub bytes: u64,
}

impl Manifest {
    pub fn new(run_id: &str, iteration: u32, phase: ShardedPhase, shard_count: u32) -> Self {
        Self { version: MANIFEST_VERSION, run_id: run_id.to_owned(), iteration, phase, shard_count, shards: Vec::new() }
    }

    /// Records `entry` as the accepted attempt of its shard. Accepting the same entry again is a no-op (a
    /// retried write); a different attempt for an already accepted shard is refused: first accepted wins.
    pub fn accept(&mut self, entry: ShardEntry) -> Result<()> {
        if entry.shard >= self.shard_count {
            return Err(self.invalid(format!("shard {} is out of range 0..{}", entry.shard, self.shard_count)));
        }
        match self.shards.binary_search_by_key(&entry.shard, |e| e.shard) {
            Ok(i) if self.shards[i] == entry => Ok(()),
            Ok(i) => Err(self.invalid(format!(
                "shard {} already has accepted attempt {}; attempt {} refused",
                entry.shard, self.shards[i].attempt, entry.attempt
            ))),
            Err(i) => {
                self.shards.insert(i, entry);
                Ok(())
            }
        }
    }

    pub fn entry(&self, shard: u32) -> Option<&ShardEntry> {
        self.shards.binary_search_by_key(&shard, |e| e.shard).ok().map(|i| &self.shards[i])
    }

    pub fn is_complete(&self) -> bool {
        self.shards.len() == self.shard_count as usize
    }

    /// Shards that have no accepted attempt yet.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.shard_count).filter(|s| self.entry(*s).is_none()).collect()
    }

    // Saturating: the counts come from workers, and a sum must not panic or wrap.
    pub fn total_records(&self) -> u64 {
        self.shards.iter().fold(0u64, |sum, e| sum.saturating_add(e.records))
    }

    pub fn total_tokens(&self) -> u64 {
        self.shards.iter().fold(0u64, |sum, e| sum.saturating_add(e.tokens))
    }

    /// Checks the manifest against itself and the layout: known version, sorted unique in-range shards, and
    /// every key exactly the one `RunLayout` derives for that shard and attempt.
    pub fn validate(&self) -> Result<()> {
        if self.version != MANIFEST_VERSION {
            return Err(self.invalid(format!("version {} (this build reads {MANIFEST_VERSION})", self.version)));
        }
        let layout = RunLayout::new(&self.run_id)?;
        let mut previous: Option<u32> = None;
        for e in &self.shards {
            if e.shard >= self.shard_count {
                return Err(self.invalid(format!("shard {} is out of range 0..{}", e.shard, self.shard_count)));
            }
            if previous.is_some_and(|p| p >= e.shard) {
                return Err(self.invalid(format!("shard {} is listed twice or out of order", e.shard)));
            }
            previous = Some(e.shard);
            let want = layout.shard(self.iteration, self.phase, e.shard, e.attempt);
            if e.key != want {
                return Err(self.invalid(format!(
                    "shard {} attempt {} has key `{}`, expected `{want}`",
                    e.shard, e.attempt, e.key
                )));
            }
            if !is_sha256_hex(&e.sha256) {
                return Err(self.invalid(format!("shard {}: `{}` is not a lower-case hex sha256", e.shard, e.sha256)));
            }
        }
        Ok(())
    }

    /// The manifest's key, or a description when the run id itself is unusable.
    fn key(&self) -> String {
        RunLayout::new(&self.run_id)
            .map(|l| l.manifest(self.iteration, self.phase))
            .unwrap_or_else(|_| format!("manifest of run `{}`", self.run_id))
    }

    fn invalid(&self, message: String) -> Error {
        Error::ManifestInvalid { location: format!("`{}`", self.key()), message }
    }
}

/// Which attempt of which shard a worker is writing: together with the run layout, it names the object key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardAttempt {
    pub iteration: u32,
    pub phase: ShardedPhase,
    pub shard: u32,
    pub attempt: u32,
}

/// Encodes `records` as JSON Lines and writes them at the attempt-specific key of the shard. The returned entry is
/// what a worker reports on completion and what the coordinator records in the manifest if it accepts it.
pub async fn write_shard<T: Serialize>(
    store: &Store,
    layout: &RunLayout,
    at: ShardAttempt,
    records: &[T],
    tokens: u64,
) -> Result<ShardEntry> {
    let key = layout.shard(at.iteration, at.phase, at.shard, at.attempt);
    let bytes = encode_jsonl(records)?;
    let entry = ShardEntry {
        shard: at.shard,
        attempt: at.attempt,
        key: key.clone(),
        sha256: sha256_hex(&bytes),
        records: records.len() as u64,
        tokens,
        bytes: bytes.len() as u64,
    };
    store.put(&key, bytes).await?;
    Ok(entry)
}

/// Writes the manifest at its layout key after validating it.
pub async fn write_manifest(store: &Store, manifest: &Manifest) -> Result<()> {
    manifest.validate().map_err(|e| in_store(e, store, &manifest.key()))?;
    store.put_json(&manifest.key(), manifest).await
}

/// Reads and validates the manifest of `phase` in iteration `iteration`.
pub async fn read_manifest(store: &Store, layout: &RunLayout, iteration: u32, phase: ShardedPhase) -> Result<Manifest> {
    let key = layout.manifest(iteration, phase);
    let manifest: Manifest = store.get_json(&key).await?;
    let invalid = |message: String| Error::ManifestInvalid { location: store.describe(&key), message };
    let claimed = RunLayout::new(&manifest.run_id).map(|l| l.root().to_owned()).unwrap_or_default();
    if claimed != layout.root() || manifest.iteration != iteration || manifest.phase != phase {
        return Err(invalid(format!(
            "describes run `{}` iteration {} {}, not {} iteration {iteration} {phase}",
            manifest.run_id,
            manifest.iteration,
            manifest.phase,
            layout.root()
        )));
    }
    manifest.validate().map_err(|e| in_store(e, store, &key))?;
    Ok(manifest)
}

/// Reads one accepted shard's object and checks its sha256 against the manifest.
pub async fn read_shard_bytes(store: &Store, entry: &ShardEntry) -> Result<bytes::Bytes> {
    store.get_verified(&entry.key, &entry.sha256).await
}

/// Reads and decodes one accepted shard, checking checksum and record count.
pub async fn read_shard<T: DeserializeOwned>(store: &Store, entry: &ShardEntry) -> Result<Vec<T>> {
    let bytes = read_shard_bytes(store, entry).await?;
    let records: Vec<T> = decode_jsonl(&bytes, &store.describe(&entry.key))?;
    if records.len() as u64 != entry.records {
        return Err(Error::ManifestInvalid {
            location: store.describe(&entry.key),
            message: format!("manifest says {} records, object holds {}", entry.records, records.len()),
        });
    }
    Ok(records)
}

/// Every record of a complete phase, in shard order, read only from the accepted attempts. Refuses an incomplete
/// manifest: the next phase must never start on part of its input.
pub async fn read_accepted<T: DeserializeOwned>(store: &Store, manifest: &Manifest) -> Result<Vec<T>> {
    if !manifest.is_complete() {
        return Err(Error::ManifestInvalid {
            location: store.describe(&manifest.key()),
            message: format!("incomplete: shards {:?} have no accepted attempt", manifest.missing()),
        });
    }
    let shards: Vec<Vec<T>> =
        futures::stream::iter(&manifest.shards).map(|e| read_shard::<T>(store, e)).buffered(8).try_collect().await?;
    Ok(shards.into_iter().flatten().collect())
}

/// A lower-case hex sha256, as `sha256_hex` writes it.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Names the store in a validation error about a manifest that is (or is about to be) in it.
pub(crate) fn in_store(e: Error, store: &Store, key: &str) -> Error {
    match e {
        Error::ManifestInvalid { message, .. } => Error::ManifestInvalid { location: store.describe(key), message },
        other => other,
    }
}

/// `ShardedPhase` lives in `layout` without serde; it is written as its path segment (`rollout`, `eval`).
mod phase_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::layout::ShardedPhase;

    pub fn serialize<S: Serializer>(phase: &ShardedPhase, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(phase)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ShardedPhase, D::Error> {
        match String::deserialize(d)?.as_str() {
            "rollout" => Ok(ShardedPhase::Rollout),
            "eval" => Ok(ShardedPhase::Eval),
            other => Err(serde::de::Error::unknown_variant(other, &["rollout", "eval"])),
        }
    }
}
