//! The trained value functions V_1..V_t: where V_t is published in the store (an HF-compatible folder at
//! `iter-{t}/value/attempt-{a}/model/`, found through `iter-{t}/value/manifest.json`), how a published folder of either kind is loaded, and the guiding scorer
//! `Σ_i V_i / beta_i` built from them. The pipeline's rollouts and evaluation and `iro guide` share all three.

use std::io::Read;
use std::path::{Path, PathBuf};

use iro_common::config::{PromptFormat, ValueKind, ValuePooling};
use iro_common::layout::RunLayout;
use iro_common::store::{Store, file_sha256_hex};
use iro_common::values::{read_value_files, read_value_manifest};
use tch::{Device, Kind};

use super::Pipeline;
use super::scoring::Retokenized;
use crate::error::{Error, Result};
use crate::model::heads::{LINEAR_VALUE_HEAD, MlpHead, load_value_head};
use crate::model::{CausalLm, ScalarModel};
use crate::search::{CachedValueEnsemble, PolicyHeadEnsemble, PrefixScorer};
use crate::text::Tokenizer;

/// Files of a published value function.
pub(crate) const MODEL_FILES: [&str; 3] = ["model.safetensors", "config.json", "tokenizer.json"];

/// A value function ready to guide a policy.
pub(crate) struct LoadedValue {
    pub model: ScalarModel,
    pub kind: ValueKind,
    /// The value model's own tokenizer, when it differs from the policy's.
    pub tokenizer: Option<Tokenizer>,
}

/// A local folder holding V_t's accepted files, every one checked against the sha256 its value manifest lists:
/// the store's own folder when it is local, else a copy under `work_dir` (keyed by the attempt, so two attempts'
/// files never mix), downloaded on first use. Errors when V_t has not been published, and names the file when
/// one does not hash as listed (overwritten, or cut short).
pub(crate) async fn published_value_dir(store: &Store, layout: &RunLayout, t: u32, work_dir: &Path) -> Result<PathBuf> {
    let Some(manifest) = read_value_manifest(store, layout, t).await? else {
        return Err(Error::Checkpoint {
            path: PathBuf::from(layout.value_manifest(t)),
            message: format!(
                "V_{t} has not been published ({} does not exist): iteration {t}'s train task must finish first",
                store.describe(&layout.value_manifest(t))
            ),
        });
    };
    let listed = read_value_files(store, &manifest).await?;
    let key = manifest.model_key();
    let local = store.local_path(&key);
    let dir = local.clone().unwrap_or_else(|| work_dir.join(&key));
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    for file in &listed.files {
        let path = dir.join(&file.name);
        let sha = |path: &Path| file_sha256_hex(path).map_err(Error::io(path));
        if local.is_none() && !(path.exists() && sha(&path)? == file.sha256) {
            let object = format!("{key}/{}", file.name);
            let bytes = store.get(&object).await?;
            // Written aside and renamed: a download cut short never sits under the real name.
            let part = dir.join(format!(".{}.part", file.name));
            std::fs::write(&part, &bytes).map_err(Error::io(&part))?;
            std::fs::rename(&part, &path).map_err(Error::io(&path))?;
        }
        let actual = sha(&path)?;
        if actual != file.sha256 {
            return Err(Error::Checkpoint {
                path,
                message: format!(
                    "sha256 {actual}, but V_{t}'s accepted attempt {} lists {} ({}): the file was overwritten or \
                     is incomplete",
                    manifest.attempt,
                    file.sha256,
                    store.describe(&manifest.key)
                ),
            });
        }
    }
    Ok(dir)
}

/// The kind of value function in `dir`: `head` when its model.safetensors holds `value_head.dense.weight` (an MLP)
/// or `value_head.linear.weight` (a ridge fit) on the policy's own backbone, else `model` (a
/// `*ForSequenceClassification` folder). Reads only the header.
pub(crate) fn value_kind(dir: &Path) -> Result<ValueKind> {
    let file = dir.join("model.safetensors");
    if !file.exists() {
        if dir.join("model.safetensors.index.json").exists() {
            // Sharded: a full model; heads are always one small file.
            return Ok(ValueKind::Model);
        }
        let message = if dir.is_dir() {
            "no model.safetensors: a value folder holds model.safetensors and config.json".to_owned()
        } else {
            "no such folder".to_owned()
        };
        return Err(Error::Checkpoint { path: dir.to_owned(), message });
    }
    let names = safetensors_names(&file)?;
    let head = names.iter().any(|n| n == MlpHead::NAMES[0] || n == LINEAR_VALUE_HEAD[0]);
    Ok(if head { ValueKind::Head } else { ValueKind::Model })
}

