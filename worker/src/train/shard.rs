//! ZeRO-style sharding of the training state (`[value] sharding`; DeepSpeed ZeRO stages 2 and 3, PyTorch FSDP):
//! the trainable tensors are flattened into buckets (planned as the gradient all-reduce plans them), each
//! bucket is padded with zeros to R·s elements, and rank r of R keeps elements r·s..(r+1)·s of it: its shard of
//! the gradients (summed over the gang by one reduce-scatter per bucket) and of both AdamW moments, and with
//! `full` of the weights too. The AdamW step runs on the shard through the same arithmetic as the replicated
//! optimizer ([`adamw_update`]), so a sharded gang trains the weights one unsharded rank would.
//!
//! Gather granularity. ZeRO-3 proper gathers each layer's weights just before that layer's forward (and again
//! before its backward) and frees them right after. tch exposes neither module hooks nor autograd hooks through
//! which a collective could run between two layers of a forward or a backward pass, so here the unit is the
//! bucket and the moment is the step: every bucket is gathered before the step's first micro-batch and freed
//! after its last backward. What a rank holds *between* steps and *at* the optimizer step is its 1/R (what
//! [`StepMemory`] counts and the README's table shows); inside its forward/backward passes a rank briefly holds
//! the whole model, as it would without sharding.

use std::path::Path;

use iro_common::config::ValueSharding;
use tch::{Device, Kind, Tensor};

use super::optim::{AdamW, AdamWConfig, adamw_update};
use crate::collective::Collective;
use crate::collective::bucket::plan_buckets;
use crate::error::{Error, Result};

/// Bytes of training state one rank holds at the optimizer step, counted from the tensors the trainer
/// references (elements × element size; a released weight counts 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepMemory {
    /// The weights: whole tensors, or this rank's shard of them (with bf16 weights, their f32 masters too).
    pub params: u64,
    /// The gradients the step reads: whole `.grad`s, or this rank's summed shard.
    pub grads: u64,
    /// AdamW's two moments (whole or sharded).
    pub optimizer: u64,
}

impl StepMemory {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    /// What plain data parallelism holds: every trainable tensor, its `.grad`, and both moments of each.
    pub fn replicated(params: &[Tensor], opt: &AdamW) -> Self {
        let master: u64 = opt.master.iter().flatten().map(bytes).sum();
        Self {
            params: params.iter().map(bytes).sum::<u64>() + master,
            grads: params.iter().map(|p| bytes(&p.grad())).sum(),
            optimizer: opt.m.iter().chain(&opt.v).map(bytes).sum(),
        }
    }
}

fn bytes(t: &Tensor) -> u64 {
    if t.defined() { (t.numel() * t.kind().elt_size_in_bytes()) as u64 } else { 0 }
}

/// One bucket of consecutive trainable tensors (one dtype, one device).
struct Bucket {
    /// Indices into the trainable tensors.
    members: Vec<usize>,
    /// Elements before padding.
    len: i64,
    /// Elements of one rank's shard: ⌈len / world⌉.
    shard: i64,
    kind: Kind,
    device: Device,
}

impl Bucket {
    fn padded(&self, world: usize) -> i64 {
        self.shard * world as i64
    }
}

/// This rank's share of a sharded training: see the module docs.
pub struct ShardedState {
    mode: ValueSharding,
    rank: usize,
    world: usize,
    config: AdamWConfig,
    /// Handles on the trainable tensors (the model's own: `set_data` on them is seen by the model).
    params: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    buckets: Vec<Bucket>,
    /// `optimizer`: each bucket's weights as one flat padded buffer the trainable tensors are views of, so this
    /// rank's shard is a view too and the update is gathered straight back into the weights. Empty for `full`.
    flat: Vec<Tensor>,
    /// `full`: this rank's f32 shard of each bucket's weights, the only copy between steps. `optimizer`: the f32
    /// master shard of each bucket whose weights are below f32 (bf16 mixed precision), in bucket order.
    weights: Vec<Tensor>,
    /// This rank's shard of each bucket's summed gradient, filled by [`Self::reduce`].
    grads: Vec<Tensor>,
    /// This step's full-bucket gradient sums over this rank's micro-batches, until the reduce-scatter.
    pending: Vec<Option<Tensor>>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// AdamW steps taken (bias correction).
    pub steps: u64,
}

