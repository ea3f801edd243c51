//! Frozen-backbone features for `head`-kind value training. The backbone never changes, so the final hidden
//! state at every target position of an example (the last prompt token through the last response token) is
//! the same at every epoch: it is computed once, on the example's first micro-batch, and the head trains on
//! the cached states. Hundreds of epochs then cost about as much as one forward pass per example; the loss
//! and its gradient are exactly those of running the backbone every time (per-position head, no dropout).
//! Examples that share a prompt (several candidates of one prompt) prefill it once: the prompt runs through the
//! backbone with a KV cache, which is replicated to each response, and the responses are fed after it.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::batch::ValueExample;
use crate::error::Error;
use crate::error::Result;
use crate::generate::{left_pad, right_pad};
use crate::model::Backbone;
use crate::model::positions_from_valid;
use iro_common::config::ValuePooling;

/// Per example index, its [targets, H] hidden states (f32, detached).
#[derive(Default)]
pub struct FeatureCache {
    by_example: HashMap<usize, Tensor>,
    /// The states after this many decoder layers (then the final norm); `None`: the last layer's.
    depth: Option<usize>,
    /// What of an example's states a target reads (its own, or pooled over the prefix).
    pooling: ValuePooling,
}

impl FeatureCache {
    /// An empty cache of the states after the first `depth` decoder layers (`iro bench value --layers`).
    pub fn at_depth(depth: Option<usize>) -> Self {
        Self::pooled(depth, ValuePooling::Last)
    }

    /// An empty cache of the `pooling` features of the states after `depth` layers (`value.pooling`).
    pub fn pooled(depth: Option<usize>, pooling: ValuePooling) -> Self {
        Self { by_example: HashMap::new(), depth, pooling }
    }

    pub fn len(&self) -> usize {
        self.by_example.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_example.is_empty()
    }

    /// A cache whose example `j` is this one's example `keep[j]` (the same tensors, not copies): the states of a
    /// subset of the examples, indexed as that subset.
    pub fn select(&self, keep: &[usize]) -> FeatureCache {
        let by_example = keep
            .iter()
            .enumerate()
            .filter_map(|(j, i)| self.by_example.get(i).map(|t| (j, t.shallow_clone())))
            .collect();
        FeatureCache { by_example, depth: self.depth, pooling: self.pooling }
    }

    /// The micro-batch's target states [N, H] (N = Σ targets, in the order given) and the reward each target
    /// regresses onto [N], computing the states of examples seen for the first time in one forward pass.
    pub fn micro_batch(
        &mut self,
        backbone: &Backbone,
        examples: &[(usize, &ValueExample)],
        pad_id: i64,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        let missing: Vec<(usize, &ValueExample)> =
            examples.iter().copied().filter(|(i, _)| !self.by_example.contains_key(i)).collect();
        if !missing.is_empty() {
            for (i, states) in missing
                .iter()
                .map(|(i, _)| *i)
                .zip(shared_prompt_states(backbone, &missing, pad_id, device, self.depth)?)
            {
                self.by_example.insert(i, pool_prefixes(&states, self.pooling));
            }
        }
        let states: Vec<&Tensor> = examples.iter().map(|(i, _)| &self.by_example[i]).collect();
        let rewards: Vec<f32> =
            examples.iter().flat_map(|(_, e)| std::iter::repeat_n(e.reward as f32, e.targets())).collect();
        Ok((Tensor::cat(&states, 0), Tensor::from_slice(&rewards).to_device(device)))
    }

    /// Every example's target states [N, H] (N = Σ targets), the reward of each row [N], and each row's prompt (a
    /// dense id shared by the examples whose prompt tokens are equal), computing missing states `chunk` examples
    /// at a time. Example `i` of `examples` is this cache's example `i`.
    pub fn all_rows(
        &mut self,
        backbone: &Backbone,
        examples: &[ValueExample],
        pad_id: i64,
        device: Device,
        chunk: usize,
    ) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let keyed: Vec<(usize, &ValueExample)> = examples.iter().enumerate().collect();
        let (mut states, mut rewards) = (Vec::new(), Vec::new());
        for part in keyed.chunks(chunk.max(1)) {
            let (s, r) = self.micro_batch(backbone, part, pad_id, device)?;
            states.push(s);
            rewards.push(r);
        }
        let mut prompts: HashMap<&[i64], usize> = HashMap::new();
        let mut groups = Vec::new();
        for e in examples {
            let next = prompts.len();
            let g = *prompts.entry(e.prompt.as_slice()).or_insert(next);
            groups.extend(std::iter::repeat_n(g, e.targets()));
        }
        Ok((Tensor::cat(&states, 0), Tensor::cat(&rewards, 0), groups))
    }
}

/// Row k of the [n, H] states of one sequence's prefixes, pooled as `pooling` says over rows 0..=k: the state
/// itself, the running mean, or both concatenated ([n, 2H]). The decoder pools its rows the same way
/// (`Decoder::scoring_features`), so training and guidance read the same features.
pub fn pool_prefixes(states: &Tensor, pooling: ValuePooling) -> Tensor {
    let mean = || {
        let n = states.size()[0];
        let counts = Tensor::arange_start(1, n + 1, (Kind::Float, states.device())).unsqueeze(1);
        states.cumsum(0, Kind::Float) / counts
    };
    pool(pooling, || states.shallow_clone(), mean)
}

