//! The train task (iro.md step 4): fit V_t on the selected candidates of iteration t's accepted rollout shards,
//! then publish it as an HF-compatible folder at `iter-{t}/value/model/`. Training checkpoints as it goes and a
//! retried task resumes from the newest checkpoint, so a killed training ends with the same weights.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use iro_common::config::{ValueKind, ValueTargets};
use iro_common::layout::ShardedPhase;
use iro_common::records::{RolloutRecord, read_accepted, read_manifest};
use iro_common::store::sha256_hex;
use tch::Kind;

use super::values::MODEL_FILES;
use super::{Pipeline, gang};
use crate::collective::{Collective, SingleRank};
use crate::error::{Error, Result};
use crate::runtime::{TaskControl, TaskOutput, TaskRef};
use crate::text::prompt;
use crate::train::checkpoint;
use crate::train::{
    DataParallel, ValueExample, ValueInit, ValueTrainConfig, constant_predictor_loss, mean_target, train_value_ranked,
};
pub use iro_common::records::ValueTraining;

/// Written beside a published V_t: how its training went.
pub const TRAINING_FILE: &str = "training.json";

impl Pipeline {
    pub(super) fn train(&mut self, t: u32, task: &TaskRef, control: &TaskControl) -> Result<TaskOutput> {
        let start = Instant::now();
        let manifest = self.block_on(read_manifest(&self.store, &self.layout, t, ShardedPhase::Rollout))?;
        let records: Vec<RolloutRecord> = self.block_on(read_accepted(&self.store, &manifest))?;
        let mut examples = self.value_examples(&records)?;
        if self.config.value.targets == ValueTargets::PromptCentred {
            centre_per_prompt(&mut examples);
        }
        let warm = self.config.value.warm_start && t > 1;
        if warm {
            self.ensure_values(t - 1)?;
        }
        let v = &self.config.value;
        let previous = if warm { Some(self.value_model_dir(t - 1)?) } else { None };
        let init = match v.kind {
            ValueKind::Model => {
                let base = if v.init.as_os_str().is_empty() { self.policy_dir.clone() } else { v.init.clone() };
                // Training runs in f32 (AdamW moments and small updates need it); decoding uses the run dtype.
                ValueInit::Model { dir: previous.clone().unwrap_or(base), kind: Kind::Float, device: self.device }
            }
            ValueKind::Head => ValueInit::Head {
                backbone: self.policy.backbone.clone(),
                hidden: self.policy.config.hidden_size(),
                width: v.head_width as i64,
                from: previous.clone(),
            },
        };
        // Each V_t gets its own head initialisation stream.
        let cfg = ValueTrainConfig::new(v, self.config.run.seed ^ u64::from(t), self.pad);
        let out_dir = self.value_train_dir(t);
        self.download_latest_checkpoint(t, &out_dir)?;
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
            gang::collective(task.rank, &task.endpoints, listener, self.device, deadline)?
        } else {
            Box::new(SingleRank)
        };
        let gang = DataParallel { collective: collective.as_mut(), bucket_bytes: self.config.cluster.bucket_bytes };
        let report = train_value_ranked(&cfg, &examples, &init, &out_dir, true, gang, |p| {
            control.set_progress(p.step as u64, p.total_steps as u64);
            // Rank 0 copies each new checkpoint to a remote store, for a gang restarted elsewhere.
            let newest = checkpoint::latest(&out_dir);
            if task.rank == 0 && newest.is_some() && newest != uploaded {
                if let Err(e) = self.upload_checkpoint(t, newest.as_deref().unwrap_or(&out_dir)) {
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
        if task.rank != 0 {
            // Rank 0 publishes V_t; the others only report that their share is done.
            let key = format!("{}/model.safetensors", self.value_model_key(t));
            let what = format!(
                "rank {} of {}: {} steps, final loss {}",
                task.rank, task.world, report.steps, report.final_loss
            );
            return Ok(TaskOutput {
                key,
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
        let key = self.value_model_key(t);
        let mut weights_sha = String::new();
        for name in MODEL_FILES {
            let path = if name == "tokenizer.json" { tokenizer_from.join(name) } else { report.checkpoint.join(name) };
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(_) if name == "tokenizer.json" => continue,
                Err(e) => return Err(Error::Io { path, source: e }),
            };
            if name == "model.safetensors" {
                weights_sha = sha256_hex(&bytes);
            }
            self.block_on(self.store.put(&format!("{key}/{name}"), bytes))?;
        }
        // What the report sets beside V_t: did it fit better than the best constant?
        let training = ValueTraining {
            examples: examples.len(),
            steps: report.steps,
            final_loss: report.final_loss,
            first_loss: report.losses.first().copied().unwrap_or(f64::NAN),
            constant_loss: constant_predictor_loss(&examples),
            mean_target: mean_target(&examples),
        };
        self.block_on(self.store.put_json(&format!("{key}/{TRAINING_FILE}"), &training))?;
        tracing::info!(
            examples = examples.len(), steps = report.steps, final_loss = report.final_loss,
            constant_loss = training.constant_loss,
            seconds = start.elapsed().as_secs_f64(), key = %key, "value function published"
        );
        Ok(TaskOutput {
            key: format!("{key}/model.safetensors"),
            sha256: weights_sha,
            records: report.steps as u64,
            tokens: 0,
        })
    }

    /// One example per selection of a candidate (softmax resampling can pick one several times).
    fn value_examples(&self, records: &[RolloutRecord]) -> Result<Vec<ValueExample>> {
        let add_special = !prompt::has_special_tokens(self.config.policy.prompt_format);
        let mut out = Vec::new();
        for r in records.iter().filter(|r| r.selected > 0) {
            let reward = r.reward.ok_or_else(|| {
                Error::InvalidRequest(format!("rollout record {} candidate {} has no reward", r.prompt_id, r.candidate))
            })?;
            let example = ValueExample {
                prompt: self.tokenizer.encode(&r.prompt, add_special)?,
                response: r.token_ids.iter().map(|&x| i64::from(x)).collect(),
                reward,
            };
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
    use super::*;

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