impl ShardedState {
    /// Shards `params` (the trainable tensors, equal on every rank: call after they were broadcast) into buckets:
    /// `groups` (lists of indices into `params`, e.g. one per layer) or, without them, consecutive runs of about
    /// `bucket_bytes`. With `full`, releases this rank's copy of every weight outside its shard.
    pub fn new(
        mode: ValueSharding,
        rank: usize,
        world: usize,
        params: &[Tensor],
        bucket_bytes: usize,
        groups: Option<Vec<Vec<usize>>>,
        config: AdamWConfig,
    ) -> Result<Self> {
        if mode == ValueSharding::None {
            return Err(Error::InvalidRequest("ShardedState needs value.sharding = optimizer or full".into()));
        }
        if let Some(i) = params.iter().position(|p| !p.defined() || !p.is_floating_point()) {
            return Err(Error::InvalidRequest(format!("trainable tensor {i} is undefined or not floating point")));
        }
        let plan = match groups {
            Some(groups) => {
                let mut seen = vec![false; params.len()];
                for &i in groups.iter().flatten() {
                    if i >= params.len() || std::mem::replace(&mut seen[i], true) {
                        return Err(Error::InvalidRequest(format!(
                            "bucket groups name tensor {i} twice or out of range"
                        )));
                    }
                }
                if let Some(i) = seen.iter().position(|s| !s) {
                    return Err(Error::InvalidRequest(format!("trainable tensor {i} is in no bucket group")));
                }
                let kinds = |g: &Vec<usize>| g.iter().any(|&i| params[i].kind() != params[g[0]].kind());
                if groups.iter().any(|g| g.is_empty() || kinds(g)) {
                    return Err(Error::InvalidRequest("a bucket group is empty or mixes dtypes".into()));
                }
                groups
            }
            None => plan_buckets(params, bucket_bytes),
        };
        let buckets: Vec<Bucket> = plan
            .into_iter()
            .map(|members| {
                let len: i64 = members.iter().map(|&i| params[i].numel() as i64).sum();
                let first = &params[members[0]];
                Bucket {
                    shard: (len + world as i64 - 1) / world as i64,
                    len,
                    kind: first.kind(),
                    device: first.device(),
                    members,
                }
            })
            .collect();
        let f32_zeros = |b: &Bucket| Tensor::zeros([b.shard], (Kind::Float, b.device));
        let mut me = Self {
            mode,
            rank,
            world,
            config,
            params: params.iter().map(Tensor::shallow_clone).collect(),
            shapes: params.iter().map(Tensor::size).collect(),
            grads: buckets.iter().map(f32_zeros).collect(),
            pending: buckets.iter().map(|_| None).collect(),
            m: buckets.iter().map(f32_zeros).collect(),
            v: buckets.iter().map(f32_zeros).collect(),
            buckets,
            flat: Vec::new(),
            weights: Vec::new(),
            steps: 0,
        };
        tch::no_grad(|| {
            for b in 0..me.buckets.len() {
                let flat = me.flatten(b, me.buckets[b].kind, |i| me.params[i].shallow_clone());
                match mode {
                    ValueSharding::Full => me.weights.push(me.own(b, &flat).to_kind(Kind::Float).copy()),
                    _ => {
                        // Below f32 (bf16 mixed precision) the update accumulates in an f32 master shard.
                        if me.buckets[b].kind != Kind::Float {
                            me.weights.push(me.own(b, &flat).to_kind(Kind::Float).copy());
                        }
                        me.point_at(b, &flat);
                        me.flat.push(flat);
                    }
                }
            }
        });
        me.release();
        Ok(me)
    }

