//! The implicit reward of Weak-to-Strong Search: a small tuned/untuned model pair scores a partial response by
//! `log pi_tuned(y | x) − log pi_untuned(y | x)` (summed over the response tokens so far). Used as a CBS scorer
//! it gives the Weak-to-Strong baseline; both models must share the policy's tokenizer.

use tch::{Device, Kind, Tensor};

use super::PrefixScorer;
use crate::error::{Error, Result};
use crate::generate::left_pad;
use crate::model::{CausalLm, positions_from_valid};

pub struct ImplicitReward<'m> {
    tuned: &'m CausalLm,
    untuned: &'m CausalLm,
    /// Rows per forward pass: the logits of a row are [T, vocab], so keep batches small.
    batch: usize,
}

impl<'m> ImplicitReward<'m> {
    pub fn new(tuned: &'m CausalLm, untuned: &'m CausalLm) -> Result<Self> {
        if tuned.config.vocab_size() != untuned.config.vocab_size() {
            return Err(Error::InvalidRequest(format!(
                "weak-to-strong pair: the tuned model's vocabulary ({}) differs from the untuned one's ({})",
                tuned.config.vocab_size(),
                untuned.config.vocab_size()
            )));
        }
        Ok(Self { tuned, untuned, batch: 4 })
    }
}

/// Σ over each row's response tokens of log p(token | everything before it).
pub fn response_logprob(model: &CausalLm, prompts: &[Vec<i64>], responses: &[Vec<i64>]) -> Vec<f64> {
    let _g = tch::no_grad_guard();
    let device = model.backbone.device();
    let seqs: Vec<Vec<i64>> = prompts.iter().zip(responses).map(|(p, r)| [p.as_slice(), r].concat()).collect();
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if width < 2 {
        return vec![0.0; seqs.len()];
    }
    let (ids, valid) = left_pad(&seqs, width, 0, device);
    let positions = positions_from_valid(&valid);
    let logp = model.forward(&ids, &valid, &positions, None).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    // Position j predicts token j + 1.
    let next = ids.narrow(1, 1, width as i64 - 1);
    let picked = logp.narrow(1, 0, width as i64 - 1).gather(2, &next.unsqueeze(-1), false).squeeze_dim(-1);
    let mut mask = vec![false; seqs.len() * (width - 1)];
    for (r, resp) in responses.iter().enumerate() {
        // The response occupies the last |r| positions of the row; predicted from positions width-1-|r| ...
        for j in (width - 1 - resp.len())..(width - 1) {
            mask[r * (width - 1) + j] = true;
        }
    }
    let mask = Tensor::from_slice(&mask).view([seqs.len() as i64, width as i64 - 1]).to_device(device);
    let sums = (picked * mask.to_kind(Kind::Float)).sum_dim_intlist(-1, false, Kind::Double);
    Vec::try_from(sums.to_device(Device::Cpu)).expect("f64 sums")
}

impl PrefixScorer for ImplicitReward<'_> {
    fn score(&mut self, prompts: &[Vec<i64>], responses: &[Vec<i64>], _finished: &[bool]) -> Result<Vec<f64>> {
        if prompts.len() != responses.len() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::InvalidRequest("implicit reward: one non-empty prompt per response".into()));
        }
        let mut out = Vec::with_capacity(prompts.len());
        for (p, r) in prompts.chunks(self.batch).zip(responses.chunks(self.batch)) {
            let t = response_logprob(self.tuned, p, r);
            let u = response_logprob(self.untuned, p, r);
            out.extend(t.iter().zip(&u).map(|(a, b)| a - b));
        }
        Ok(out)
    }
}
