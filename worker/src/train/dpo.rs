//! The DPO objective (Rafailov et al. 2023), the baseline that changes the policy's weights (issue 15): for a
//! preference pair (prompt x, chosen y_w, rejected y_l), the policy π and the frozen reference π_ref,
//!
//!   loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]),
//!
//! averaged over the pairs, each log π the sum over the completion's tokens (TRL's `loss_type = "sigmoid"`, no
//! label smoothing). `tests/dpo.rs` checks loss and gradients against TRL's `DPOTrainer` on a fixture. `train_dpo` is
//! the single-rank trainer; the data-parallel gang and the pipeline's `dpo` baseline are still to come.

use std::ops::ControlFlow;
use std::path::Path;

use tch::{Kind, Tensor};

use super::checkpoint::{self, TrainState};
use super::optim::{AdamW, AdamWConfig, cosine_lr, zero_grads};
use super::{DataParallel, epoch_order, gang_loss};
use crate::collective::{DEFAULT_BUCKET_BYTES, SingleRank, all_reduce_bucketed};
use crate::error::{Error, Result};
use crate::model::{CausalLm, Checkpoint, positions_from_valid};

/// Per row of `ids` [B, T] (right-padded; `valid` [B, T] marks real tokens), Σ log π(token | the tokens before it)
/// over the positions `completion` [B, T] marks: the completion's log-probability under `lm`.
pub fn completion_logps(lm: &CausalLm, ids: &Tensor, valid: &Tensor, completion: &Tensor) -> Tensor {
    let t = ids.size()[1];
    let logits = lm.forward(ids, valid, &positions_from_valid(valid), None);
    // Position i predicts token i + 1.
    let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let next = ids.narrow(1, 1, t - 1).unsqueeze(-1);
    let token = logp.gather(2, &next, false).squeeze_dim(-1);
    let mask = completion.narrow(1, 1, t - 1).to_kind(Kind::Float);
    (token * mask).sum_dim_intlist(1, false, Kind::Float)
}

/// The sigmoid DPO loss, averaged over pairs, from the four [P] completion log-probabilities.
pub fn dpo_sigmoid_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Tensor {
    let margin = (chosen - ref_chosen) - (rejected - ref_rejected);
    -(margin * beta).log_sigmoid().mean(Kind::Float)
}

/// One preference pair in token ids: the completions follow the prompt directly.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DpoConfig {
    /// The DPO temperature β (the paper's TL;DR runs: 0.05).
    pub beta: f64,
    pub lr: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    /// Pairs per optimizer step; micro-batches of `micro_batch_size` pairs accumulate up to it.
    pub batch_size: usize,
    pub micro_batch_size: usize,
    /// A resumable checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    pub seed: u64,
    pub pad_id: i64,
    /// Where the policy and its reference run (f32 weights).
    pub device: tch::Device,
}

/// What a DPO training did: the same shape as value training's report.
pub type DpoReport = super::TrainReport;

/// Right-padded rows prompt ⊕ completion for `pairs`: the chosen rows, then the rejected ones (TRL's layout), with
/// masks of the real tokens and of the completion tokens.
pub fn pair_batch(pairs: &[&PreferencePair], pad_id: i64, device: tch::Device) -> (Tensor, Tensor, Tensor) {
    let rows: Vec<(&[i64], &[i64])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(pairs.iter().map(|p| (p.prompt.as_slice(), p.rejected.as_slice())))
        .collect();
    let width = rows.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
    let (mut ids, mut valid, mut completion) = (Vec::new(), Vec::new(), Vec::new());
    for (prompt, answer) in &rows {
        let len = prompt.len() + answer.len();
        ids.extend(prompt.iter().chain(answer.iter()).copied().chain(std::iter::repeat_n(pad_id, width - len)));
        valid.extend((0..width).map(|i| i < len));
        completion.extend((0..width).map(|i| i >= prompt.len() && i < len));
    }
    let shape = [rows.len() as i64, width as i64];
    let t = |v: Tensor| v.view(shape).to_device(device);
    (t(Tensor::from_slice(&ids)), t(Tensor::from_slice(&valid)), t(Tensor::from_slice(&completion)))
}

