//! The train task (iro.md step 4): fit V_t on the selected candidates of iteration t's accepted rollout shards,
//! then publish it as an HF-compatible folder at `iter-{t}/value/attempt-{a}/model/` (with `files.json`, each
//! file's sha256; `iro_common::values`). Training checkpoints as it goes and a retried task resumes from the
//! newest checkpoint of an earlier attempt, so a killed training ends with the same weights.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iro_common::config::{HeadFit, ValueKind, ValuePrecision, ValueTargets};
use iro_common::layout::ShardedPhase;
use iro_common::records::{RolloutRecord, read_accepted, read_manifest};
use iro_common::store::sha256_hex;
use iro_common::values::write_value_folder;
use tch::Kind;

use super::scoring::Retokenizer;
use super::values::MODEL_FILES;
use super::{Pipeline, gang};
use crate::collective::{Collective, SingleRank};
use crate::error::{Error, Result};
use crate::jobs::generate::pad_token;
use crate::model::config::ModelConfig;
use crate::model::heads::{Head, load_value_head};
use crate::runtime::{TaskControl, TaskOutput, TaskRef};
use crate::text::{Tokenizer, prompt};
use crate::train::checkpoint;
use crate::train::ridge::{Centring, RidgeFit, fit_ridge};
use crate::train::{
    DataParallel, FeatureCache, TrainReport, ValueExample, ValueInit, ValueTrainConfig, constant_predictor_loss,
    mean_target, train_value_ranked,
};
pub use iro_common::records::ValueTraining;

/// Written beside a published V_t: how its training went.
pub const TRAINING_FILE: &str = "training.json";

/// The tokenizer, EOS ids and pad id of a value model whose tokenizer is not the policy's.
struct ValueTokens {
    tokenizer: Tokenizer,
    eos: Vec<i64>,
    pad: i64,
}

impl Pipeline {
    pub(super) fn train(&mut self, t: u32, task: &TaskRef, control: &TaskControl) -> Result<TaskOutput> {
        let start = Instant::now();
        let manifest = self.block_on(read_manifest(&self.store, &self.layout, t, ShardedPhase::Rollout))?;
        let records: Vec<RolloutRecord> = self.block_on(read_accepted(&self.store, &manifest))?;
        let warm = self.config.value.warm_start && t > 1;
        // Training reads its starting point from V_{t-1}'s folder, not from the loaded value functions: they are
        // dropped for the task, so a rank's device holds its training state instead (a 7B V_i is 14 GB in bf16;
        // `iro check-config`'s memory plan counts on this). The next search loads them again.
        self.values.clear();
        let v = &self.config.value;
        let previous = if warm { Some(self.value_model_dir(t - 1)?) } else { None };
        let mut value_tokens = None;
        let init = match v.kind {
            ValueKind::Model => {
                let base = if v.init.as_os_str().is_empty() { self.policy_dir.clone() } else { v.init.clone() };
                let dir = previous.clone().unwrap_or(base);
                value_tokens = self.value_tokens(&dir)?;
                // AdamW's moments and small updates need f32: either the whole training (`f32`) or the master
                // weights beside bf16 ones that run the passes (`bf16`); decoding uses the run dtype.
                let kind = match v.precision {
                    ValuePrecision::F32 => Kind::Float,
                    ValuePrecision::Bf16 => Kind::BFloat16,
                };
                ValueInit::Model { dir, kind, device: self.device }
            }
            ValueKind::Head => ValueInit::Head {
                backbone: self.policy.backbone.clone(),
                hidden: self.policy.config.hidden_size(),
                width: v.head_width as i64,
                from: previous.clone(),
                depth: self.value_depth()?,
            },
        };
        let mut examples = self.value_examples(&records, value_tokens.as_ref())?;
        if self.config.value.targets == ValueTargets::PromptCentred {
            centre_per_prompt(&mut examples);
        }
        // Each V_t gets its own head initialisation stream. Padding uses the value model's own pad id, which
        // its vocabulary holds (the policy's need not).
        let pad = value_tokens.as_ref().map_or(self.pad, |vt| vt.pad);
        let cfg = ValueTrainConfig::new(v, self.config.run.seed ^ u64::from(t), pad);
        let out_dir = self.value_train_dir(t, task.attempt);
        if v.kind == ValueKind::Head && v.head_fit == HeadFit::Ridge {
            let (report, ridge) = self.fit_ridge_value(&examples, previous.as_deref(), &out_dir)?;
            return self.publish_value(t, task, &examples, &report, Some(ridge), None, start);
        }
        self.resume_checkpoint(t, task.attempt, task.rank, &out_dir)?;
        let mut uploaded = checkpoint::latest(&out_dir);
        // One rank trains alone; a gang sums its gradients through the collective its ranks agreed on. Every
        // rank reads the same accepted rollouts and takes its own micro-batches of each effective batch.
        let mut collective: Box<dyn Collective> = if task.world > 1 {
            let listener = self.gang_listener.take().ok_or_else(|| {
                Error::Collective(format!(
                    "rank {} of {}: no endpoint was published before the gang",
                    task.rank, task.world
                ))
            })?;
            let deadline = Duration::from_secs(self.config.cluster.collective_deadline_s);
            gang::collective(task.rank, &task.endpoints, listener, self.device, deadline, control.abort_signal())?
        } else {
            Box::new(SingleRank)
        };
        let sharded = cfg.sharding != iro_common::config::ValueSharding::None && task.world > 1;
        let gang = DataParallel { collective: collective.as_mut(), bucket_bytes: self.config.cluster.bucket_bytes };
        let report = train_value_ranked(&cfg, &examples, &init, &out_dir, true, gang, |p| {
            control.set_progress(p.step as u64, p.total_steps as u64);
            // Rank 0 copies each new checkpoint to a remote store, for a gang restarted elsewhere; in a sharded
            // gang every other rank adds its own shard file.
            let newest = checkpoint::latest(&out_dir);
            let own_shard = checkpoint::shard_file(task.rank as usize, task.world as usize);
            let only = (task.rank != 0).then_some(own_shard.as_str());
            let uploads = task.rank == 0 || sharded;
            if uploads && newest.is_some() && newest != uploaded {
                let dir = newest.as_deref().unwrap_or(&out_dir);
                if let Err(e) = self.upload_checkpoint(t, task.attempt, dir, only) {
                    tracing::warn!(error = %e, "checkpoint upload failed; training goes on");
                }
                uploaded = newest;
            }
            if p.step % 10 == 0 || p.step == p.total_steps {
                tracing::info!(step = p.step, total = p.total_steps, loss = p.loss, lr = p.lr, "value training");
            }
            if control.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })?;
        if report.steps < report.total_steps {
            return Err(Error::Cancelled(format!("value training stopped at step {}", report.steps)));
        }
        self.publish_value(t, task, &examples, &report, None, previous, start)
    }

