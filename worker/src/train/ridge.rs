//! Closed-form linear value heads (`value.head_fit = "ridge"`, our addition): V(prefix) = w·h + b on the frozen
//! policy's final hidden state h, fitted by ridge regression of every target position onto its sequence's reward
//! (the same Monte-Carlo targets and the same token weighting as the AdamW loss), with the shrinkage chosen by
//! cross-validation over held-out *prompts*.
//!
//! Why: a fresh MLP head trained by AdamW on a few hundred candidates drives its loss far below the constant
//! predictor's and still orders a new prompt's candidates near chance (README, quality section): it memorises
//! which training prompt a state belongs to. The backbone is frozen, so the head is a regression on fixed
//! features; ridge solves it exactly, and choosing the shrinkage by how well the fit predicts prompts it has not
//! seen is what a held-out concordance rewards. The whole fit is a few H×H solves (H = 576 for SmolLM2-135M).
//!
//! Centring: with `prompt_centred` targets the features are centred per prompt too (the fixed-effects, or
//! "within", estimator): w then learns only from how candidates of one prompt differ, which is all CBS compares;
//! with `reward` targets the fit is pooled over prompts (one overall mean). Features are scaled to unit variance
//! before the fit (a few dimensions of a transformer's last state are orders of magnitude larger than the rest,
//! and one shrinkage must suit them all); w is mapped back, so the saved head reads the raw state.
//!
//! Warm start: with a prior head (V_{t-1}), the fit shrinks towards it instead of towards 0,
//! `min ‖y − X w‖² + λ ‖w − w_prev‖²`, so new data moves V only as far as cross-validation says it predicts.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Shrinkage candidates, as multiples of the number of rows (the features have unit variance, so `α = 1` weighs
/// the penalty like the data's own diagonal). Half-decades from almost none to far more than the data.
pub const ALPHAS: [f64; 11] = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0];

/// How `fit_ridge` centres before fitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Centring {
    /// One overall mean of features and targets (the intercept).
    Pooled,
    /// Each prompt's own mean of features and targets (the slope learns only within prompts).
    WithinPrompt,
}

/// A fitted linear head and how it was chosen.
#[derive(Debug)]
pub struct RidgeFit {
    /// [1, H] f32, on the raw (unscaled) features.
    pub weight: Tensor,
    /// [1] f32: the overall mean target minus w·(the overall mean state), so V averages what the targets average.
    pub bias: Tensor,
    /// The chosen multiple of the row count (one of `ALPHAS`).
    pub alpha: f64,
    /// Cross-validated loss of that choice, `0.5 · mean (y − ŷ)²` over the held-out folds' rows (centred targets).
    pub cv_loss: f64,
    /// The final fit's loss on all rows, in the units of the AdamW loss: `0.5 · mean (V − r)²`.
    pub train_loss: f64,
    /// Folds actually used (at most the number of prompts).
    pub folds: usize,
}

