//! Reweight / resample (iro.md step 3): which of a prompt's candidates the next value function learns from.
//! `argmax` keeps the best `per_prompt` by reward (the official code, per_prompt = 1); `softmax` draws
//! `per_prompt` candidates with replacement with probabilities softmax(r / temperature), the importance-weighted
//! form of the update.

use iro_common::config::SelectMethod;
use iro_common::data::SplitMix64;

/// How many times each candidate was picked (sums to `per_prompt`, or to the candidate count for `argmax`
/// when there are fewer candidates). NaN rewards are never picked while a number is available.
pub fn select(rewards: &[f64], method: SelectMethod, per_prompt: usize, temperature: f64, seed: u64) -> Vec<u32> {
    let mut picked = vec![0u32; rewards.len()];
    if rewards.is_empty() || per_prompt == 0 {
        return picked;
    }
    match method {
        SelectMethod::Argmax => {
            let key = |i: usize| if rewards[i].is_nan() { f64::NEG_INFINITY } else { rewards[i] };
            let mut order: Vec<usize> = (0..rewards.len()).collect();
            // Stable: ties keep the lower index, as the official code's argmax does.
            order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
            for &i in order.iter().take(per_prompt) {
                picked[i] = 1;
            }
        }
        SelectMethod::Softmax => {
            let probs = softmax_weights(rewards, temperature);
            let mut rng = SplitMix64::new(seed);
            for _ in 0..per_prompt {
                let u = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                let mut acc = 0.0;
                let mut choice = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if u < acc {
                        choice = i;
                        break;
                    }
                }
                picked[choice] += 1;
            }
        }
    }
    picked
}

/// softmax(r / temperature), computed stably; NaN rewards get weight 0 (all NaN: uniform).
pub fn softmax_weights(rewards: &[f64], temperature: f64) -> Vec<f64> {
    let max = rewards.iter().copied().filter(|r| !r.is_nan()).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return vec![1.0 / rewards.len() as f64; rewards.len()];
    }
    let w: Vec<f64> = rewards.iter().map(|&r| if r.is_nan() { 0.0 } else { ((r - max) / temperature).exp() }).collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_keeps_the_best_and_breaks_ties_low() {
        assert_eq!(select(&[0.1, 0.9, 0.9, f64::NAN], SelectMethod::Argmax, 1, 1.0, 0), vec![0, 1, 0, 0]);
        assert_eq!(select(&[0.1, 0.9, 0.5], SelectMethod::Argmax, 2, 1.0, 0), vec![0, 1, 1]);
        assert_eq!(select(&[f64::NAN, -3.0], SelectMethod::Argmax, 1, 1.0, 0), vec![0, 1]);
        // More wanted than there are: every candidate once.
        assert_eq!(select(&[1.0, 2.0], SelectMethod::Argmax, 5, 1.0, 0), vec![1, 1]);
    }

    #[test]
    fn softmax_draws_follow_the_softmax_distribution() {
        let rewards = [0.0, 1.0, 2.0, f64::NAN];
        let temperature = 0.8;
        let want = softmax_weights(&rewards, temperature);
        assert_eq!(want[3], 0.0);
        let draws = 40_000;
        let counts = select(&rewards, SelectMethod::Softmax, draws, temperature, 99);
        assert_eq!(counts.iter().sum::<u32>() as usize, draws);
        assert_eq!(counts[3], 0, "a NaN reward is never drawn");
        for (c, p) in counts.iter().zip(&want) {
            let freq = *c as f64 / draws as f64;
            // Four standard errors of a binomial proportion.
            let tol = 4.0 * (p * (1.0 - p) / draws as f64).sqrt() + 1e-9;
            assert!((freq - p).abs() <= tol, "frequency {freq} vs probability {p} (tolerance {tol})");
        }
    }

    #[test]
    fn softmax_is_reproducible_per_seed_and_sharpens_with_low_temperature() {
        let r = [0.0, 0.5, 1.0];
        assert_eq!(select(&r, SelectMethod::Softmax, 8, 1.0, 5), select(&r, SelectMethod::Softmax, 8, 1.0, 5));
        let cold = softmax_weights(&r, 0.01);
        assert!(cold[2] > 0.999, "{cold:?}");
        let hot = softmax_weights(&r, 1e6);
        assert!(hot.iter().all(|p| (p - 1.0 / 3.0).abs() < 1e-5), "{hot:?}");
    }
}
