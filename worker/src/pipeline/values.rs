//! The trained value functions V_1..V_t: where V_t is published in the store (an HF-compatible folder at
//! `iter-{t}/value/model/`), how a worker loads it, and the guiding scorer `Σ_i V_i / beta_i` built from them.

use std::path::{Path, PathBuf};

use iro_common::config::ValueKind;

use super::Pipeline;
use super::scoring::Retokenized;
use crate::error::{Error, Result};
use crate::model::ScalarModel;
use crate::model::heads::{Head, MlpHead};
use crate::search::{CachedValueEnsemble, PolicyHeadEnsemble, PrefixScorer};
use crate::text::Tokenizer;

/// Files of a published value function.
pub(super) const MODEL_FILES: [&str; 3] = ["model.safetensors", "config.json", "tokenizer.json"];

pub(super) struct LoadedValue {
    pub model: ScalarModel,
    /// The value model's own tokenizer, when it differs from the policy's.
    pub tokenizer: Option<Tokenizer>,
}

impl Pipeline {
    /// Store key of a published value function's folder.
    pub(super) fn value_model_key(&self, t: u32) -> String {
        format!("{}/model", self.layout.value_dir(t))
    }

    /// Where V_t trains: inside a local store (so a restarted worker resumes from its checkpoints), else in
    /// the work dir.
    pub(super) fn value_train_dir(&self, t: u32) -> PathBuf {
        let key = format!("{}/train", self.layout.value_dir(t));
        self.store.local_path(&key).unwrap_or_else(|| self.work_dir.join(key))
    }

    /// A local folder holding V_t's published files, downloading them from a remote store on first use.
    pub(super) fn value_model_dir(&self, t: u32) -> Result<PathBuf> {
        let key = self.value_model_key(t);
        if let Some(dir) = self.store.local_path(&key) {
            return Ok(dir);
        }
        let dir = self.work_dir.join(&key);
        if !dir.join("model.safetensors").exists() {
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
            for name in MODEL_FILES {
                let object = format!("{key}/{name}");
                if let Some(bytes) = self.block_on(self.store.get_if_exists(&object))? {
                    let path = dir.join(name);
                    std::fs::write(&path, &bytes).map_err(Error::io(&path))?;
                }
            }
        }
        Ok(dir)
    }

    /// Makes sure V_1..V_upto are loaded.
    pub(super) fn ensure_values(&mut self, upto: u32) -> Result<()> {
        while (self.values.len() as u32) < upto {
            let t = self.values.len() as u32 + 1;
            let dir = self.value_model_dir(t)?;
            if !dir.join("model.safetensors").exists() {
                return Err(Error::Checkpoint {
                    path: dir,
                    message: format!("V_{t} has not been published: iteration {t}'s train task must finish first"),
                });
            }
            let loaded = match self.config.value.kind {
                ValueKind::Model => LoadedValue {
                    model: ScalarModel::load(&dir, self.kind, self.device)?,
                    tokenizer: self.own_tokenizer(&dir)?,
                },
                // The head reads the frozen policy's own hidden states: the backbone is shared, not reloaded.
                ValueKind::Head => LoadedValue {
                    model: ScalarModel {
                        config: self.policy.config.clone(),
                        backbone: self.policy.backbone.clone(),
                        head: Head::Mlp(MlpHead::load(&dir, self.device)?),
                    },
                    tokenizer: None,
                },
            };
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

    /// `Σ_{i ≤ upto} V_i / beta_i`: `head`-kind values read the policy's own hidden states; `model`-kind ones
    /// keep each value model's KV state across CBS chunks. Value models on another
    /// tokenizer than the policy's are fed re-tokenised text (they must then all share that tokenizer).
    pub(super) fn value_scorer(&self, upto: u32) -> Result<Box<dyn PrefixScorer + '_>> {
        let values = &self.values[..upto as usize];
        self.scorer_of(values, super::members(values, &self.config, upto as usize))
    }

    /// V_t alone, unweighted (for diagnostics).
    pub(super) fn single_value_scorer(&self, t: u32) -> Result<Box<dyn PrefixScorer + '_>> {
        let values = &self.values[t as usize - 1..t as usize];
        self.scorer_of(values, vec![(&values[0].model, 1.0)])
    }

    /// The weighted sum of `members` (drawn from `values`), fed the way each kind reads its input.
    fn scorer_of<'a>(
        &'a self,
        values: &'a [LoadedValue],
        members: Vec<(&'a ScalarModel, f64)>,
    ) -> Result<Box<dyn PrefixScorer + 'a>> {
        let headroom = self.config.sampling.max_new_tokens + 1;
        if self.config.value.kind == ValueKind::Head {
            // Heads on the policy's own backbone: a search hands them the decoder's hidden states.
            return Ok(Box::new(PolicyHeadEnsemble::new(&self.policy, members, self.eos.clone())?));
        }
        match values.iter().find_map(|v| v.tokenizer.as_ref()) {
            None => Ok(Box::new(CachedValueEnsemble::new(members, self.eos.clone(), headroom)?)),
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
                let add_special = !crate::text::prompt::has_special_tokens(self.config.policy.prompt_format);
                Ok(Box::new(Retokenized::new(inner, &self.tokenizer, target, add_special)))
            }
        }
    }
}

fn same_tokenizer(bytes: &[u8], policy_dir: &Path) -> bool {
    std::fs::read(policy_dir.join("tokenizer.json")).is_ok_and(|p| p == bytes)
}
