//! AdamW written out on tensors (Loshchilov & Hutter; PyTorch's `AdamW` update), a cosine learning-rate
//! schedule without warm-up, and the gradient-accumulation helpers. The step is separate from backward so
//! a data-parallel trainer can all-reduce the gradients in between.

use std::f64::consts::PI;

use tch::{Kind, Tensor};

/// Learning rate for optimizer step `step` (0-based) of `total`: `lr · ½(1 + cos(π · step / total))`,
/// as transformers' cosine schedule with no warm-up (the first step uses the full lr).
pub fn cosine_lr(lr: f64, step: usize, total: usize) -> f64 {
    if total == 0 {
        return lr;
    }
    let progress = (step as f64 / total as f64).min(1.0);
    lr * 0.5 * (1.0 + (PI * progress).cos())
}

/// Backpropagates one micro-batch's share of the effective-batch loss: `loss_sum · scale` (the scale being
/// 1 / the effective batch's target count, see `loss`). libtorch adds the gradients into `.grad`.
pub fn accumulate(loss_sum: &Tensor, scale: f64) {
    (loss_sum * scale).backward();
}

/// Clears the accumulated gradients before the next effective batch.
pub fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's AdamW defaults (weight decay 0.01), except eps: 1e-5 is the paper's.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-5, weight_decay: 0.01 }
    }
}

/// AdamW state: first and second moments per parameter (f32, whatever the parameter's dtype) and the number
/// of steps taken (for the bias correction); for parameters below f32 (bf16 mixed precision), an f32 master copy
/// of each, which the updates accumulate in (a bf16 weight would round most of a 3e-6 step away).
pub struct AdamW {
    pub config: AdamWConfig,
    pub steps: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// f32 master weights, one per parameter, when the parameters are not f32.
    pub master: Option<Vec<Tensor>>,
}

impl AdamW {
    /// Zero moments shaped like `params` (and f32 master copies of them when they are not f32).
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros(p.size(), (Kind::Float, p.device()));
        let master = params
            .iter()
            .any(|p| p.kind() != Kind::Float)
            .then(|| tch::no_grad(|| params.iter().map(|p| p.detach().to_kind(Kind::Float).copy()).collect()));
        Self { config, steps: 0, m: params.iter().map(zeros).collect(), v: params.iter().map(zeros).collect(), master }
    }

    /// Copies the parameters into the f32 master weights again (after the gang's broadcast replaced them).
    pub fn sync_master(&mut self, params: &[Tensor]) {
        if let Some(master) = self.master.as_mut() {
            tch::no_grad(|| {
                for (w, p) in master.iter_mut().zip(params) {
                    w.copy_(p);
                }
            });
        }
    }

    /// One update of every parameter from its `.grad` (parameters without a gradient are skipped, as in
    /// PyTorch). Decoupled weight decay: `p ← p·(1 − lr·wd)` before the Adam step
    /// `p ← p − lr · m̂ / (√v̂ + eps)`.
    pub fn step(&mut self, params: &[Tensor], lr: f64) {
        self.steps += 1;
        tch::no_grad(|| {
            for (i, ((p, m), v)) in params.iter().zip(&mut self.m).zip(&mut self.v).enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let master = self.master.as_mut().map(|w| &mut w[i]);
                let current = master.as_ref().map_or_else(|| p.to_kind(Kind::Float), |w| w.shallow_clone());
                let w = adamw_update(&self.config, self.steps, &current, &g, m, v, lr);
                if let Some(master) = master {
                    master.copy_(&w);
                }
                let mut p = p.shallow_clone();
                // `copy_` rounds to the parameter's dtype.
                p.copy_(&w);
            }
        });
    }
}

/// One AdamW update of f32 weights `w` (any shape: a whole tensor or a flat shard of several) by gradient `g`,
/// moving the moments `m` and `v` in place, as step number `steps` (from 1). Returns the new weights. Both the
/// replicated optimizer and the sharded one call this, so a shard is updated by exactly the same arithmetic as
/// the same elements of the whole tensor.
pub(crate) fn adamw_update(
    config: &AdamWConfig,
    steps: u64,
    w: &Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    lr: f64,
) -> Tensor {
    let AdamWConfig { beta1, beta2, eps, weight_decay } = *config;
    let t = steps as i32;
    let bc1 = 1.0 - beta1.powi(t);
    let bc2 = 1.0 - beta2.powi(t);
    let g = g.to_kind(Kind::Float);
    let _ = m.g_mul_scalar_(beta1).g_add_(&(&g * (1.0 - beta1)));
    let _ = v.g_mul_scalar_(beta2).g_add_(&(g.square() * (1.0 - beta2)));
    let w = if weight_decay != 0.0 { w * (1.0 - lr * weight_decay) } else { w.shallow_clone() };
    let denom = (&*v / bc2).sqrt() + eps;
    let update = (&*m / bc1) / denom * lr;
    w - update
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_ends_at_zero() {
        assert_eq!(cosine_lr(1.0, 0, 10), 1.0);
        assert!((cosine_lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 10, 10).abs() < 1e-12);
    }

    /// First AdamW step moves every parameter by lr · sign(g) (m̂ = g, v̂ = g²), less the decay.
    #[test]
    fn adamw_first_step_matches_closed_form() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, -0.5])).sum(Kind::Float).backward();
        let config = AdamWConfig { weight_decay: 0.1, eps: 0.0, ..Default::default() };
        let mut opt = AdamW::new(config, std::slice::from_ref(&p));
        opt.step(std::slice::from_ref(&p), 0.01);
        let got: Vec<f32> = Vec::try_from(p.detach()).unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