/// DPO on `pairs`, the policy starting from the causal LM in `policy_dir` and the reference being that same frozen
/// model (its completion log-probabilities computed once, before the first step). AdamW with a cosine schedule,
/// gradient accumulation, a checkpoint every `checkpoint_every` steps under `out_dir` (the weights as an HF
/// causal-LM folder: the policy's own `config.json` and tokenizer files beside them, plus the AdamW moments); with
/// `resume`, training continues from the newest complete checkpoint there and ends with the weights an
/// uninterrupted run ends with. The last checkpoint is the trained policy.
pub fn train_dpo(
    config: &DpoConfig,
    pairs: &[PreferencePair],
    policy_dir: &Path,
    out_dir: &Path,
    resume: bool,
    progress: impl FnMut(usize, usize, f64) -> ControlFlow<()>,
) -> Result<DpoReport> {
    let mut single = SingleRank;
    let gang = DataParallel { collective: &mut single, bucket_bytes: DEFAULT_BUCKET_BYTES };
    train_dpo_ranked(config, pairs, policy_dir, out_dir, resume, gang, progress)
}

/// [`train_dpo`] as one rank of a data-parallel gang: every rank loads the same policy and pairs, takes every
/// `world`-th micro-batch of each step, and the gradients are summed across the gang (bucketed all-reduce) before
/// each rank's identical AdamW step, so R ranks end with one rank's weights. Rank 0 writes the checkpoints.
pub fn train_dpo_ranked(
    config: &DpoConfig,
    pairs: &[PreferencePair],
    policy_dir: &Path,
    out_dir: &Path,
    resume: bool,
    gang: DataParallel<'_>,
    mut progress: impl FnMut(usize, usize, f64) -> ControlFlow<()>,
) -> Result<DpoReport> {
    let DataParallel { collective, bucket_bytes } = gang;
    let (rank, world) = (collective.rank(), collective.world());
    let (n, batch) = (pairs.len(), config.batch_size.max(1));
    if n == 0 || config.micro_batch_size == 0 || config.epochs == 0 {
        return Err(Error::InvalidRequest(format!(
            "DPO needs pairs, epochs and a micro-batch ≥ 1 ({n} pairs, {} epochs, micro-batch {})",
            config.epochs, config.micro_batch_size
        )));
    }
    if let Some(i) = pairs.iter().position(|p| p.prompt.is_empty() || p.chosen.is_empty() || p.rejected.is_empty()) {
        return Err(Error::InvalidRequest(format!("preference pair {i} has an empty prompt or completion")));
    }
    let device = config.device;
    let steps_per_epoch = n.div_ceil(batch);
    let total_steps = steps_per_epoch * config.epochs;
    let micro = config.micro_batch_size;

    // The reference's log-probabilities, once.
    let reference = CausalLm::load(policy_dir, Kind::Float, device)?;
    let mut ref_logps = Vec::with_capacity(n);
    for part in pairs.chunks(micro) {
        let refs: Vec<&PreferencePair> = part.iter().collect();
        let (ids, valid, completion) = pair_batch(&refs, config.pad_id, device);
        let logps = tch::no_grad(|| completion_logps(&reference, &ids, &valid, &completion));
        let k = refs.len() as i64;
        for i in 0..k {
            ref_logps.push((logps.double_value(&[i]), logps.double_value(&[k + i])));
        }
    }
    drop(reference);

    let ck = Checkpoint::load_trainable(policy_dir, Kind::Float, device)?;
    let mut named: Vec<(String, Tensor)> = ck
        .weights
        .tensors()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(n, t)| (n.to_owned(), t.shallow_clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in &named {
        let _ = t.set_requires_grad(true);
    }
    let policy = CausalLm::from_checkpoint(&ck)?;
    let params: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let adam = AdamWConfig { eps: config.adam_eps, weight_decay: config.weight_decay, ..AdamWConfig::default() };
    let mut opt = AdamW::new(adam, &params);

    let resume_from = if resume { checkpoint::latest(out_dir) } else { None };
    let mut state = match &resume_from {
        Some(dir) => {
            let state = checkpoint::load_moments(dir, &named, &mut opt)?;
            if state.kind != "dpo"
                || state.examples != n
                || state.batch_size != batch
                || state.total_steps != total_steps
            {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    message: format!(
                        "train state is {} for {} pairs, batch {}, {} steps; this DPO run has {n}, {batch}, {total_steps}",
                        state.kind, state.examples, state.batch_size, state.total_steps
                    ),
                });
            }
            let saved = Tensor::read_safetensors(dir.join("model.safetensors")).map_err(|e| Error::Checkpoint {
                path: dir.join("model.safetensors"),
                message: format!("cannot read safetensors: {e}"),
            })?;
            tch::no_grad(|| -> Result<()> {
                for (name, p) in &named {
                    let (_, w) = saved.iter().find(|(n, _)| n == name).ok_or_else(|| Error::MissingTensor {
                        path: dir.clone(),
                        name: name.clone(),
                        files: "model.safetensors".into(),
                    })?;
                    p.shallow_clone().copy_(w);
                }
                Ok(())
            })?;
            state
        }
        None => TrainState {
            step: 0,
            epoch: 0,
            position: 0,
            seed: config.seed,
            examples: n,
            batch_size: batch,
            steps_per_epoch,
            total_steps,
            lr: config.lr,
            kind: "dpo".into(),
            losses: Vec::new(),
            sharding: Default::default(),
            world: 1,
            buckets: Vec::new(),
        },
    };
    let mut last = resume_from.unwrap_or_default();
    let mut order = (usize::MAX, Vec::new());
    while state.step < total_steps {
        let (epoch, start) = (state.step / steps_per_epoch, (state.step % steps_per_epoch) * batch);
        if order.0 != epoch {
            order = (epoch, epoch_order(n, config.seed, epoch));
        }
        let picked: Vec<usize> = order.1[start..(start + batch).min(n)].to_vec();
        zero_grads(&params);
        let mut step_loss = 0.0;
        let micros: Vec<&[usize]> = picked.chunks(micro).collect();
        let mut mine: Vec<(&[usize], f64)> = micros.iter().skip(rank).step_by(world).map(|m| (*m, 1.0)).collect();
        if mine.is_empty() && world > 1 && params.iter().any(|p| !p.grad().defined()) {
            // No micro-batch for this rank in a short batch, and no gradient yet: a zero-weighted pass defines its
            // gradients where the other ranks' are, so the all-reduce buckets line up, and adds nothing.
            mine.push((micros[0], 0.0));
        }
        for (part, weight) in mine {
            let refs: Vec<&PreferencePair> = part.iter().map(|&i| &pairs[i]).collect();
            let (ids, valid, completion) = pair_batch(&refs, config.pad_id, device);
            let logps = completion_logps(&policy, &ids, &valid, &completion);
            let k = refs.len() as i64;
            let (rc, rr): (Vec<f64>, Vec<f64>) = part.iter().map(|&i| ref_logps[i]).unzip();
            let as_tensor = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).to_device(device);
            // The step's loss is the mean over its pairs: each micro-batch adds its pairs' share.
            let loss = dpo_sigmoid_loss(
                &logps.narrow(0, 0, k),
                &logps.narrow(0, k, k),
                &as_tensor(&rc),
                &as_tensor(&rr),
                config.beta,
            ) * (weight * k as f64 / picked.len() as f64);
            loss.backward();
            step_loss += loss.double_value(&[]);
        }
        if world > 1 {
            let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
            all_reduce_bucketed(collective, &grads, bucket_bytes)?;
            step_loss = gang_loss(collective, step_loss)?;
        }
        let lr = cosine_lr(config.lr, state.step, total_steps);
        opt.step(&params, lr);
        state.step += 1;
        state.epoch = state.step / steps_per_epoch;
        state.position = (state.step % steps_per_epoch) * batch;
        state.losses.push(step_loss);
        let due = config.checkpoint_every > 0 && state.step % config.checkpoint_every == 0;
        if (due || state.step == total_steps) && rank == 0 {
            last = save_policy(out_dir, policy_dir, &named, &opt, &state)?;
        }
        if progress(state.step, total_steps, step_loss).is_break() {
            break;
        }
    }
    Ok(DpoReport {
        steps: state.step,
        total_steps,
        final_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        losses: state.losses,
        checkpoint: last,
    })
}

/// `checkpoint-<step>`: the policy's weights under their checkpoint names, its `config.json` and tokenizer files
/// (an HF causal-LM folder), the AdamW moments and the train state; atomically, older checkpoints removed.
fn save_policy(
    out_dir: &Path,
    policy_dir: &Path,
    named: &[(String, Tensor)],
    opt: &AdamW,
    state: &TrainState,
) -> Result<std::path::PathBuf> {
    let tmp = checkpoint::fresh_tmp(out_dir, state.step)?;
    let weights: Vec<(String, Tensor)> = named.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    checkpoint::write_tensors(&tmp.join("model.safetensors"), &weights)?;
    for name in
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        let from = policy_dir.join(name);
        if from.exists() {
            std::fs::copy(&from, tmp.join(name)).map_err(checkpoint::io(&from))?;
        }
    }
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    checkpoint::save_moments(&tmp, &names, opt)?;
    checkpoint::publish(out_dir, &tmp, state)
}