    /// Rank 0 writes V_t's folder (the checkpoint's model files, the tokenizer of a `model` value, training.json)
    /// to the store; other ranks report only that their share is done.
    #[allow(clippy::too_many_arguments)]
    fn publish_value(
        &self,
        t: u32,
        task: &TaskRef,
        examples: &[ValueExample],
        report: &TrainReport,
        ridge: Option<RidgeFit>,
        previous: Option<PathBuf>,
        start: Instant,
    ) -> Result<TaskOutput> {
        let v = &self.config.value;
        if task.rank != 0 {
            // Rank 0 publishes V_t; the others only report that their share is done.
            let what = format!(
                "rank {} of {}: {} steps, final loss {}",
                task.rank, task.world, report.steps, report.final_loss
            );
            return Ok(TaskOutput {
                key: self.layout.value_files(t, task.attempt),
                sha256: sha256_hex(what.as_bytes()),
                records: report.steps as u64,
                tokens: 0,
            });
        }
        // The tokenizer travels with a `model` value so it can be loaded on its own (and compared with the policy's).
        let tokenizer_from = match v.kind {
            ValueKind::Model if !v.init.as_os_str().is_empty() && previous.is_none() => v.init.clone(),
            ValueKind::Model => previous.unwrap_or_else(|| self.policy_dir.clone()),
            ValueKind::Head => self.policy_dir.clone(),
        };
        let mut files = Vec::new();
        for name in MODEL_FILES {
            let path = if name == "tokenizer.json" { tokenizer_from.join(name) } else { report.checkpoint.join(name) };
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(_) if name == "tokenizer.json" => continue,
                Err(e) => return Err(Error::Io { path, source: e }),
            };
            files.push((name.to_owned(), bytes));
        }
        // What the report sets beside V_t: did it fit better than the best constant?
        let training = ValueTraining {
            examples: examples.len(),
            steps: report.steps,
            final_loss: report.final_loss,
            first_loss: report.losses.first().copied().unwrap_or(f64::NAN),
            constant_loss: constant_predictor_loss(examples),
            mean_target: mean_target(examples),
            ridge_alpha: ridge.as_ref().map(|r| r.alpha),
            cv_loss: ridge.as_ref().map(|r| r.cv_loss),
        };
        let training_json = serde_json::to_vec_pretty(&training)
            .map_err(|e| Error::InvalidRequest(format!("cannot encode {TRAINING_FILE}: {e}")))?;
        files.push((TRAINING_FILE.to_owned(), training_json));
        // This attempt's own folder, `files.json` (every file's sha256) last: what the task reports, and what the
        // value manifest names once the attempt is accepted. A late attempt writes beside it, never over it.
        let (key, sha256) = self.block_on(write_value_folder(&self.store, &self.layout, t, task.attempt, files))?;
        tracing::info!(
            examples = examples.len(), steps = report.steps, final_loss = report.final_loss,
            constant_loss = training.constant_loss,
            seconds = start.elapsed().as_secs_f64(), key = %key, "value function published"
        );
        Ok(TaskOutput { key, sha256, records: report.steps as u64, tokens: 0 })
    }

    /// The decoder layers a `head`-kind value's states pass through (`value.feature_layers`; `None`: all).
    pub(super) fn value_depth(&self) -> Result<Option<usize>> {
        let (want, have) = (self.config.value.feature_layers, self.policy.config.num_layers());
        if want > have {
            return Err(Error::InvalidRequest(format!(
                "value.feature_layers = {want}, but the policy {} has {have} decoder layers",
                self.policy_dir.display()
            )));
        }
        Ok((want > 0 && want < have).then_some(want))
    }

    /// V_t as a ridge-fitted linear head (`value.head_fit = "ridge"`): the frozen policy's states of every example
    /// once, the closed-form fit (`train::ridge`), shrunk towards V_{t-1}'s weight on a warm start, written as the
    /// one checkpoint `checkpoint-00000001` under `out_dir`. Deterministic and seconds long, so a retried attempt
    /// simply fits again; there is nothing to resume.
    fn fit_ridge_value(
        &self,
        examples: &[ValueExample],
        previous: Option<&Path>,
        out_dir: &Path,
    ) -> Result<(TrainReport, RidgeFit)> {
        let v = &self.config.value;
        let prior = match previous {
            None => None,
            Some(dir) => match load_value_head(dir, self.device)? {
                Head::Linear(h) => Some(h.weight),
                Head::Mlp(_) => {
                    return Err(Error::Checkpoint {
                        path: dir.to_owned(),
                        message: "V_{t-1} is an MLP head; a ridge fit warm-starts only from a linear (ridge) head"
                            .into(),
                    });
                }
            },
        };
        let depth = self.value_depth()?;
        let (states, targets, groups) = FeatureCache::pooled(depth, v.pooling).all_rows(
            &self.policy.backbone,
            examples,
            self.pad,
            self.device,
            v.micro_batch_size,
        )?;
        if let (Some(w), Some(dir)) = (&prior, previous)
            && w.size().last() != states.size().last()
        {
            return Err(Error::Checkpoint {
                path: dir.to_owned(),
                message: format!(
                    "V_{{t-1}} reads features of width {:?}, value.pooling = \"{}\" gives {:?}: a warm start needs the \
                     pooling V_{{t-1}} was fitted with",
                    w.size().last(),
                    v.pooling.as_str(),
                    states.size().last()
                ),
            });
        }
        let centring = match v.targets {
            ValueTargets::Reward => Centring::Pooled,
            ValueTargets::PromptCentred => Centring::WithinPrompt,
        };
        let fit = fit_ridge(&states, &targets, &groups, centring, prior.as_ref(), v.ridge_folds)?;
        tracing::info!(
            rows = states.size()[0],
            prompts = groups.iter().max().map_or(0, |g| g + 1),
            alpha = fit.alpha,
            cv_loss = fit.cv_loss,
            train_loss = fit.train_loss,
            folds = fit.folds,
            warm = prior.is_some(),
            "ridge value head fitted"
        );
        let dir = checkpoint::save_linear_head(out_dir, &fit.weight, &fit.bias, depth, v.pooling)?;
        let report = TrainReport {
            steps: 1,
            total_steps: 1,
            final_loss: fit.train_loss,
            losses: vec![fit.train_loss],
            checkpoint: dir,
        };
        Ok((report, fit))
    }

    /// What a `model`-kind value starting from `dir` reads, when its tokenizer is not the policy's.
    fn value_tokens(&self, dir: &Path) -> Result<Option<ValueTokens>> {
        let Some(tokenizer) = self.own_tokenizer(dir)? else { return Ok(None) };
        let config = ModelConfig::load(dir)?;
        // The guiding scorer appends this EOS to finished rows (`value_scorer`: the value model's config.json).
        let eos = config.eos_token_ids.clone();
        if eos.is_empty() {
            return Err(Error::Checkpoint {
                path: dir.join("config.json"),
                message: "no eos_token_id: a value model on its own tokenizer needs one to score finished rows".into(),
            });
        }
        let pad = pad_token(&config, &eos);
        Ok(Some(ValueTokens { tokenizer, eos, pad }))
    }

    /// One example per selection of a candidate (softmax resampling can pick one several times). A value model
    /// on its own tokenizer (`value_tokens`) trains on the ids the guiding scorer will feed it: the policy's
    /// prompt and response re-tokenised by `Retokenizer`, and its own EOS after a response that stopped at EOS
    /// (where the policy's ids carry the policy's EOS).
    fn value_examples(
        &self,
        records: &[RolloutRecord],
        value_tokens: Option<&ValueTokens>,
    ) -> Result<Vec<ValueExample>> {
        let add_special = !prompt::has_special_tokens(self.config.policy.prompt_format);
        let retokenizer =
            value_tokens.map(|vt| Retokenizer { policy: &self.tokenizer, target: &vt.tokenizer, add_special });
        let mut out = Vec::new();
        for r in records.iter().filter(|r| r.selected > 0) {
            let reward = r.reward.ok_or_else(|| {
                Error::InvalidRequest(format!("rollout record {} candidate {} has no reward", r.prompt_id, r.candidate))
            })?;
            let mut prompt = self.tokenizer.encode(&r.prompt, add_special)?;
            let mut response: Vec<i64> = r.token_ids.iter().map(|&x| i64::from(x)).collect();
            if let (Some(retok), Some(vt)) = (&retokenizer, value_tokens) {
                prompt = retok.prompt(&prompt)?;
                response = retok.response(&response)?;
                // As the scorer's `full_sequences`: a finished row gets the first EOS unless it ends in one.
                if r.finished && !response.last().is_some_and(|t| vt.eos.contains(t)) {
                    response.push(vt.eos[0]);
                }
            }
            let example = ValueExample { prompt, response, reward };
            for _ in 1..r.selected {
                out.push(example.clone());
            }
            out.push(example);
        }
        if out.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "iteration rollouts hold {} records and none is selected: nothing to train on",
                records.len()
            )));
        }
        Ok(out)
    }
}

