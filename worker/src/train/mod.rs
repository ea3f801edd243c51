//! Value training (iro.md step 4, "Optimize"): token-level Monte-Carlo regression of V onto the final reward
//! with AdamW, a cosine schedule and gradient accumulation to the effective batch, resumable from
//! checkpoints to the exact same weights.

pub mod batch;
pub mod checkpoint;
pub mod dpo;
pub mod features;
pub mod layerwise;
pub mod loss;
pub mod optim;
pub mod ridge;
pub mod shard;
pub mod value;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iro_common::config::{ValueKind, ValueSection, ValueSharding};
use iro_common::data::{SplitMix64, shuffled_order};
use tch::{Device, Kind, Tensor};

pub use batch::{ValueBatch, ValueExample, build_batch};
pub use checkpoint::TrainState;
pub use features::{FeatureCache, pool_columns, pool_prefixes};
pub use loss::{mc_value_loss, squared_error_sum};
pub use optim::{AdamW, AdamWConfig, cosine_lr};
pub use shard::{ShardedState, StepMemory};
pub use value::{MlpHead, TrainableValue};

use crate::collective::{Collective, DEFAULT_BUCKET_BYTES, SingleRank, all_reduce_bucketed};
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
    /// Which training state each rank keeps only its 1/R shard of (`value.sharding`).
    pub sharding: ValueSharding,
    /// Recompute each decoder layer in the backward (`value.activation_checkpointing`, `model` kind).
    pub activation_checkpointing: bool,
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
            sharding: section.sharding,
            activation_checkpointing: section.activation_checkpointing,
        }
    }
}

/// Where the value function starts (a resumed training ignores it for the weights and reads the checkpoint).
pub enum ValueInit {
    /// `model` kind from an HF folder: a policy gets a fresh head, a seqcls/reward model (or V_{t-1}) keeps its own.
    Model { dir: PathBuf, kind: Kind, device: Device },
    /// `head` kind on a frozen backbone of hidden size `hidden`: fresh MLP of width `width`, or loaded from `from`,
    /// reading the states after the first `depth` layers (`None`: the final ones).
    Head { backbone: Arc<Backbone>, hidden: i64, width: i64, from: Option<PathBuf>, depth: Option<usize> },
}

impl ValueInit {
    pub fn value_kind(&self) -> ValueKind {
        match self {
            ValueInit::Model { .. } => ValueKind::Model,
            ValueInit::Head { .. } => ValueKind::Head,
        }
    }