    pub fn mode(&self) -> ValueSharding {
        self.mode
    }

    /// Elements of every bucket before padding: a checkpoint's shards fit only the same plan.
    pub fn bucket_lens(&self) -> Vec<i64> {
        self.buckets.iter().map(|b| b.len).collect()
    }

    /// Bucket `b`'s tensors (each `get(i)`, zeros where undefined) flattened to `kind` and zero-padded to R·s
    /// elements.
    fn flatten(&self, b: usize, kind: Kind, get: impl Fn(usize) -> Tensor) -> Tensor {
        let bucket = &self.buckets[b];
        let mut pieces: Vec<Tensor> = bucket
            .members
            .iter()
            .map(|&i| {
                let t = get(i);
                if t.defined() {
                    t.reshape([-1]).to_kind(kind)
                } else {
                    Tensor::zeros([self.shapes[i].iter().product::<i64>()], (kind, bucket.device))
                }
            })
            .collect();
        let pad = bucket.padded(self.world) - bucket.len;
        if pad > 0 {
            pieces.push(Tensor::zeros([pad], (kind, bucket.device)));
        }
        Tensor::cat(&pieces, 0)
    }

    /// This rank's block of a full (padded) bucket buffer, as a view.
    fn own(&self, b: usize, full: &Tensor) -> Tensor {
        let s = self.buckets[b].shard;
        full.narrow(0, self.rank as i64 * s, s)
    }

    /// Makes bucket `b`'s trainable tensors views of `full` (the model sees the change: `set_data` replaces the
    /// data of the tensor the model holds, not of a copy).
    fn point_at(&self, b: usize, full: &Tensor) {
        let mut offset = 0;
        for &i in &self.buckets[b].members {
            let shape = &self.shapes[i];
            let n: i64 = shape.iter().product();
            let mut p = self.params[i].shallow_clone();
            p.set_data(&full.narrow(0, offset, n).view(shape.as_slice()));
            offset += n;
        }
    }

    /// The buckets, in order (`groups` order when given).
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// The trainable tensors of bucket `b` (indices into the tensors passed to [`Self::new`]).
    pub fn members(&self, b: usize) -> &[usize] {
        &self.buckets[b].members
    }

    /// `full`: all-gathers every bucket's weights into the trainable tensors, so the model can run. Every rank
    /// calls it, in the same order. `optimizer`: the weights are always whole; nothing to do.
    pub fn gather(&mut self, collective: &mut dyn Collective) -> Result<()> {
        (0..self.buckets.len()).try_for_each(|b| self.gather_bucket(b, collective))
    }

    /// [`Self::gather`] of bucket `b` alone (a layer, just before it runs).
    pub fn gather_bucket(&mut self, b: usize, collective: &mut dyn Collective) -> Result<()> {
        if self.mode != ValueSharding::Full {
            return Ok(());
        }
        let bucket = &self.buckets[b];
        let mut full = Tensor::zeros([bucket.padded(self.world)], (bucket.kind, bucket.device));
        let mine = self.weights[b].to_kind(bucket.kind);
        collective.all_gather(&mine, &mut full)?;
        tch::no_grad(|| self.point_at(b, &full));
        Ok(())
    }

    /// `full`: drops this rank's copy of every weight (the trainable tensors become empty until the next
    /// [`Self::gather`]); only the shard stays.
    pub fn release(&mut self) {
        (0..self.buckets.len()).for_each(|b| self.release_bucket(b));
    }

    /// [`Self::release`] of bucket `b` alone.
    pub fn release_bucket(&mut self, b: usize) {
        if self.mode != ValueSharding::Full {
            return;
        }
        let bucket = &self.buckets[b];
        for &i in &bucket.members {
            let mut p = self.params[i].shallow_clone();
            p.set_data(&Tensor::zeros([0], (bucket.kind, bucket.device)));
        }
    }

