//! Frozen-backbone features for `head`-kind value training. The backbone never changes, so the final hidden
//! state at every target position of an example (the last prompt token through the last response token) is
//! the same at every epoch: it is computed once, on the example's first micro-batch, and the head trains on
//! the cached states. Hundreds of epochs then cost about as much as one forward pass per example; the loss
//! and its gradient are exactly those of running the backbone every time (per-position head, no dropout).

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::batch::{ValueExample, build_batch};
use crate::error::Result;
use crate::model::Backbone;

/// Per example index, its [targets, H] hidden states (f32, detached).
#[derive(Default)]
pub struct FeatureCache {
    by_example: HashMap<usize, Tensor>,
}

impl FeatureCache {
    pub fn len(&self) -> usize {
        self.by_example.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_example.is_empty()
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
            let refs: Vec<&ValueExample> = missing.iter().map(|(_, e)| *e).collect();
            let b = build_batch(&refs, pad_id, device)?;
            let hidden = tch::no_grad(|| backbone.forward(&b.ids, &b.valid, &b.positions, None)).to_kind(Kind::Float);
            let width = hidden.size()[1];
            for (row, (i, e)) in missing.iter().enumerate() {
                // Left padding puts an example's targets at the end of its row.
                let n = e.targets() as i64;
                let states = hidden.get(row as i64).narrow(0, width - n, n).detach().copy();
                self.by_example.insert(*i, states);
            }
        }
        let states: Vec<&Tensor> = examples.iter().map(|(i, _)| &self.by_example[i]).collect();
        let rewards: Vec<f32> =
            examples.iter().flat_map(|(_, e)| std::iter::repeat_n(e.reward as f32, e.targets())).collect();
        Ok((Tensor::cat(&states, 0), Tensor::from_slice(&rewards).to_device(device)))
    }
}