/// Fits `V = w·h + b` to `targets` [N] from `states` [N, H]; `groups[i]` is row i's prompt (rows of one prompt
/// stay in one fold). `prior`: the weight [1, H] to shrink towards. Needs at least two prompts.
pub fn fit_ridge(
    states: &Tensor,
    targets: &Tensor,
    groups: &[usize],
    centring: Centring,
    prior: Option<&Tensor>,
    folds: usize,
) -> Result<RidgeFit> {
    let (n, h) = match states.size()[..] {
        [n, h] => (n, h),
        _ => return Err(Error::InvalidRequest(format!("ridge: states must be [N, H], got {:?}", states.size()))),
    };
    if targets.size() != [n] || groups.len() != n as usize {
        return Err(Error::InvalidRequest(format!(
            "ridge: {n} state rows but targets {:?} and {} group labels",
            targets.size(),
            groups.len()
        )));
    }
    if let Some(p) = prior
        && p.size() != [1, h]
    {
        return Err(Error::InvalidRequest(format!("ridge: prior weight is {:?}, the states need [1, {h}]", p.size())));
    }
    // Dense prompt ids in order of first appearance.
    let mut dense = std::collections::HashMap::new();
    let ids: Vec<i64> = groups
        .iter()
        .map(|g| {
            let next = dense.len() as i64;
            *dense.entry(*g).or_insert(next)
        })
        .collect();
    let prompts = dense.len();
    if prompts < 2 {
        return Err(Error::InvalidRequest(format!(
            "ridge: {prompts} prompt(s) in the training data; choosing the shrinkage needs at least 2 to hold one out"
        )));
    }
    let folds = folds.clamp(2, prompts);
    tch::no_grad(|| {
        let opts = (Kind::Double, Device::Cpu);
        let x = states.to_device(Device::Cpu).to_kind(Kind::Double);
        let y = targets.to_device(Device::Cpu).to_kind(Kind::Double);
        let (mean_x, mean_y) = (x.mean_dim(0, false, Kind::Double), y.mean(Kind::Double));
        let (xc, yc) = match centring {
            Centring::Pooled => (&x - &mean_x, &y - &mean_y),
            Centring::WithinPrompt => {
                let g = Tensor::from_slice(&ids);
                let count = Tensor::zeros([prompts as i64], opts).index_add(0, &g, &Tensor::ones([n], opts));
                let gx = Tensor::zeros([prompts as i64, h], opts).index_add(0, &g, &x) / count.unsqueeze(1);
                let gy = Tensor::zeros([prompts as i64], opts).index_add(0, &g, &y) / &count;
                (&x - gx.index_select(0, &g), &y - gy.index_select(0, &g))
            }
        };
        let w0 = prior
            .map_or_else(|| Tensor::zeros([h], opts), |p| p.to_device(Device::Cpu).to_kind(Kind::Double).view([h]));
        // The part of the (centred) targets the prior does not already explain.
        let r = &yc - xc.mv(&w0);
        let scale = xc.square().mean_dim(0, false, Kind::Double).sqrt().clamp_min(1e-12);
        let z = &xc / &scale;

        // Per fold, its rows' Gram matrix and moment; the fit without fold f uses the totals minus fold f's.
        let fold_of: Vec<i64> = ids.iter().map(|&g| g % folds as i64).collect();
        let fold_of = Tensor::from_slice(&fold_of);
        let mut parts = Vec::with_capacity(folds);
        for f in 0..folds as i64 {
            let rows = fold_of.eq(f).nonzero().squeeze_dim(1);
            let (zf, rf) = (z.index_select(0, &rows), r.index_select(0, &rows));
            parts.push((zf.tr().mm(&zf), zf.tr().mv(&rf), zf, rf));
        }
        let gram = parts.iter().map(|p| p.0.shallow_clone()).reduce(|a, b| a + b).expect("folds ≥ 2");
        let moment = parts.iter().map(|p| p.1.shallow_clone()).reduce(|a, b| a + b).expect("folds ≥ 2");
        let eye = Tensor::eye(h, opts);
        let solve = |a: &Tensor, b: &Tensor| Tensor::linalg_solve(a, &b.unsqueeze(1), true).squeeze_dim(1);
        let mut best = (f64::INFINITY, ALPHAS[0]);
        for alpha in ALPHAS {
            let lambda = alpha * n as f64;
            let mut sse = 0.0;
            for (gf, cf, zf, rf) in &parts {
                let w = solve(&(&gram - gf + &eye * lambda), &(&moment - cf));
                sse += (rf - zf.mv(&w)).square().sum(Kind::Double).double_value(&[]);
            }
            let cv = 0.5 * sse / n as f64;
            if cv < best.0 {
                best = (cv, alpha);
            }
        }
        let (cv_loss, alpha) = best;
        let w = solve(&(&gram + &eye * (alpha * n as f64)), &moment) / &scale + &w0;
        let bias = &mean_y - mean_x.dot(&w);
        let train_loss = 0.5 * (x.mv(&w) + &bias - &y).square().mean(Kind::Double).double_value(&[]);
        if !train_loss.is_finite() {
            return Err(Error::InvalidRequest(format!(
                "ridge: the fit is not finite (alpha {alpha}); the states or targets hold NaN or infinity"
            )));
        }
        Ok(RidgeFit {
            weight: w.to_kind(Kind::Float).view([1, h]),
            bias: bias.to_kind(Kind::Float).view([1]),
            alpha,
            cv_loss,
            train_loss,
            folds,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `prompts` prompts: a per-prompt offset on the target and on the states (which prompt scores high),
    /// plus a within-prompt signal `y = x·w_true` and noise.
    fn data(prompts: usize, per: usize, h: i64, noise: f64, seed: i64) -> (Tensor, Tensor, Vec<usize>, Tensor) {
        tch::manual_seed(seed);
        let n = (prompts * per) as i64;
        let opts = (Kind::Float, Device::Cpu);
        let w_true = Tensor::randn([h], opts);
        let groups: Vec<usize> = (0..n as usize).map(|i| i / per).collect();
        let g = Tensor::from_slice(&groups.iter().map(|&g| g as i64).collect::<Vec<_>>());
        let offsets = Tensor::randn([prompts as i64, h], opts) * 3.0;
        let x = Tensor::randn([n, h], opts) + offsets.index_select(0, &g);
        let y = x.mv(&w_true) * 0.1 + Tensor::randn([n], opts) * noise + 5.0;
        (x, y, groups, w_true)
    }

    fn cosine(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.view([-1]).to_kind(Kind::Double), b.view([-1]).to_kind(Kind::Double));
        (a.dot(&b) / (a.norm() * b.norm())).double_value(&[])
    }

    #[test]
    fn recovers_a_linear_signal_and_its_offset() {
        let (x, y, groups, w_true) = data(40, 6, 8, 0.01, 1);
        for centring in [Centring::Pooled, Centring::WithinPrompt] {
            let fit = fit_ridge(&x, &y, &groups, centring, None, 5).unwrap();
            assert!(cosine(&fit.weight, &w_true) > 0.99, "{centring:?}: direction {}", cosine(&fit.weight, &w_true));
            // Noise s.d. 0.01: the fit's loss is that of the noise, 0.5 · 1e-4, not the targets' variance.
            assert!(fit.train_loss < 2e-4, "{centring:?}: train loss {}", fit.train_loss);
            assert!(fit.alpha <= 1e-2, "{centring:?}: clean data needs little shrinkage, chose {}", fit.alpha);
            let mean_v = (x.mv(&fit.weight.view([-1])) + &fit.bias).mean(Kind::Double).double_value(&[]);
            let mean_y = y.mean(Kind::Double).double_value(&[]);
            assert!((mean_v - mean_y).abs() < 1e-4, "{centring:?}: V averages {mean_v}, targets {mean_y}");
        }
    }

    #[test]
    fn pure_noise_is_shrunk_hard_and_a_prior_moves_what_it_is_shrunk_towards() {
        let (x, _, groups, _) = data(100, 8, 16, 0.0, 2);
        tch::manual_seed(3);
        let y = Tensor::randn([x.size()[0]], (Kind::Float, Device::Cpu));
        let fit = fit_ridge(&x, &y, &groups, Centring::WithinPrompt, None, 5).unwrap();
        assert!(fit.alpha >= 1.0, "targets unrelated to the states should get strong shrinkage, chose {}", fit.alpha);
        // With a prior the fit is the prior plus a fresh fit of what the prior leaves unexplained: the shrinkage
        // pulls towards w_prev, not 0.
        let prior = Tensor::randn([1, 16], (Kind::Float, Device::Cpu)) * 0.05;
        let fit = fit_ridge(&x, &y, &groups, Centring::WithinPrompt, Some(&prior), 5).unwrap();
        let rest = &y - x.mv(&prior.view([-1]));
        let fresh = fit_ridge(&x, &rest, &groups, Centring::WithinPrompt, None, 5).unwrap();
        assert_eq!(fit.alpha, fresh.alpha);
        let gap = (&fit.weight - (&fresh.weight + &prior)).abs().max().double_value(&[]);
        assert!(gap < 1e-5, "prior + fit of the residual vs the fit with the prior: max gap {gap}");
        // A prior the data refutes (its predictions dwarf the noise and are wrong) is moved away from.
        let loud = &prior * 100.0;
        let fit = fit_ridge(&x, &y, &groups, Centring::WithinPrompt, Some(&loud), 5).unwrap();
        let moved = (&fit.weight - &loud).norm().double_value(&[]) / loud.norm().double_value(&[]);
        assert!(moved > 0.9, "a refuted prior must be dropped: moved {moved} of its norm");
    }

    #[test]
    fn within_prompt_centring_ignores_which_prompt_scores_high() {
        // The targets rise with the prompts' feature offsets (between prompts) but fall with the states within a
        // prompt: the within fit must learn the within-prompt direction, the pooled one is pulled the other way.
        tch::manual_seed(4);
        let (prompts, per, h) = (40i64, 5i64, 4i64);
        let opts = (Kind::Float, Device::Cpu);
        let groups: Vec<usize> = (0..(prompts * per) as usize).map(|i| i / per as usize).collect();
        let g = Tensor::from_slice(&groups.iter().map(|&g| g as i64).collect::<Vec<_>>());
        let offsets = Tensor::randn([prompts, h], opts) * 5.0;
        let within = Tensor::randn([prompts * per, h], opts);
        let x = offsets.index_select(0, &g) + &within;
        let u = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]);
        let y = offsets.index_select(0, &g).mv(&u) * 2.0 - within.mv(&u) * 0.5;
        let fit = fit_ridge(&x, &y, &groups, Centring::WithinPrompt, None, 5).unwrap();
        assert!(fit.weight.double_value(&[0, 0]) < -0.4, "within slope {}", fit.weight.double_value(&[0, 0]));
        let pooled = fit_ridge(&x, &y, &groups, Centring::Pooled, None, 5).unwrap();
        assert!(pooled.weight.double_value(&[0, 0]) > 0.0, "pooled slope {}", pooled.weight.double_value(&[0, 0]));
    }

    #[test]
    fn bad_input_is_named() {
        let x = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let e = fit_ridge(&x, &y, &[0, 0, 0, 0], Centring::Pooled, None, 5).unwrap_err().to_string();
        assert!(e.contains("at least 2"), "{e}");
        let e = fit_ridge(&x, &y, &[0, 1], Centring::Pooled, None, 5).unwrap_err().to_string();
        assert!(e.contains("group labels"), "{e}");
        let prior = Tensor::zeros([1, 2], (Kind::Float, Device::Cpu));
        let e = fit_ridge(&x, &y, &[0, 1, 0, 1], Centring::Pooled, Some(&prior), 5).unwrap_err().to_string();
        assert!(e.contains("prior"), "{e}");
    }
}