    /// `full`: gathers bucket `b` and moves this rank's whole copy of it to host memory (a checkpoint's model
    /// files are written from there), so a device never holds more than one gathered bucket for a save. Undone
    /// by [`Self::release`].
    pub fn gather_bucket_to_host(&mut self, b: usize, collective: &mut dyn Collective) -> Result<()> {
        if self.mode != ValueSharding::Full {
            return Ok(());
        }
        self.gather_bucket(b, collective)?;
        for &i in &self.buckets[b].members {
            let mut p = self.params[i].shallow_clone();
            let host = tch::no_grad(|| p.to_device(Device::Cpu));
            p.set_data(&host);
        }
        Ok(())
    }

    /// Clears the summed gradient shards before a step's first micro-batch.
    pub fn begin_step(&mut self) {
        for g in &mut self.grads {
            let _ = g.zero_();
        }
    }

    /// Backpropagates one micro-batch's share of the effective-batch loss (`loss_sum · scale`) and adds its
    /// gradients to this step's per-bucket sums. Gradients go there, not into `.grad` (autograd's `grad`, not
    /// `backward`), so no whole-model `.grad` outlives the reduce-scatter. A tensor the loss does not reach gets
    /// a zero gradient (the replicated AdamW would skip it instead; every trainable tensor of a value model is
    /// reached).
    pub fn accumulate(&mut self, loss_sum: &Tensor, scale: f64) {
        let root = loss_sum * scale;
        let grads = Tensor::run_backward(&[&root], &self.params, false, false);
        for b in 0..self.buckets.len() {
            let mine: Vec<Tensor> = self.buckets[b].members.iter().map(|&i| grads[i].shallow_clone()).collect();
            self.add_grads(b, &mine);
        }
    }

    /// Adds the gradients of bucket `b`'s tensors (in [`Self::members`] order; undefined ones count as zeros) to
    /// this round's sum of that bucket.
    pub fn add_grads(&mut self, b: usize, grads: &[Tensor]) {
        let members = self.buckets[b].members.clone();
        tch::no_grad(|| {
            // Gradients are summed in f32 whatever the weights' dtype (the backends' sums are f32 too).
            let flat = self.flatten(b, Kind::Float, |i| {
                members.iter().position(|&m| m == i).map_or_else(Tensor::new, |k| grads[k].shallow_clone())
            });
            self.pending[b] = Some(match self.pending[b].take() {
                Some(sum) => sum + flat,
                None => flat,
            });
        });
    }

    /// Sums the gradients gathered so far over the gang, one reduce-scatter per bucket, and adds this rank's
    /// shard of the sum to its gradient shards; a rank that had no micro-batch contributes zeros. Every rank
    /// calls it, in the same order.
    pub fn reduce(&mut self, collective: &mut dyn Collective) -> Result<()> {
        (0..self.buckets.len()).try_for_each(|b| self.reduce_bucket(b, collective))
    }

    /// [`Self::reduce`] of bucket `b` alone (a layer, right after its backward).
    pub fn reduce_bucket(&mut self, b: usize, collective: &mut dyn Collective) -> Result<()> {
        let bucket = &self.buckets[b];
        let full = self.pending[b]
            .take()
            .unwrap_or_else(|| Tensor::zeros([bucket.padded(self.world)], (Kind::Float, bucket.device)));
        let mut mine = Tensor::zeros([bucket.shard], (Kind::Float, bucket.device));
        collective.reduce_scatter_sum(&full, &mut mine)?;
        tch::no_grad(|| {
            let _ = self.grads[b].g_add_(&mine);
        });
        Ok(())
    }

