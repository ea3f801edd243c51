//! The DPO objective (Rafailov et al. 2023), the baseline that changes the policy's weights (issue 15): for a
//! preference pair (prompt x, chosen y_w, rejected y_l), the policy π and the frozen reference π_ref,
//!
//!   loss = −log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]),
//!
//! averaged over the pairs, each log π the sum over the completion's tokens (TRL's `loss_type = "sigmoid"`, no
//! label smoothing). `tests/dpo.rs` checks loss and gradients against TRL's `DPOTrainer` on a fixture. The trainer
//! around it (data-parallel gang, checkpoints, publishing) is still to come.

use tch::{Kind, Tensor};

use crate::model::{CausalLm, positions_from_valid};

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
