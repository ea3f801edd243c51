//! Reweight / resample (iro.md step 3): which of a prompt's candidates the next value function learns from.
//! `argmax` keeps the best `per_prompt` by reward (the official code, per_prompt = 1); `softmax` draws
//! `per_prompt` candidates with replacement with probabilities softmax(r / τ), the importance-weighted form of
//! the update. τ = `temperature` · sd_prompt by default (`temperature_unit = "prompt_sd"`), sd_prompt being the
//! standard deviation of the prompt's candidate rewards, so one temperature suits any reward scale; τ =
//! `temperature` in the reward's own units with `temperature_unit = "reward"`.

use iro_common::config::{SelectMethod, SelectSection, TemperatureUnit};
use iro_common::data::SplitMix64;

/// How many times each candidate was picked (sums to `per_prompt`, or to the candidate count for `argmax`
/// when there are fewer candidates). NaN rewards are never picked while a number is available.
pub fn select(rewards: &[f64], config: &SelectSection, seed: u64) -> Vec<u32> {
    let per_prompt = config.per_prompt;
    let mut picked = vec![0u32; rewards.len()];
    if rewards.is_empty() || per_prompt == 0 {
        return picked;
    }
    match config.method {
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
            let temperature = reward_temperature(rewards, config.temperature, config.temperature_unit);
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

/// The softmax temperature in the reward's units: `temperature` as given (`Reward`), or `temperature` times
/// the standard deviation (population, over the non-NaN rewards) of this prompt's candidates (`PromptSd`).
/// When that deviation is 0 (one candidate, or all scoring the same), the given temperature is returned: the
/// rewards are then all equal and any temperature draws uniformly among them.
pub fn reward_temperature(rewards: &[f64], temperature: f64, unit: TemperatureUnit) -> f64 {
    match unit {
        TemperatureUnit::Reward => temperature,
        TemperatureUnit::PromptSd => {
            let sd = standard_deviation(rewards);
            if sd > 0.0 && sd.is_finite() { temperature * sd } else { temperature }
        }
    }
}

/// Population standard deviation of the non-NaN values (0 for fewer than two).
fn standard_deviation(values: &[f64]) -> f64 {
    let numbers: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if numbers.len() < 2 {
        return 0.0;
    }
    let n = numbers.len() as f64;
    let mean = numbers.iter().sum::<f64>() / n;
    (numbers.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
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

    fn config(method: SelectMethod, per_prompt: usize, temperature: f64, unit: TemperatureUnit) -> SelectSection {
        SelectSection { method, temperature, temperature_unit: unit, per_prompt, first_samples: 1 }
    }

    fn argmax(per_prompt: usize) -> SelectSection {
        config(SelectMethod::Argmax, per_prompt, 1.0, TemperatureUnit::PromptSd)
    }

    /// Raw-unit softmax: the draws then follow softmax(r / temperature) exactly.
    fn softmax(per_prompt: usize, temperature: f64) -> SelectSection {
        config(SelectMethod::Softmax, per_prompt, temperature, TemperatureUnit::Reward)
    }

    #[test]
    fn argmax_keeps_the_best_and_breaks_ties_low() {
        assert_eq!(select(&[0.1, 0.9, 0.9, f64::NAN], &argmax(1), 0), vec![0, 1, 0, 0]);
        assert_eq!(select(&[0.1, 0.9, 0.5], &argmax(2), 0), vec![0, 1, 1]);
        assert_eq!(select(&[f64::NAN, -3.0], &argmax(1), 0), vec![0, 1]);
        // More wanted than there are: every candidate once.
        assert_eq!(select(&[1.0, 2.0], &argmax(5), 0), vec![1, 1]);
    }

    /// Draws `draws` times and checks every frequency against `want` within four binomial standard errors.
    fn assert_draws_follow(rewards: &[f64], config: &SelectSection, want: &[f64]) {
        let counts = select(rewards, config, 99);
        let draws = config.per_prompt;
        assert_eq!(counts.iter().sum::<u32>() as usize, draws);
        for (c, p) in counts.iter().zip(want) {
            let freq = *c as f64 / draws as f64;
            let tol = 4.0 * (p * (1.0 - p) / draws as f64).sqrt() + 1e-9;
            assert!((freq - p).abs() <= tol, "frequency {freq} vs probability {p} (tolerance {tol})");
        }
    }

    #[test]
    fn softmax_draws_follow_the_softmax_distribution() {
        let rewards = [0.0, 1.0, 2.0, f64::NAN];
        let want = softmax_weights(&rewards, 0.8);
        assert_eq!(want[3], 0.0, "a NaN reward is never drawn");
        assert_draws_follow(&rewards, &softmax(40_000, 0.8), &want);
    }

    #[test]
    fn softmax_is_reproducible_per_seed_and_sharpens_with_low_temperature() {
        let r = [0.0, 0.5, 1.0];
        assert_eq!(select(&r, &softmax(8, 1.0), 5), select(&r, &softmax(8, 1.0), 5));
        let cold = softmax_weights(&r, 0.01);
        assert!(cold[2] > 0.999, "{cold:?}");
        let hot = softmax_weights(&r, 1e6);
        assert!(hot.iter().all(|p| (p - 1.0 / 3.0).abs() < 1e-5), "{hot:?}");
    }

    #[test]
    fn a_prompt_sd_temperature_is_the_same_sharpness_at_any_reward_scale() {
        // A cosine reward whose candidates spread by about 0.1: in raw units T = 1 is nearly uniform...
        let cosine = [0.55, 0.6, 0.65, 0.7];
        let raw = softmax_weights(&cosine, reward_temperature(&cosine, 1.0, TemperatureUnit::Reward));
        assert!(raw.iter().all(|p| (p - 0.25).abs() < 0.025), "{raw:?}");
        // ...while in units of the prompt's sd (0.0559) T = 1 favours the best candidate clearly.
        let sd = (0.0125f64 / 4.0).sqrt();
        assert!((reward_temperature(&cosine, 1.0, TemperatureUnit::PromptSd) - sd).abs() < 1e-12);
        let scaled = softmax_weights(&cosine, reward_temperature(&cosine, 1.0, TemperatureUnit::PromptSd));
        assert!(scaled[3] > 0.5 && scaled[0] < 0.1, "{scaled:?}");
        // The same rewards stretched 20-fold and shifted draw with the same weights.
        let stretched: Vec<f64> = cosine.iter().map(|r| 20.0 * r - 3.0).collect();
        let same = softmax_weights(&stretched, reward_temperature(&stretched, 1.0, TemperatureUnit::PromptSd));
        for (a, b) in scaled.iter().zip(&same) {
            assert!((a - b).abs() < 1e-12, "{scaled:?} vs {same:?}");
        }
        let rewards = [0.55, 0.6, 0.65, 0.7, f64::NAN];
        let config = config(SelectMethod::Softmax, 40_000, 1.0, TemperatureUnit::PromptSd);
        let want = softmax_weights(&rewards, sd);
        assert_draws_follow(&rewards, &config, &want);
    }

    #[test]
    fn a_prompt_whose_candidates_score_the_same_draws_uniformly_in_prompt_sd_units() {
        let flat = [0.3, 0.3, 0.3, f64::NAN];
        assert_eq!(reward_temperature(&flat, 0.5, TemperatureUnit::PromptSd), 0.5);
        assert_eq!(
            softmax_weights(&flat, reward_temperature(&flat, 0.5, TemperatureUnit::PromptSd))[..3],
            [1.0 / 3.0; 3]
        );
        let config = config(SelectMethod::Softmax, 3, 0.5, TemperatureUnit::PromptSd);
        assert_eq!(select(&[0.7], &config, 1), vec![3], "a single candidate takes every draw");
        assert_eq!(select(&flat, &config, 1)[3], 0);
    }
}