    /// The AdamW step on this rank's shards at learning rate `lr`; with `optimizer`, each bucket's updated shards
    /// are all-gathered back into the (replicated) weights. Every rank calls it, in the same order.
    pub fn step(&mut self, collective: &mut dyn Collective, lr: f64) -> Result<()> {
        self.steps += 1;
        for b in 0..self.buckets.len() {
            // The f32 weights of this shard: `full`'s own, or a view of the replicated f32 weights, or the f32
            // master beside replicated bf16 ones.
            let master = self.master(b);
            let current = match &master {
                Some(w) => w.shallow_clone(),
                None => self.own(b, &self.flat[b]),
            };
            let updated = tch::no_grad(|| {
                adamw_update(&self.config, self.steps, &current, &self.grads[b], &mut self.m[b], &mut self.v[b], lr)
            });
            if let Some(mut w) = master {
                tch::no_grad(|| w.copy_(&updated));
            }
            if self.mode == ValueSharding::Optimizer {
                let mine = updated.to_kind(self.buckets[b].kind);
                collective.all_gather(&mine, &mut self.flat[b])?;
            }
        }
        Ok(())
    }

    /// This rank's f32 shard of bucket `b`'s weights when it is a tensor of its own (`full`, or `optimizer` with
    /// weights below f32); `None` when it is a view of the replicated f32 weights.
    fn master(&self, b: usize) -> Option<Tensor> {
        match self.mode {
            ValueSharding::Full => Some(self.weights[b].shallow_clone()),
            _ if self.buckets[b].kind != Kind::Float => {
                let k = self.buckets[..b].iter().filter(|x| x.kind != Kind::Float).count();
                Some(self.weights[k].shallow_clone())
            }
            _ => None,
        }
    }

    /// What this rank holds now (see [`StepMemory`]); at the step, after [`Self::reduce`].
    pub fn memory(&self) -> StepMemory {
        let weights: u64 = match self.mode {
            ValueSharding::Full => self.weights.iter().chain(&self.params).map(bytes).sum(),
            _ => self.flat.iter().chain(&self.weights).map(bytes).sum(),
        };
        StepMemory {
            params: weights,
            grads: self.grads.iter().map(bytes).sum::<u64>() + self.pending.iter().flatten().map(bytes).sum::<u64>(),
            optimizer: self.m.iter().chain(&self.v).map(bytes).sum(),
        }
    }

    /// This rank's shards by name (`weight.B`, `m.B`, `v.B` for bucket B), f32: what its checkpoint file holds.
    pub fn shard_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.buckets.len());
        for b in 0..self.buckets.len() {
            let weight = self.master(b).unwrap_or_else(|| self.own(b, &self.flat[b]));
            out.push((format!("weight.{b:05}"), weight));
            out.push((format!("m.{b:05}"), self.m[b].shallow_clone()));
            out.push((format!("v.{b:05}"), self.v[b].shallow_clone()));
        }
        out
    }

    /// Restores this rank's shards from its checkpoint file's tensors (`file` names it in errors); with
    /// `optimizer`, the whole weights are then all-gathered from every rank's restored shard.
    pub fn load_shards(
        &mut self,
        tensors: &[(String, Tensor)],
        file: &Path,
        collective: &mut dyn Collective,
    ) -> Result<()> {
        let find = |name: String, len: i64| -> Result<Tensor> {
            let t = tensors.iter().find(|(n, _)| *n == name).map(|(_, t)| t).ok_or_else(|| Error::MissingTensor {
                path: file.to_owned(),
                name: name.clone(),
                files: file.display().to_string(),
            })?;
            if t.size() != [len] {
                return Err(Error::TensorShape { file: file.to_owned(), name, expected: vec![len], actual: t.size() });
            }
            Ok(t.to_kind(Kind::Float))
        };
        for b in 0..self.buckets.len() {
            let (s, kind, device) = (self.buckets[b].shard, self.buckets[b].kind, self.buckets[b].device);
            let weight = find(format!("weight.{b:05}"), s)?.to_device(device);
            self.m[b] = find(format!("m.{b:05}"), s)?.to_device(device);
            self.v[b] = find(format!("v.{b:05}"), s)?.to_device(device);
            if let Some(mut master) = self.master(b) {
                tch::no_grad(|| master.copy_(&weight));
            }
            if self.mode == ValueSharding::Optimizer {
                let mine = weight.to_kind(kind);
                collective.all_gather(&mine, &mut self.flat[b])?;
            }
        }
        Ok(())
    }
}
