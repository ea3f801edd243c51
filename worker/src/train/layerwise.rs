//! Activation checkpointing per decoder layer (`[value] activation_checkpointing`) and, with `full` sharding,
//! ZeRO-3's layer-by-layer weight gathering. A micro-batch runs forward without an autograd graph, keeping only
//! each layer's input; the backward then goes from the head down, recomputing one layer at a time with its graph
//! and backpropagating it alone (its output's gradient is the one the layer above handed down). So at most one
//! layer's activations exist at a time, plus one [B, T, H] input per layer.
//!
//! The same schedule is what lets a sharded rank hold only one layer's whole weights at a time: each stage
//! (embeddings, each decoder layer, the final norm with the score head) is one bucket of the
//! [`ShardedState`], all-gathered just before the stage runs in the forward and again before its recompute,
//! freed right after each, and its gradient reduce-scattered as soon as its backward is done.

use tch::Tensor;

use super::batch::ValueBatch;
use super::loss::squared_error_sum;
use super::shard::ShardedState;
use super::value::{TrainableValue, canonical_prefix};
use crate::collective::Collective;
use crate::error::{Error, Result};

/// The trainable tensors of a `model` value function (indices into [`TrainableValue::params`]) by the stage that
/// uses them: 0 the embeddings, 1..=L decoder layer 0..L-1, L+1 the final norm and the score head.
pub fn stage_groups(value: &TrainableValue) -> Result<Vec<Vec<usize>>> {
    let TrainableValue::Model { model, params } = value else {
        return Err(Error::InvalidRequest(
            "value.activation_checkpointing needs value.kind = \"model\" (a `head` has no decoder layers to recompute)"
                .into(),
        ));
    };
    let layers = model.backbone.num_layers();
    let prefix = canonical_prefix(&model.config);
    let mut groups = vec![Vec::new(); layers + 2];
    for (i, (name, _)) in params.iter().enumerate() {
        let rest = name.strip_prefix(prefix).unwrap_or(name);
        let stage = match rest.strip_prefix("layers.") {
            Some(tail) => {
                let layer: usize =
                    tail.split('.').next().and_then(|n| n.parse().ok()).filter(|&l| l < layers).ok_or_else(|| {
                        Error::InvalidRequest(format!("trainable tensor `{name}` names no layer of the {layers}"))
                    })?;
                layer + 1
            }
            None if rest.starts_with("embed") => 0,
            None => layers + 1,
        };
        groups[stage].push(i);
    }
    if let Some(s) = groups.iter().position(Vec::is_empty) {
        return Err(Error::InvalidRequest(format!("stage {s} of the value model has no trainable tensor")));
    }
    Ok(groups)
}

/// Where a checkpointed micro-batch's gradients go, and who gathers the weights.
pub enum Grads<'a> {
    /// Into `.grad`, as `backward` leaves them (no sharding: the plain all-reduce and AdamW follow).
    Replicated,
    /// Into the shards: each stage is gathered before it runs and reduce-scattered after its backward.
    Sharded { shards: &'a mut ShardedState, collective: &'a mut dyn Collective },
}

impl Grads<'_> {
    fn gather(&mut self, stage: usize) -> Result<()> {
        match self {
            Grads::Replicated => Ok(()),
            Grads::Sharded { shards, collective } => shards.gather_bucket(stage, *collective),
        }
    }

    fn release(&mut self, stage: usize) {
        if let Grads::Sharded { shards, .. } = self {
            shards.release_bucket(stage);
        }
    }

    /// Backpropagates the scalar `root` into stage `stage`'s tensors (`stage_params`) and `input` (a leaf),
    /// and returns `input`'s gradient; with shards, reduce-scatters the stage's gradient and frees its weights.
    fn backprop(
        &mut self,
        stage: usize,
        root: Option<&Tensor>,
        input: Option<&Tensor>,
        stage_params: &[Tensor],
    ) -> Result<Option<Tensor>> {
        let grad_in = match self {
            Grads::Replicated => match root {
                Some(root) => {
                    root.backward();
                    input.map(Tensor::grad)
                }
                None => None,
            },
            Grads::Sharded { shards, collective } => {
                let grad_in = match root {
                    Some(root) => {
                        let mut wrt: Vec<Tensor> = input.iter().map(|x| x.shallow_clone()).collect();
                        wrt.extend(stage_params.iter().map(Tensor::shallow_clone));
                        let mut grads = Tensor::run_backward(&[root], &wrt, false, false);
                        let grad_in = input.map(|_| grads.remove(0));
                        shards.add_grads(stage, &grads);
                        grad_in
                    }
                    None => None,
                };
                shards.reduce_bucket(stage, *collective)?;
                grad_in
            }
        };
        self.release(stage);
        Ok(grad_in)
    }
}