/// Per row i of `hidden` [B, T, H] (one forward over whole sequences), the `pooling` features of the prefix whose
/// last token sits in column `ends[i]` and whose prompt's last token sits in column `starts[i]`: what
/// `pool_prefixes` gives that prefix when the states are fed token by token.
pub fn pool_columns(hidden: &Tensor, starts: &[i64], ends: &[i64], pooling: ValuePooling) -> Tensor {
    let device = hidden.device();
    let rows = Tensor::arange(starts.len() as i64, (Kind::Int64, device));
    let column = |c: &[i64]| Tensor::from_slice(c).to_device(device);
    let last = || hidden.index(&[Some(rows.shallow_clone()), Some(column(ends))]);
    let mean = || {
        let (b, _, h) = hidden.size3().expect("hidden states [B, T, H]");
        // Prefix sums with a zero column in front: the span's sum is a difference of two of them.
        let sums = Tensor::cat(&[Tensor::zeros([b, 1, h], (Kind::Float, device)), hidden.cumsum(1, Kind::Float)], 1);
        let after: Vec<i64> = ends.iter().map(|e| e + 1).collect();
        let span = sums.index(&[Some(rows.shallow_clone()), Some(column(&after))])
            - sums.index(&[Some(rows.shallow_clone()), Some(column(starts))]);
        let counts: Vec<f32> = starts.iter().zip(ends).map(|(s, e)| (e - s + 1) as f32).collect();
        span / Tensor::from_slice(&counts).to_device(device).unsqueeze(1)
    };
    pool(pooling, last, mean)
}

/// The features `pooling` reads, from the last state and the mean (each computed only when needed): the one place
/// that fixes `last_mean`'s layout (last, then mean), which training, guidance and the diagnostics must share.
pub fn pool(pooling: ValuePooling, last: impl FnOnce() -> Tensor, mean: impl FnOnce() -> Tensor) -> Tensor {
    match pooling {
        ValuePooling::Last => last(),
        ValuePooling::Mean => mean(),
        ValuePooling::LastMean => Tensor::cat(&[last().to_kind(Kind::Float), mean()], 1),
    }
}

/// The [targets, H] states of each example: the prompt's last token (from one prefill per distinct prompt)
/// followed by every response token (fed through the replicated prompt cache).
fn shared_prompt_states(
    backbone: &Backbone,
    examples: &[(usize, &ValueExample)],
    pad_id: i64,
    device: Device,
    depth: Option<usize>,
) -> Result<Vec<Tensor>> {
    if let Some((_, e)) = examples.iter().find(|(_, e)| e.prompt.is_empty()) {
        return Err(Error::InvalidRequest(format!(
            "value training example with an empty prompt (response of {} tokens): the empty prefix needs a prompt token",
            e.response.len()
        )));
    }
    let mut prompts: Vec<&[i64]> = Vec::new();
    let mut which = Vec::with_capacity(examples.len());
    for (_, e) in examples {
        let p = match prompts.iter().position(|p| *p == e.prompt.as_slice()) {
            Some(p) => p,
            None => {
                prompts.push(&e.prompt);
                prompts.len() - 1
            }
        };
        which.push(p as i64);
    }
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let longest = examples.iter().map(|(_, e)| e.response.len()).max().unwrap_or(0);
    tch::no_grad(|| {
        let (ids, valid) = left_pad(&prompts, width, pad_id, device);
        let positions = positions_from_valid(&valid);
        let mut cache = backbone.new_cache(prompts.len() as i64, (width + longest) as i64);
        let prompt_hidden = backbone.forward_to_depth(&ids, &valid, &positions, Some(&mut cache), depth).select(1, -1);
        let index = Tensor::from_slice(&which).to_device(device);
        let last = prompt_hidden.index_select(0, &index).to_kind(Kind::Float);
        if longest == 0 {
            return Ok((0..examples.len() as i64).map(|r| last.narrow(0, r, 1).copy()).collect());
        }
        cache.reorder(&index);
        let responses: Vec<&[i64]> = examples.iter().map(|(_, e)| e.response.as_slice()).collect();
        let (ids, valid) = right_pad(&responses, longest, pad_id, device);
        let next = positions.select(1, -1).index_select(0, &index) + 1;
        let positions = next.unsqueeze(1) + Tensor::arange(longest as i64, (Kind::Int64, device)).unsqueeze(0);
        let hidden = backbone.forward_to_depth(&ids, &valid, &positions, Some(&mut cache), depth).to_kind(Kind::Float);
        Ok(examples
            .iter()
            .enumerate()
            .map(|(r, (_, e))| {
                let r = r as i64;
                let response = hidden.get(r).narrow(0, 0, e.response.len() as i64);
                Tensor::cat(&[last.narrow(0, r, 1), response], 0).detach().copy()
            })
            .collect())
    })
}
