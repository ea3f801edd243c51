//! Value training (iro.md step 4, "Optimize"): token-level Monte-Carlo regression of V onto the final reward
//! with AdamW, a cosine schedule and gradient accumulation to the effective batch, resumable from
//! checkpoints to the exact same weights.

pub mod batch;
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod value;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iro_common::config::{ValueKind, ValueSection};
use iro_common::data::{SplitMix64, shuffled_order};
use tch::{Device, Kind};

pub use batch::{ValueBatch, ValueExample, build_batch};
pub use checkpoint::TrainState;
pub use loss::{mc_value_loss, squared_error_sum};
pub use optim::{AdamW, AdamWConfig, cosine_lr};
pub use value::{MlpHead, TrainableValue};

use crate::error::{Error, Result};
use crate::model::Backbone;

/// The knobs of one value training (from `[value]` plus the run seed and the tokenizer's pad id).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueTrainConfig {
    pub lr: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub epochs: usize,
    /// Effective batch (sequences per optimizer step).
    pub batch_size: usize,
    pub micro_batch_size: usize,
    /// Save every this many optimizer steps (0: only at the end).
    pub checkpoint_every: usize,
    pub seed: u64,
    pub pad_id: i64,
}

impl ValueTrainConfig {
    pub fn new(section: &ValueSection, seed: u64, pad_id: i64) -> Self {
        Self {
            lr: section.lr,
            adam_eps: section.adam_eps,
            weight_decay: section.weight_decay,
            epochs: section.epochs,
            batch_size: section.batch_size,
            micro_batch_size: section.micro_batch_size,
            checkpoint_every: section.checkpoint_every,
            seed,
            pad_id,
        }
    }
}

/// Where the value function starts (a resumed training ignores it for the weights and reads the checkpoint).
pub enum ValueInit {
    /// `model` kind from an HF folder: a policy gets a fresh head, a seqcls/reward model (or V_{t-1}) keeps its own.
    Model { dir: PathBuf, kind: Kind, device: Device },
    /// `head` kind on a frozen backbone of hidden size `hidden`: fresh MLP of width `width`, or loaded from `from`.
    Head { backbone: Arc<Backbone>, hidden: i64, width: i64, from: Option<PathBuf> },
}

impl ValueInit {
    pub fn value_kind(&self) -> ValueKind {
        match self {
            ValueInit::Model { .. } => ValueKind::Model,
            ValueInit::Head { .. } => ValueKind::Head,
        }
    }

    fn build(&self, from: Option<&Path>, seed: u64) -> Result<TrainableValue> {
        match self {
            ValueInit::Model { dir, kind, device } => {
                TrainableValue::model_from_dir(from.unwrap_or(dir), *kind, *device, seed)
            }
            ValueInit::Head { backbone, hidden, width, from: init } => {
                TrainableValue::head(backbone.clone(), *hidden, *width, from.or(init.as_deref()), seed)
            }
        }
    }
}

/// Reported after every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done (from 1).
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    /// The effective batch's loss before this step's update.
    pub loss: f64,
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Optimizer steps done in all (including those before a resume).
    pub steps: usize,
    pub total_steps: usize,
    pub final_loss: f64,
    /// Loss of every step, from step 1.
    pub losses: Vec<f64>,
    /// The last checkpoint written (the trained value function when `steps == total_steps`).
    pub checkpoint: PathBuf,
}

/// Shuffled example order of `epoch`: a fresh permutation per epoch, each seeded from the run seed alone.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut epoch_seed = rng.next_u64();
    for _ in 0..epoch {
        epoch_seed = rng.next_u64();
    }
    shuffled_order(n, epoch_seed)
}

/// Trains a value function on `examples` and writes checkpoints under `out_dir`. With `resume`, continues
/// from the newest checkpoint there (weights, AdamW moments, step, data position) when one exists.
/// `progress` is called after every step (and after that step's checkpoint, if any); `Break` stops training
/// there, as a kill would.
pub fn train_value(
    config: &ValueTrainConfig,
    examples: &[ValueExample],
    init: &ValueInit,
    out_dir: &Path,
    resume: bool,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<TrainReport> {
    if examples.is_empty() || config.batch_size == 0 || config.micro_batch_size == 0 || config.epochs == 0 {
        return Err(Error::InvalidRequest(format!(
            "value training needs examples ({}), epochs ({}), batch_size ({}) and micro_batch_size ({}) above 0",
            examples.len(),
            config.epochs,
            config.batch_size,
            config.micro_batch_size
        )));
    }
    let n = examples.len();
    let batch = config.batch_size.min(n);
    let steps_per_epoch = n.div_ceil(batch);
    let total_steps = config.epochs * steps_per_epoch;
    let adam = AdamWConfig { eps: config.adam_eps, weight_decay: config.weight_decay, ..Default::default() };
    let kind_name = match init.value_kind() {
        ValueKind::Model => "model",
        ValueKind::Head => "head",
    };

    let resume_from = if resume { checkpoint::latest(out_dir) } else { None };
    let value = init.build(resume_from.as_deref(), config.seed)?;
    let params = value.params();
    let mut opt = AdamW::new(adam, &params);
    let mut state = match &resume_from {
        Some(dir) => {
            let state = checkpoint::load_train_state(dir, &value, &mut opt)?;
            if state.examples != n || state.batch_size != batch || state.total_steps != total_steps {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    message: format!(
                        "train state is for {} examples, batch {}, {} steps; this run has {n}, {batch}, {total_steps}",
                        state.examples, state.batch_size, state.total_steps
                    ),
                });
            }
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
            kind: kind_name.into(),
            losses: Vec::new(),
        },
    };
    let mut last_checkpoint = resume_from.unwrap_or_default();
    let device = value.device();
    let mut order = (usize::MAX, Vec::new());

    while state.step < total_steps {
        let (epoch, start) = (state.step / steps_per_epoch, (state.step % steps_per_epoch) * batch);
        if order.0 != epoch {
            order = (epoch, epoch_order(n, config.seed, epoch));
        }
        let picked: Vec<&ValueExample> = order.1[start..(start + batch).min(n)].iter().map(|&i| &examples[i]).collect();
        let targets: usize = picked.iter().map(|e| e.targets()).sum();
        let scale = 1.0 / targets as f64;

        optim::zero_grads(&params);
        let mut loss = 0.0;
        for micro in picked.chunks(config.micro_batch_size) {
            let b = build_batch(micro, config.pad_id, device)?;
            let values = value.values(&b.ids, &b.valid, &b.positions);
            let sum = squared_error_sum(&values, &b.target_mask, &b.rewards);
            loss += sum.double_value(&[]) * scale;
            optim::accumulate(&sum, scale);
        }
        let lr = cosine_lr(config.lr, state.step, total_steps);
        opt.step(&params, lr);

        state.step += 1;
        state.epoch = state.step / steps_per_epoch;
        state.position = (state.step % steps_per_epoch) * batch;
        state.losses.push(loss);
        let every = config.checkpoint_every;
        if state.step == total_steps || (every > 0 && state.step % every == 0) {
            last_checkpoint = checkpoint::save(out_dir, &value, &opt, &state)?;
        }
        let p = Progress { step: state.step, total_steps, epoch, loss, lr };
        if progress(&p).is_break() {
            break;
        }
    }
    Ok(TrainReport {
        steps: state.step,
        total_steps,
        final_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        losses: state.losses,
        checkpoint: last_checkpoint,
    })
}