/// One micro-batch (`batch`; `None` on a rank that has none this round but must still join every collective)
/// through the checkpointed schedule of the module docs, backpropagating `loss_sum · scale`. `groups` are the
/// [`stage_groups`]; `probe` is called wherever this pass's memory peaks (after the forward, after each layer's
/// recompute), so a test can measure it. Returns the micro-batch's loss sum (0 without a batch).
pub fn checkpointed_micro(
    value: &TrainableValue,
    groups: &[Vec<usize>],
    batch: Option<&ValueBatch>,
    scale: f64,
    grads: &mut Grads<'_>,
    probe: &mut dyn FnMut(),
) -> Result<f64> {
    let TrainableValue::Model { model, .. } = value else {
        return Err(Error::InvalidRequest("activation checkpointing needs value.kind = \"model\"".into()));
    };
    let params = value.params();
    let stage_params = |s: usize| -> Vec<Tensor> { groups[s].iter().map(|&i| params[i].shallow_clone()).collect() };
    let backbone = &model.backbone;
    let layers = backbone.num_layers();
    let mut pass = batch.map(|b| backbone.begin(&b.valid, &b.positions));

    // Forward without a graph: keep each layer's input.
    let mut inputs: Vec<Tensor> = Vec::with_capacity(layers + 1);
    grads.gather(0)?;
    if let Some(b) = batch {
        inputs.push(tch::no_grad(|| backbone.embed(&b.ids)));
    }
    grads.release(0);
    for i in 0..layers {
        grads.gather(i + 1)?;
        let next = match (inputs.last(), pass.as_mut()) {
            (Some(x), Some(pass)) => Some(tch::no_grad(|| backbone.layer(i, x, pass))),
            _ => None,
        };
        inputs.extend(next);
        grads.release(i + 1);
    }
    probe();

    // The head: final norm, score, loss; its gradient flows into the last layer's output.
    let mut loss_sum = 0.0;
    grads.gather(layers + 1)?;
    let leaf = |x: &Tensor| x.detach().set_requires_grad(true);
    let top = inputs.pop().map(|x| leaf(&x));
    let root = match (batch, &top) {
        (Some(b), Some(h)) => {
            let values = model.head.forward(&backbone.finish(h)).to_kind(tch::Kind::Float);
            let sum = squared_error_sum(&values, &b.target_mask, &b.rewards);
            loss_sum = sum.double_value(&[]);
            Some(sum * scale)
        }
        _ => None,
    };
    let mut grad_out = grads.backprop(layers + 1, root.as_ref(), top.as_ref(), &stage_params(layers + 1))?;

    // Down the layers: recompute each with its graph, backpropagate it alone.
    for i in (0..layers).rev() {
        grads.gather(i + 1)?;
        let x = inputs.pop().map(|x| leaf(&x));
        let root = match (&x, pass.as_mut(), &grad_out) {
            (Some(x), Some(pass), Some(g)) => {
                let y = backbone.layer(i, x, pass);
                probe();
                Some((y * g).sum(tch::Kind::Float))
            }
            _ => None,
        };
        grad_out = grads.backprop(i + 1, root.as_ref(), x.as_ref(), &stage_params(i + 1))?;
    }

    // The embeddings: the gradient of layer 0's input lands on the rows the tokens picked.
    grads.gather(0)?;
    let root = match (batch, &grad_out) {
        (Some(b), Some(g)) => Some((backbone.embed(&b.ids) * g).sum(tch::Kind::Float)),
        _ => None,
    };
    grads.backprop(0, root.as_ref(), None, &stage_params(0))?;
    Ok(loss_sum)
}
