//! The value-training objective (iro.md step 4): token-level Monte-Carlo regression of every response
//! prefix's value onto the sequence's final reward.
//!
//! Averaging: one flat mean over every target position of the *effective* batch,
//!
//! ```text
//! loss = 0.5 · Σ_{b,p} m[b,p] · (V[b,p] − r_b)²  /  Σ_{b,p} m[b,p]
//! ```
//!
//! i.e. longer responses weigh more, as in the official `scripts/value_training/c_train.py`
//! (`0.5 * masked_mean((vpred - returns)², ~padding_mask_p1)` with returns = r at every position, since
//! γ = λ = 1 and the only reward is the final one). The original takes that masked mean per micro-batch and
//! averages micro-batches; we divide every micro-batch's sum by the token count of the whole effective batch,
//! which equals the original when one micro-batch is the whole batch and, unlike it, does not depend on how
//! the batch is cut into micro-batches or shards (a data-parallel run gives the same gradient).

use tch::{Kind, Tensor};

/// `0.5 · Σ m·(V − r)²` over the target positions: the numerator of the loss, summed so micro-batches
/// (and ranks) add up. `values` [B, T], `target_mask` [B, T] bool, `rewards` [B].
pub fn squared_error_sum(values: &Tensor, target_mask: &Tensor, rewards: &Tensor) -> Tensor {
    let diff = values.to_kind(Kind::Float) - rewards.to_kind(Kind::Float).unsqueeze(1);
    let mask = target_mask.to_kind(Kind::Float);
    (diff.square() * mask).sum(Kind::Float) * 0.5
}

/// The loss of one batch on its own: `squared_error_sum / number of target positions`.
pub fn mc_value_loss(values: &Tensor, target_mask: &Tensor, rewards: &Tensor) -> Tensor {
    let count = target_mask.to_kind(Kind::Float).sum(Kind::Float).clamp_min(1.0);
    squared_error_sum(values, target_mask, rewards) / count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iro.md step 4 on a hand-computed example: two sequences, one with a masked-out (padding) position.
    #[test]
    fn loss_matches_hand_computation() {
        let values = Tensor::from_slice(&[9.0f32, 1.0, 2.0, 4.0, 0.5, 0.0, 1.0, 3.0]).view([2, 4]);
        let mask = Tensor::from_slice(&[false, true, true, true, true, true, true, true]).view([2, 4]);
        let rewards = Tensor::from_slice(&[2.0f32, 1.0]);
        // row 0 (first position is padding): (1-2)² + (2-2)² + (4-2)² = 1 + 0 + 4 = 5
        // row 1: (0.5-1)² + (0-1)² + (1-1)² + (3-1)² = 0.25 + 1 + 0 + 4 = 5.25
        // 0.5 · (5 + 5.25) / 7 positions
        let expected = 0.5 * 10.25 / 7.0;
        let got = mc_value_loss(&values, &mask, &rewards).double_value(&[]);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        let sum = squared_error_sum(&values, &mask, &rewards).double_value(&[]);
        assert!((sum - 0.5 * 10.25).abs() < 1e-6);
    }
}
