//! Training batches for the value function: prompt ⊕ response left-padded, with the positions whose value
//! is regressed onto the reward (the last prompt token — the empty response prefix — through the last
//! response token).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::generate::left_pad;
use crate::model::positions_from_valid;

/// One training sequence: the prompt and response token ids (the response already cut after its EOS) and
/// the reward of the whole response.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueExample {
    pub prompt: Vec<i64>,
    pub response: Vec<i64>,
    pub reward: f64,
}

impl ValueExample {
    /// Positions the loss reads: |y| + 1 prefixes (k = 0..|y|).
    pub fn targets(&self) -> usize {
        self.response.len() + 1
    }
}

/// A padded batch ready for a forward pass.
pub struct ValueBatch {
    /// [B, T] token ids, left-padded with the pad id.
    pub ids: Tensor,
    /// [B, T] true on real tokens.
    pub valid: Tensor,
    /// [B, T] rotary positions (index among the row's real tokens).
    pub positions: Tensor,
    /// [B, T] true from the last prompt token through the last response token: the value at position p
    /// predicts the reward given the tokens ≤ p.
    pub target_mask: Tensor,
    /// [B] f32.
    pub rewards: Tensor,
}

pub fn build_batch(examples: &[&ValueExample], pad_id: i64, device: Device) -> Result<ValueBatch> {
    if examples.is_empty() {
        return Err(Error::InvalidRequest("value training batch is empty".into()));
    }
    if let Some(e) = examples.iter().find(|e| e.prompt.is_empty()) {
        return Err(Error::InvalidRequest(format!(
            "value training example with an empty prompt (response of {} tokens): the empty prefix needs a prompt token",
            e.response.len()
        )));
    }
    let rows: Vec<Vec<i64>> = examples.iter().map(|e| [e.prompt.as_slice(), e.response.as_slice()].concat()).collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (ids, valid) = left_pad(&rows, width, pad_id, device);
    let mut target = vec![false; rows.len() * width];
    for (r, e) in examples.iter().enumerate() {
        let end = (r + 1) * width;
        target[end - e.targets()..end].fill(true);
    }
    let shape = [rows.len() as i64, width as i64];
    let target_mask = Tensor::from_slice(&target).view(shape).to_kind(Kind::Bool).to_device(device);
    let rewards: Vec<f32> = examples.iter().map(|e| e.reward as f32).collect();
    let positions = positions_from_valid(&valid);
    Ok(ValueBatch { ids, valid, positions, target_mask, rewards: Tensor::from_slice(&rewards).to_device(device) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_mask_spans_last_prompt_token_to_end() {
        let a = ValueExample { prompt: vec![5, 6], response: vec![7, 8, 9], reward: 1.0 };
        let b = ValueExample { prompt: vec![4], response: vec![3], reward: -1.0 };
        let batch = build_batch(&[&a, &b], 0, Device::Cpu).unwrap();
        let mask: Vec<bool> = Vec::try_from(batch.target_mask.flatten(0, -1)).unwrap();
        let valid: Vec<bool> = Vec::try_from(batch.valid.flatten(0, -1)).unwrap();
        let ids: Vec<i64> = Vec::try_from(batch.ids.flatten(0, -1)).unwrap();
        assert_eq!(ids, [5, 6, 7, 8, 9, 0, 0, 0, 4, 3]);
        assert_eq!(valid, [true, true, true, true, true, false, false, false, true, true]);
        assert_eq!(mask, [false, true, true, true, true, false, false, false, true, true]);
    }
}