/// Subtracts from each example's reward the mean reward of the examples with the same prompt (each selection
/// counts once, as it trains once): `value.targets = "prompt_centred"`.
pub(super) fn centre_per_prompt(examples: &mut [ValueExample]) {
    let mut sums: std::collections::HashMap<Vec<i64>, (f64, usize)> = std::collections::HashMap::new();
    for e in examples.iter() {
        let entry = sums.entry(e.prompt.clone()).or_default();
        entry.0 += e.reward;
        entry.1 += 1;
    }
    for e in examples.iter_mut() {
        let (sum, n) = sums[&e.prompt];
        e.reward -= sum / n as f64;
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use iro_common::RunConfig;
    use iro_common::config::{DataFormat, PromptFormat, RewardKind};
    use tch::Device;

    use super::*;
    use crate::generate::left_pad;
    use crate::model::ScalarModel;
    use crate::pipeline::scoring::Retokenized;
    use crate::search::{CachedValueEnsemble, PrefixScorer};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// `llama_seqcls` with a tokenizer of its own: the same vocabulary with a third of the BPE merges, so the
    /// same text gets other (more) ids.
    fn value_init_on_another_tokenizer(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for name in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("llama_seqcls").join(name), dir.join(name)).unwrap();
        }
        let text = std::fs::read_to_string(fixture("llama_seqcls/tokenizer.json")).unwrap();
        let mut tokenizer: serde_json::Value = serde_json::from_str(&text).unwrap();
        let merges = tokenizer["model"]["merges"].as_array_mut().unwrap();
        merges.truncate(merges.len() / 3);
        std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tokenizer).unwrap()).unwrap();
    }

    fn record(prompt: &str, token_ids: Vec<u32>, finished: bool) -> RolloutRecord {
        RolloutRecord {
            prompt_id: "p".into(),
            prompt: prompt.into(),
            iteration: 1,
            method: "sample".into(),
            seed: 0,
            candidate: 0,
            response: String::new(),
            token_ids,
            logprobs: Vec::new(),
            finished,
            reward: Some(0.5),
            value_score: None,
            selected: 1,
        }
    }

    #[test]
    fn a_value_model_on_its_own_tokenizer_trains_on_the_ids_the_scorer_feeds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let init = tmp.path().join("init");
        value_init_on_another_tokenizer(&init);
        let mut c = RunConfig::default();
        c.run.device = "cpu".into();
        c.run.store = tmp.path().join("store").display().to_string();
        c.policy.model = fixture("llama_gqa_tied");
        c.data.format = DataFormat::Tldr;
        c.data.train = Path::new(env!("CARGO_MANIFEST_DIR")).join("../common/tests/fixtures/tldr_sample.jsonl");
        c.data.test_prompts = 4;
        c.reward.kind = RewardKind::Model;
        c.reward.model = fixture("llama_seqcls");
        c.value.kind = ValueKind::Model;
        c.value.init = init.clone();
        let p = Pipeline::open(c, None, &tmp.path().join("work")).unwrap();
        let vt = p.value_tokens(&init).unwrap().expect("the init's tokenizer.json differs from the policy's");
        assert_eq!((vt.eos.as_slice(), vt.pad), ([2].as_slice(), 3), "llama_seqcls's own EOS and pad");
        assert!(
            p.value_tokens(&fixture("llama_seqcls")).unwrap().is_none(),
            "the same tokenizer.json: no re-tokenising"
        );

        let prompt =
            "SUBREDDIT: r/tifu\n\nTITLE: The old mill\n\nPOST: The river ran quietly past the old mill.\n\nTL;DR:";
        let add_special = !prompt::has_special_tokens(PromptFormat::Tldr);
        let encode = |text: &str| -> Vec<u32> {
            p.tokenizer.encode(text, false).unwrap().into_iter().map(|t| t as u32).collect()
        };
        let mut stopped = encode(" The miller checked the ropes.");
        stopped.push(p.eos[0] as u32);
        let records = [record(prompt, stopped, true), record(prompt, encode(" A good summary keeps"), false)];
        let examples = p.value_examples(&records, Some(&vt)).unwrap();

        // What the guiding scorer feeds a value model on its own tokenizer (`value_scorer`), recorded.
        let policy_prompt = p.tokenizer.encode(prompt, add_special).unwrap();
        let prompts = vec![policy_prompt.clone(); 2];
        let responses: Vec<Vec<i64>> =
            records.iter().map(|r| r.token_ids.iter().map(|&t| i64::from(t)).collect()).collect();
        let finished: Vec<bool> = records.iter().map(|r| r.finished).collect();
        let mut fed = Vec::new();
        let recorder = |ps: &[Vec<i64>], rs: &[Vec<i64>], _: &[bool]| -> Result<Vec<f64>> {
            fed.extend(ps.iter().cloned().zip(rs.iter().cloned()));
            Ok(vec![0.0; ps.len()])
        };
        Retokenized::new(recorder, &p.tokenizer, &vt.tokenizer, add_special)
            .score(&prompts, &responses, &finished)
            .unwrap();
        assert_ne!(fed[0].0, policy_prompt, "the two tokenizers must encode the prompt differently");
        for (e, (fed_prompt, _)) in examples.iter().zip(&fed) {
            assert_eq!(&e.prompt, fed_prompt);
        }
        // The scorer appends the value model's EOS to the finished row; the cut row stays as it is.
        assert_eq!(examples[0].response, [fed[0].1.as_slice(), &[2]].concat());
        assert_eq!(examples[1].response, fed[1].1);

        // End to end: V's score of each training sequence is what the real guiding scorer gives that row.
        let model = ScalarModel::load(&init, Kind::Float, Device::Cpu).unwrap();
        let inner = CachedValueEnsemble::new(vec![(&model, 1.0)], vt.eos.clone(), 16).unwrap();
        let guided = Retokenized::new(inner, &p.tokenizer, &vt.tokenizer, add_special)
            .score(&prompts, &responses, &finished)
            .unwrap();
        for (e, g) in examples.iter().zip(&guided) {
            let ids = [e.prompt.as_slice(), &e.response].concat();
            let (t, valid) = left_pad(std::slice::from_ref(&ids), ids.len(), 0, Device::Cpu);
            let trained = model.score(&t, &valid).double_value(&[0]);
            assert!((trained - g).abs() < 1e-5, "training sequence scores {trained}, the scorer {g}");
        }
    }

    #[test]
    fn prompt_centred_targets_subtract_each_prompts_mean() {
        let ex = |p: i64, r: f64| ValueExample { prompt: vec![p], response: vec![1], reward: r };
        let mut xs = vec![ex(1, 0.5), ex(2, 0.9), ex(1, 0.7), ex(1, 0.6), ex(2, 0.9)];
        centre_per_prompt(&mut xs);
        let got: Vec<f64> = xs.iter().map(|e| e.reward).collect();
        let want = [-0.1, 0.0, 0.1, 0.0, 0.0];
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12), "{got:?}");
    }
}