    /// `start`: where a fresh head's output starts (the mean training target).
    fn build(&self, from: Option<&Path>, seed: u64, start: f64) -> Result<TrainableValue> {
        match self {
            ValueInit::Model { dir, kind, device } => {
                TrainableValue::model_from_dir(from.unwrap_or(dir), *kind, *device, seed)
            }
            ValueInit::Head { backbone, hidden, width, from: init, depth } => {
                TrainableValue::head(backbone.clone(), *hidden, *width, from.or(init.as_deref()), seed, start, *depth)
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
    /// What this rank held of weights, gradients and optimizer state at this step's AdamW update.
    pub memory: StepMemory,
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

/// The gang a data-parallel training runs in: this rank's collective and the gradient bucket size.
pub struct DataParallel<'a> {
    pub collective: &'a mut dyn Collective,
    /// Bytes per gradient all-reduce bucket (`[cluster] bucket_bytes`).
    pub bucket_bytes: usize,
}

/// Trains a value function on `examples` and writes checkpoints under `out_dir`. With `resume`, continues
/// from the newest checkpoint there (weights, AdamW moments, step, data position) when one exists.
/// `progress` is called after every step (and after that step's checkpoint, if any); `Break` stops training
/// there, as a kill would. One process: [`train_value_ranked`] with a gang of one.
pub fn train_value(
    config: &ValueTrainConfig,
    examples: &[ValueExample],
    init: &ValueInit,
    out_dir: &Path,
    resume: bool,
    progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<TrainReport> {
    let mut single = SingleRank;
    let gang = DataParallel { collective: &mut single, bucket_bytes: DEFAULT_BUCKET_BYTES };
    train_value_ranked(config, examples, init, out_dir, resume, gang, progress)
}

/// Data-parallel [`train_value`]: one rank of a gang of `world`. Every rank gets the same `examples`, config
/// and `out_dir` (a path all ranks share) and walks the same shuffled effective batches; rank r computes
/// micro-batches r, r+world, ... of each, the gradients are summed over the gang (bucketed) before the AdamW
/// step, so every replica applies the same update. Since each micro-batch's squared-error sum is divided by
/// the whole effective batch's target count (which every rank computes from the same batch), the summed
/// gradient is exactly the one-process gradient, up to float summation order. The reported loss is the
/// gang's. Only rank 0 writes checkpoints; a gang restarted with `resume` reads rank 0's newest one on every
/// rank. A rank that fails or stops (`Break`) makes the others' next collective call fail, naming it.
pub fn train_value_ranked(
    config: &ValueTrainConfig,
    examples: &[ValueExample],
    init: &ValueInit,
    out_dir: &Path,
    resume: bool,
    gang: DataParallel<'_>,
    progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<TrainReport> {
    let depth = match init {
        ValueInit::Head { depth, .. } => *depth,
        ValueInit::Model { .. } => None,
    };
    train_loop(config, examples, init, out_dir, resume, gang, &mut FeatureCache::at_depth(depth), progress)
}

/// [`train_value`] on one rank, fresh (no resume), reading and filling `features` — the frozen-backbone states of
/// a `head` by example index — so several trainings on the same examples (`iro bench value`'s grid) run the
/// backbone once. Every index of `examples` must hold the same prompt and response in each call that shares
/// `features` (the rewards may differ: they are read from `examples`).
pub fn train_value_sharing_features(
    config: &ValueTrainConfig,
    examples: &[ValueExample],
    init: &ValueInit,
    out_dir: &Path,
    features: &mut FeatureCache,
) -> Result<TrainReport> {
    let mut single = SingleRank;
    let gang = DataParallel { collective: &mut single, bucket_bytes: DEFAULT_BUCKET_BYTES };
    train_loop(config, examples, init, out_dir, false, gang, features, |_| ControlFlow::Continue(()))
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    config: &ValueTrainConfig,
    examples: &[ValueExample],
    init: &ValueInit,
    out_dir: &Path,
    resume: bool,
    gang: DataParallel<'_>,
    features: &mut FeatureCache,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<TrainReport> {
    let DataParallel { collective, bucket_bytes } = gang;
    let (rank, world) = (collective.rank(), collective.world());
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
    let sharded = config.sharding != ValueSharding::None;
    let saved = resume_from.as_deref().map(checkpoint::read_train_state).transpose()?;
    if let (Some(dir), Some(saved)) = (&resume_from, &saved) {
        check_resumable(dir, saved, config.sharding, world)?;
    }
    // A sharded checkpoint's weights are in its shard files (a rank without a shared filesystem has no model
    // files at all), so the model is built from its starting point and the shards overwrite it.
    let build_from = if sharded { None } else { resume_from.as_deref() };
    let value = init.build(build_from, config.seed, mean_target(examples))?;
    let params = value.params();
    // A sharded training keeps its moments in the shards.
    let mut opt = AdamW::new(adam, if sharded { &params[..0] } else { &params[..] });
    let mut state = match (&resume_from, saved) {
        (Some(dir), Some(saved)) => {
            let state = if sharded { saved } else { checkpoint::load_train_state(dir, &value, &mut opt)? };
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
        _ => TrainState {
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
            sharding: config.sharding,
            world,
            buckets: Vec::new(),
        },
    };
    let mut last_checkpoint = resume_from.clone().unwrap_or_default();
    let device = value.device();
    if world > 1 {
        let targets: usize = examples.iter().map(|e| e.targets()).sum();
        agree_on_start(
            collective,
            [("resume step", state.step), ("examples", n), ("targets", targets)],
            &params,
            out_dir,
        )?;
        if resume_from.is_none() {
            // bf16 weights: their f32 masters start from the broadcast weights too.
            opt.sync_master(&params);
        }
    }
    // Sharded only after the broadcast, so every rank slices the same weights.
    // With checkpointing, one bucket per stage (embeddings, each layer, the head), in the order they run.
    let groups = if config.activation_checkpointing { Some(layerwise::stage_groups(&value)?) } else { None };
    let mut shards = if sharded {
        let mut shards = ShardedState::new(config.sharding, rank, world, &params, bucket_bytes, groups.clone(), adam)?;
        if let Some(dir) = &resume_from {
            if !state.buckets.is_empty() && state.buckets != shards.bucket_lens() {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    message: format!(
                        "its shards are cut into buckets of {:?} elements, this run's into {:?}: resume with the \
                         cluster.bucket_bytes the checkpoint was written with",
                        state.buckets,
                        shards.bucket_lens()
                    ),
                });
            }
            checkpoint::load_shards(dir, &state, &mut shards, collective)?;
        }
        state.buckets = shards.bucket_lens();
        Some(shards)
    } else {
        None
    };
    state.sharding = config.sharding;
    state.world = world;
    let mut order = (usize::MAX, Vec::new());

    while state.step < total_steps {
        let (epoch, start) = (state.step / steps_per_epoch, (state.step % steps_per_epoch) * batch);
        if order.0 != epoch {
            order = (epoch, epoch_order(n, config.seed, epoch));
        }
        let picked: Vec<(usize, &ValueExample)> =
            order.1[start..(start + batch).min(n)].iter().map(|&i| (i, &examples[i])).collect();
        let targets: usize = picked.iter().map(|(_, e)| e.targets()).sum();
        let scale = 1.0 / targets as f64;

        let mut loss = 0.0;
        let micros: Vec<&[(usize, &ValueExample)]> = picked.chunks(config.micro_batch_size).collect();
        let mine: Vec<&[(usize, &ValueExample)]> = micros.iter().copied().skip(rank).step_by(world).collect();
        let lr = cosine_lr(config.lr, state.step, total_steps);
        let memory = match shards.as_mut() {
            Some(shards) => {
                // Every rank gathers and reduces every bucket, micro-batches or not, so the collectives line up.
                shards.begin_step();
                match &groups {
                    None => {
                        shards.gather(collective)?;
                        for micro in &mine {
                            let sum = micro_loss_sum(&value, micro, features, config.pad_id, device)?;
                            loss += sum.double_value(&[]) * scale;
                            shards.accumulate(&sum, scale);
                        }
                        shards.release();
                        shards.reduce(collective)?;
                    }
                    Some(groups) => {
                        // Round k: every rank's k-th micro-batch, or none; the stages' collectives run either way.
                        for k in 0..micros.len().div_ceil(world) {
                            let b = mine.get(k).map(|m| model_batch(m, config.pad_id, device)).transpose()?;
                            let mut grads =
                                layerwise::Grads::Sharded { shards: &mut *shards, collective: &mut *collective };
                            let sum = layerwise::checkpointed_micro(
                                &value,
                                groups,
                                b.as_ref(),
                                scale,
                                &mut grads,
                                &mut || {},
                            )?;
                            loss += sum * scale;
                        }
                    }
                }
                loss = gang_loss(collective, loss)?;
                let memory = shards.memory();
                shards.step(collective, lr)?;
                memory
            }
            None => {
                optim::zero_grads(&params);
                for micro in &mine {
                    loss += replicated_micro(&value, groups.as_deref(), micro, scale, features, config.pad_id, device)?;
                }
                if world > 1 {
                    if mine.is_empty() && params.iter().any(|p| !p.grad().defined()) {
                        // This rank has no micro-batch in this (short, last-of-epoch) batch and has never
                        // backpropagated: a zero-weighted pass over the first micro-batch defines its gradients
                        // exactly where the other ranks' are defined, so the buckets line up, and adds nothing.
                        replicated_micro(&value, groups.as_deref(), micros[0], 0.0, features, config.pad_id, device)?;
                    }
                    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
                    all_reduce_bucketed(collective, &grads, bucket_bytes)?;
                    loss = gang_loss(collective, loss)?;
                }
                let memory = StepMemory::replicated(&params, &opt);
                opt.step(&params, lr);
                memory
            }
        };

        state.step += 1;
        state.epoch = state.step / steps_per_epoch;
        state.position = (state.step % steps_per_epoch) * batch;
        state.losses.push(loss);
        let every = config.checkpoint_every;
        if state.step == total_steps || (every > 0 && state.step % every == 0) {
            last_checkpoint = match shards.as_mut() {
                Some(shards) => {
                    // Rank 0 writes the whole model: with `full` every bucket is gathered in turn, rank 0 keeping
                    // its copy in host memory and the others dropping theirs at once, so no device holds more
                    // than one gathered bucket; all are freed again after the save.
                    for b in 0..shards.buckets() {
                        if rank == 0 {
                            shards.gather_bucket_to_host(b, collective)?;
                        } else {
                            shards.gather_bucket(b, collective)?;
                            shards.release_bucket(b);
                        }
                    }
                    let saved = checkpoint::save_sharded(out_dir, &value, shards, &state, collective);
                    shards.release();
                    saved?
                }
                None if rank == 0 => checkpoint::save(out_dir, &value, &opt, &state)?,
                None => checkpoint::checkpoint_dir(out_dir, state.step),
            };
            if world > 1 {
                // No rank runs ahead of a checkpoint that is not on disk yet: once any rank reports step N
                // checkpointed, a restarted gang finds it (and a rank 0 that failed to save stops the others here).
                collective.barrier()?;
            }
        }
        let p = Progress { step: state.step, total_steps, epoch, loss, lr, memory };
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

/// Backpropagates one micro-batch into `.grad` (plainly, or checkpointed layer by layer with `groups`) and
/// returns its share of the effective batch's loss.
fn replicated_micro(
    value: &TrainableValue,
    groups: Option<&[Vec<usize>]>,
    micro: &[(usize, &ValueExample)],
    scale: f64,
    features: &mut FeatureCache,
    pad_id: i64,
    device: Device,
) -> Result<f64> {
    match groups {
        Some(groups) => {
            let b = model_batch(micro, pad_id, device)?;
            let mut grads = layerwise::Grads::Replicated;
            Ok(layerwise::checkpointed_micro(value, groups, Some(&b), scale, &mut grads, &mut || {})? * scale)
        }
        None => {
            let sum = micro_loss_sum(value, micro, features, pad_id, device)?;
            optim::accumulate(&sum, scale);
            Ok(sum.double_value(&[]) * scale)
        }
    }
}

fn model_batch(micro: &[(usize, &ValueExample)], pad_id: i64, device: Device) -> Result<ValueBatch> {
    let refs: Vec<&ValueExample> = micro.iter().map(|(_, e)| *e).collect();
    build_batch(&refs, pad_id, device)
}

/// The effective batch's loss summed over the gang (each rank holds the share of its micro-batches).
pub(crate) fn gang_loss(collective: &mut dyn Collective, loss: f64) -> Result<f64> {
    let mut total = Tensor::from_slice(&[loss]);
    collective.all_reduce_sum(&mut total)?;
    Ok(total.double_value(&[0]))
}

/// A checkpoint resumes only into the training that can read it: a sharded one (one shard file per rank) with the
/// same sharding and the same number of ranks; an unsharded one into an unsharded training of any size.
fn check_resumable(dir: &Path, saved: &TrainState, sharding: ValueSharding, world: usize) -> Result<()> {
    let refuse = |message: String| Err(Error::Checkpoint { path: dir.to_owned(), message });
    if saved.sharding != sharding {
        return refuse(format!(
            "was written with value.sharding = \"{}\", this run has \"{}\": resume with the sharding it was written \
             with",
            saved.sharding.as_str(),
            sharding.as_str()
        ));
    }
    if sharding != ValueSharding::None && saved.world != world {
        return refuse(format!(
            "holds the shards of R = {} ranks (value.sharding = \"{}\") but this gang has R = {world}: a sharded \
             checkpoint resumes only with the same number of ranks (cluster.train_ranks = {})",
            saved.world,
            sharding.as_str(),
            saved.world
        ));
    }
    Ok(())
}

/// The mean reward over every target position (the token-weighted mean the loss regresses onto).
pub fn mean_target(examples: &[ValueExample]) -> f64 {
    let (sum, n) =
        examples.iter().fold((0.0, 0usize), |(s, n), e| (s + e.reward * e.targets() as f64, n + e.targets()));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// The loss of the best constant predictor, `0.5 · Var(r)` over every target position: a trained value function
/// whose loss is not below this has learned nothing about which prefixes lead to better rewards.
pub fn constant_predictor_loss(examples: &[ValueExample]) -> f64 {
    let mean = mean_target(examples);
    let (sum, n) = examples
        .iter()
        .fold((0.0, 0usize), |(s, n), e| (s + (e.reward - mean).powi(2) * e.targets() as f64, n + e.targets()));
    if n == 0 { 0.0 } else { 0.5 * sum / n as f64 }
}

/// `0.5 · Σ (V − r)²` over the target positions of one micro-batch, with the graph to the trainable tensors. A
/// `head` reads the frozen backbone's states from `features` (computed once per example); a `model` runs its
/// backbone.
fn micro_loss_sum(
    value: &TrainableValue,
    micro: &[(usize, &ValueExample)],
    features: &mut FeatureCache,
    pad_id: i64,
    device: Device,
) -> Result<Tensor> {
    match value {
        TrainableValue::Head { backbone, head, .. } => {
            let (states, rewards) = features.micro_batch(backbone, micro, pad_id, device)?;
            let diff = head.forward(&states) - rewards;
            Ok(diff.square().sum(Kind::Float) * 0.5)
        }
        TrainableValue::Model { .. } => {
            let b = model_batch(micro, pad_id, device)?;
            let values = value.values(&b.ids, &b.valid, &b.positions);
            Ok(squared_error_sum(&values, &b.target_mask, &b.rewards))
        }
    }
}

/// Every rank of a gang must start from the same place: the same resume step (each read the newest checkpoint
/// under the shared `out_dir` on its own), the same data (counted by examples and targets), and the same
/// weights, which are broadcast from rank 0 as DDP does, so an initialisation that differed by rank could not
/// silently split the replicas.
fn agree_on_start<const N: usize>(
    collective: &mut dyn Collective,
    facts: [(&str, usize); N],
    params: &[Tensor],
    out_dir: &Path,
) -> Result<()> {
    // Values are all equal iff world · Σv² = (Σv)²; one all-reduce lets every rank see a disagreement.
    let mut sums: Vec<i64> = Vec::with_capacity(2 * N);
    for (_, v) in facts {
        sums.extend([v as i64, (v as i64) * (v as i64)]);
    }
    let mut sums = Tensor::from_slice(&sums);
    collective.all_reduce_sum(&mut sums)?;
    let world = collective.world() as i64;
    for (i, (what, mine)) in facts.iter().enumerate() {
        let (sum, sum_sq) = (sums.int64_value(&[2 * i as i64]), sums.int64_value(&[2 * i as i64 + 1]));
        if world * sum_sq != sum * sum {
            return Err(Error::Collective(format!(
                "rank {} has {what} {mine} but the gang's differ (mean {:.2}): every rank must get the same examples \
                 and see the same checkpoints under {}",
                collective.rank(),
                sum as f64 / world as f64,
                out_dir.display()
            )));
        }
    }
    tch::no_grad(|| -> Result<()> {
        for p in params {
            let mut shared = p.detach();
            collective.broadcast(&mut shared, 0)?;
        }
        Ok(())
    })
}