/// The tensor names in a safetensors file's header (8-byte little-endian length, then a JSON object).
fn safetensors_names(file: &Path) -> Result<Vec<String>> {
    let bad = |message: String| Error::Checkpoint { path: file.to_owned(), message };
    let mut f = std::fs::File::open(file).map_err(Error::io(file))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let len = u64::from_le_bytes(len);
    // Real headers are a few MB at most; a larger length means the file is something else.
    if len > 100 << 20 {
        return Err(bad(format!("not a safetensors file: header length {len}")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("truncated safetensors header: {e}")))?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("malformed safetensors header: {e}")))?;
    Ok(map.into_iter().map(|(k, _)| k).filter(|k| k != "__metadata__").collect())
}

/// Loads the value function in `dir` to guide `policy` (loaded from `policy_dir`). A `head` reads the policy's
/// own hidden states, so it shares the policy's backbone instead of loading one; a `model` brings its own, and
/// its tokenizer when that differs from the policy's.
pub(crate) fn load_value(
    dir: &Path,
    kind: ValueKind,
    policy: &CausalLm,
    policy_dir: &Path,
    dtype: Kind,
    device: Device,
) -> Result<LoadedValue> {
    Ok(match kind {
        ValueKind::Model => {
            let model = ScalarModel::load(dir, dtype, device)?;
            let tokenizer = match std::fs::read(dir.join("tokenizer.json")) {
                Ok(bytes) if !same_tokenizer(&bytes, policy_dir) => Some(Tokenizer::load(dir)?),
                _ => None,
            };
            LoadedValue { model, kind, tokenizer }
        }
        ValueKind::Head => {
            let head = load_value_head(dir, device)?;
            let (config_path, config) = head_config(dir)?;
            let pooling = head_pooling(&config_path, &config)?;
            let (width, policy_width) = (head.input_width(), policy.config.hidden_size() * pooling.blocks());
            if width != policy_width {
                return Err(Error::Checkpoint {
                    path: dir.to_owned(),
                    message: format!(
                        "a head-kind value reads features of width {width}, but the policy {} gives {policy_width} \
                         ({} pooling): it was trained on another policy",
                        policy_dir.display(),
                        pooling.as_str()
                    ),
                });
            }
            let depth = head_depth(&config_path, &config, policy.config.num_layers())?;
            let model =
                ScalarModel { config: policy.config.clone(), backbone: policy.backbone.clone(), head, depth, pooling };
            LoadedValue { model, kind, tokenizer: None }
        }
    })
}

/// A `head`-kind value's `config.json` in `dir` (`Null` when absent: heads saved before it carried keys), read once
/// for `head_pooling` and `head_depth`.
fn head_config(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("config.json");
    let Ok(bytes) = std::fs::read(&path) else { return Ok((path, serde_json::Value::Null)) };
    let config = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Checkpoint { path: path.clone(), message: format!("malformed config.json: {e}") })?;
    Ok((path, config))
}

/// How the head pools the states it reads (`pooling`; absent: `last`, as every head saved before the key existed).
fn head_pooling(path: &Path, config: &serde_json::Value) -> Result<ValuePooling> {
    match config.get(crate::train::checkpoint::POOLING) {
        None => Ok(ValuePooling::Last),
        Some(v) => v.as_str().and_then(ValuePooling::parse).ok_or_else(|| Error::Checkpoint {
            path: path.to_owned(),
            message: format!("`pooling` must be \"last\", \"mean\" or \"last_mean\", got {v}"),
        }),
    }
}

/// The decoder layers the head reads the states after (`feature_layers`; absent or 0: all of them, as every head
/// saved before the key existed), checked against the policy's `layers`.
fn head_depth(path: &Path, config: &serde_json::Value, layers: usize) -> Result<Option<usize>> {
    let want = match config.get(crate::train::checkpoint::FEATURE_LAYERS) {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| Error::Checkpoint {
            path: path.to_owned(),
            message: format!("`feature_layers` must be a whole number, got {v}"),
        })? as usize,
    };
    if want > layers {
        return Err(Error::Checkpoint {
            path: path.to_owned(),
            message: format!("the head reads the states after {want} layers, but the policy has {layers}"),
        });
    }
    Ok((want > 0 && want < layers).then_some(want))
}

/// `Σ_i V_i / betas[i]` over `values`, guiding `policy`: `head`-kind values read the policy's own hidden states;
/// `model`-kind ones keep each value model's KV state across CBS chunks (`max_new_tokens` sizes it). Value models
/// on another tokenizer than the policy's are fed re-tokenised text (they must then all share that tokenizer);
/// `prompt_format` says whether prompts already carry their special tokens.
pub(crate) fn guiding_scorer<'a>(
    policy: &'a CausalLm,
    policy_tokenizer: &'a Tokenizer,
    values: &'a [LoadedValue],
    betas: &[f64],
    eos: &[i64],
    max_new_tokens: usize,
    prompt_format: PromptFormat,
) -> Result<Box<dyn PrefixScorer + 'a>> {
    if values.len() != betas.len() {
        return Err(Error::InvalidRequest(format!("{} value functions, {} betas", values.len(), betas.len())));
    }
    let members: Vec<(&ScalarModel, f64)> = values.iter().zip(betas).map(|(v, &b)| (&v.model, b)).collect();
    let heads = values.iter().filter(|v| v.kind == ValueKind::Head).count();
    if heads == values.len() {
        // Heads on the policy's own backbone: a search hands them the decoder's hidden states.
        return Ok(Box::new(PolicyHeadEnsemble::new(policy, members, eos.to_vec())?));
    }
    if heads > 0 {
        return Err(Error::InvalidRequest(format!(
            "{heads} of {} value functions are head-kind and the others model-kind: one ensemble guides with one kind",
            values.len()
        )));
    }
    let headroom = max_new_tokens + 1;
    match values.iter().find_map(|v| v.tokenizer.as_ref()) {
        None => Ok(Box::new(CachedValueEnsemble::new(members, eos.to_vec(), headroom)?)),
        Some(target) => {
            if values.iter().any(|v| v.tokenizer.is_none()) {
                return Err(Error::InvalidRequest(
                    "value functions on different tokenizers cannot be mixed in one ensemble".into(),
                ));
            }
            let eos = values[0].model.config.eos_token_ids.clone();
            // Re-tokenised responses can be longer than the policy's; the cache re-encodes if they overflow.
            let inner = CachedValueEnsemble::new(members, eos, 2 * headroom)?;
            // Same rule as for the policy: a chat-templated prompt already carries its special tokens.
            let add_special = !crate::text::prompt::has_special_tokens(prompt_format);
            Ok(Box::new(Retokenized::new(inner, policy_tokenizer, target, add_special)))
        }
    }
}

fn same_tokenizer(bytes: &[u8], policy_dir: &Path) -> bool {
    std::fs::read(policy_dir.join("tokenizer.json")).is_ok_and(|p| p == bytes)
}

impl Pipeline {
    /// Where attempt `attempt` of V_t trains: inside a local store (so a restarted worker resumes from its
    /// checkpoints), else in the work dir.
    pub(super) fn value_train_dir(&self, t: u32, attempt: u32) -> PathBuf {
        let key = self.layout.value_checkpoints(t, attempt);
        self.store.local_path(&key).unwrap_or_else(|| self.work_dir.join(key))
    }

    /// A local folder holding V_t's published files, downloading them from a remote store on first use.
    pub(super) fn value_model_dir(&self, t: u32) -> Result<PathBuf> {
        self.block_on(published_value_dir(&self.store, &self.layout, t, &self.work_dir))
    }

    /// Makes sure V_1..V_upto are loaded.
    pub(super) fn ensure_values(&mut self, upto: u32) -> Result<()> {
        while (self.values.len() as u32) < upto {
            let t = self.values.len() as u32 + 1;
            let dir = self.value_model_dir(t)?;
            let loaded =
                load_value(&dir, self.config.value.kind, &self.policy, &self.policy_dir, self.kind, self.device)?;
            tracing::info!(value = t, dir = %dir.display(), retokenize = loaded.tokenizer.is_some(), "value function loaded");
            self.values.push(loaded);
        }
        Ok(())
    }

    /// The tokenizer of the `model`-kind value function in `dir` when it is not the policy's (its tokenizer.json
    /// differs); `None` when it is the policy's, or when the folder has none (the policy's is then used).
    pub(super) fn own_tokenizer(&self, dir: &Path) -> Result<Option<Tokenizer>> {
        match std::fs::read(dir.join("tokenizer.json")) {
            Ok(bytes) if !same_tokenizer(&bytes, &self.policy_dir) => Ok(Some(Tokenizer::load(dir)?)),
            _ => Ok(None),
        }
    }

    /// `Σ_{i ≤ upto} V_i / beta_i` (see `guiding_scorer`).
    pub(super) fn value_scorer(&self, upto: u32) -> Result<Box<dyn PrefixScorer + '_>> {
        let betas: Vec<f64> = (1..=upto as usize).map(|i| self.config.beta(i)).collect();
        guiding_scorer(
            &self.policy,
            &self.tokenizer,
            &self.values[..upto as usize],
            &betas,
            &self.eos,
            self.config.sampling.max_new_tokens,
            self.config.policy.prompt_format,
        )
    }

    /// V_t alone, unweighted (for the report's diagnostics).
    pub(super) fn single_value_scorer(&self, t: u32) -> Result<Box<dyn PrefixScorer + '_>> {
        guiding_scorer(
            &self.policy,
            &self.tokenizer,
            &self.values[t as usize - 1..t as usize],
            &[1.0],
            &self.eos,
            self.config.sampling.max_new_tokens,
            self.config.policy.prompt_format,
        )
    }
}
