//! Next-token choice: greedy, or temperature → top-k → top-p sampling (transformers' order), with one
//! seeded random stream per row so a row's sample depends only on its own seed, never on which other
//! rows share its batch. Filtering runs on the device; the final draw runs on the host over at most
//! top-k (or the nucleus) candidates.

use iro_common::data::SplitMix64;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f64,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0 };

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// One row's random stream: the project's SplitMix64 (`iro_common::data::SplitMix64`), whose output is fixed
/// forever (unlike a library RNG whose algorithm may change between versions), so seeded runs reproduce
/// across builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRng(SplitMix64);

impl RowRng {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// A child stream for replica `i` of this row (guided search replicates a beam K times).
    pub fn fork(&self, i: u64) -> Self {
        let mut r = SplitMix64::new(self.0.state() ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Self::new(r.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The seed of row `row` of a job seeded with `seed`: independent of batch composition and order.
pub fn row_seed(seed: u64, row: u64) -> u64 {
    RowRng::new(seed).fork(row).next_u64()
}

/// Chooses one token per row from `logits` [B, V]. Returns the tokens and their log-probabilities under
/// the unmodified distribution (softmax of the raw logits: no temperature, no filtering), which is what
/// KL estimates and importance weights need.
pub fn sample(logits: &Tensor, params: &SamplingParams, rngs: &mut [RowRng]) -> (Vec<i64>, Vec<f32>) {
    let logits = logits.to_kind(Kind::Float);
    let tokens: Vec<i64> = if params.is_greedy() {
        Vec::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu)).expect("argmax to i64")
    } else {
        draw(&logits, params, rngs)
    };
    let index = Tensor::from_slice(&tokens).to_device(logits.device()).unsqueeze(1);
    let logprobs = logits.log_softmax(-1, Kind::Float).gather(1, &index, false).squeeze_dim(1);
    (tokens, Vec::try_from(logprobs.to_device(tch::Device::Cpu)).expect("logprobs to f32"))
}

/// How many of the most likely tokens a top-p-only draw looks at first (see `candidates`).
const NUCLEUS_FIRST_LOOK: i64 = 256;

fn draw(logits: &Tensor, params: &SamplingParams, rngs: &mut [RowRng]) -> Vec<i64> {
    let (probs, indices) = candidates(&(logits / params.temperature), params);
    let cpu = tch::Device::Cpu;
    let (rows, width) = (probs.size()[0] as usize, probs.size()[1] as usize);
    let probs: Vec<f32> = Vec::try_from(probs.to_device(cpu).flatten(0, -1)).expect("probs to f32");
    let indices: Vec<i64> = Vec::try_from(indices.to_device(cpu).flatten(0, -1)).expect("indices to i64");
    (0..rows)
        .map(|r| {
            let p = &probs[r * width..(r + 1) * width];
            let total: f64 = p.iter().map(|&x| x as f64).sum();
            let mut u = rngs[r].next_f64() * total;
            let mut pick = 0;
            for (j, &x) in p.iter().enumerate() {
                if x > 0.0 {
                    pick = j;
                    u -= x as f64;
                    if u < 0.0 {
                        break;
                    }
                }
            }
            indices[r * width + pick]
        })
        .collect()
}

/// The candidates of each row in descending order of probability with their probabilities, zero outside the
/// nucleus: top-k (renormalised over the k) then top-p, or top-p alone over the whole vocabulary.
///
/// Top-p alone needs only the most likely tokens up to its mass, not a sort of the whole vocabulary (which took a
/// tenth of a CPU IRO run's time under `perf` with SmolLM2's 49,152 tokens at top-p 0.9): the full softmax's
/// `NUCLEUS_FIRST_LOOK` largest probabilities are taken, and the look widens 4× until they hold `top_p` in every
/// row. Tokens past that prefix would all be cut, so the kept tokens, their order and their probabilities are
/// those of the full sort (up to the order among exactly tied probabilities, which either may put first).
fn candidates(scaled: &Tensor, params: &SamplingParams) -> (Tensor, Tensor) {
    let vocab = scaled.size()[1];
    let (probs, indices) = if params.top_k > 0 && (params.top_k as i64) < vocab {
        let (values, indices) = scaled.topk(params.top_k as i64, -1, true, true);
        (values.softmax(-1, Kind::Float), indices)
    } else if params.top_p < 1.0 {
        let full = scaled.softmax(-1, Kind::Float);
        let mut look = NUCLEUS_FIRST_LOOK.min(vocab);
        loop {
            let (probs, indices) = full.topk(look, -1, true, true);
            // The same running sum the cut below uses, so both agree on where the nucleus ends.
            let held = probs.cumsum(-1, Kind::Float).select(1, -1).min().double_value(&[]);
            if look == vocab || held >= params.top_p {
                break (probs, indices);
            }
            look = (look * 4).min(vocab);
        }
    } else {
        let (values, indices) = scaled.sort(-1, true);
        (values.softmax(-1, Kind::Float), indices)
    };
    if params.top_p >= 1.0 {
        return (probs, indices);
    }
    // Keep the smallest prefix whose mass reaches top_p: a candidate stays while the mass before it < top_p.
    let before = probs.cumsum(-1, Kind::Float) - &probs;
    (probs.masked_fill(&before.ge(params.top_p), 0.0), indices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, -1])
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_the_unmodified_logprob() {
        let l = logits(&[&[0.0, 2.0, 1.0], &[3.0, 0.0, 0.0]]);
        let (tok, lp) = sample(&l, &SamplingParams::GREEDY, &mut [RowRng::new(0), RowRng::new(1)]);
        assert_eq!(tok, vec![1, 0]);
        let z: f32 = [0.0f32, 2.0, 1.0].iter().map(|x| x.exp()).sum();
        assert!((lp[0] - (2.0 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let l = logits(&[&[0.1, 0.3, 0.2, 0.0]]);
        let p = SamplingParams { temperature: 5.0, top_k: 1, top_p: 1.0 };
        for seed in 0..20 {
            assert_eq!(sample(&l, &p, &mut [RowRng::new(seed)]).0, vec![1]);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps {0, 1}; token 2 must never appear.
        let l = logits(&[&[0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()]]);
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.6 };
        let mut seen = [0usize; 3];
        let mut rng = [RowRng::new(7)];
        for _ in 0..2000 {
            seen[sample(&l, &p, &mut rng).0[0] as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        // renormalised 0.5/0.8 = 0.625 for token 0
        let frac = seen[0] as f64 / 2000.0;
        assert!((frac - 0.625).abs() < 0.04, "{frac}");
    }

    #[test]
    fn sampling_matches_the_softmax_distribution() {
        let l = logits(&[&[0.0, 1.0, 2.0]]);
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let mut counts = [0usize; 3];
        let mut rng = [RowRng::new(3)];
        let n = 6000;
        for _ in 0..n {
            counts[sample(&l, &p, &mut rng).0[0] as usize] += 1;
        }
        let z: f64 = [0.0f64, 1.0, 2.0].iter().map(|x| x.exp()).sum();
        for (i, c) in counts.iter().enumerate() {
            let want = (i as f64).exp() / z;
            assert!((*c as f64 / n as f64 - want).abs() < 0.03, "token {i}: {c}");
        }
    }

    /// Top-p over the whole vocabulary the plain way: sort everything, cut where the mass before reaches top_p.
    fn nucleus_by_full_sort(scaled: &Tensor, top_p: f64) -> Vec<Vec<(i64, f32)>> {
        let (values, indices) = scaled.sort(-1, true);
        let probs = values.softmax(-1, Kind::Float);
        let keep = (probs.cumsum(-1, Kind::Float) - &probs).lt(top_p);
        kept(&probs.masked_fill(&keep.logical_not(), 0.0), &indices)
    }

    fn kept(probs: &Tensor, indices: &Tensor) -> Vec<Vec<(i64, f32)>> {
        let (p, i): (Vec<Vec<f32>>, Vec<Vec<i64>>) = (probs.try_into().unwrap(), indices.try_into().unwrap());
        p.iter()
            .zip(&i)
            .map(|(p, i)| i.iter().zip(p).filter(|(_, p)| **p > 0.0).map(|(&i, &p)| (i, p)).collect())
            .collect()
    }

    #[test]
    fn top_p_alone_keeps_exactly_the_nucleus_of_a_full_sort_even_when_it_is_wide() {
        tch::manual_seed(5);
        let vocab = 5000i64;
        // Distinct logits (evenly spaced, shuffled), so no two probabilities tie: tied tokens may come in either
        // order from a sort and from topk, which changes nothing about the distribution. Row 0 peaked (a nucleus
        // of a few tokens), row 1 nearly flat (thousands: the look must widen past NUCLEUS_FIRST_LOOK twice), row 2
        // in between.
        let spaced = Tensor::linspace(-1.0, 1.0, vocab, (Kind::Float, tch::Device::Cpu));
        let rows: Vec<Tensor> = [400.0, 0.5, 8.0]
            .iter()
            .map(|spread| spaced.index_select(0, &Tensor::randperm(vocab, (Kind::Int64, tch::Device::Cpu))) * *spread)
            .collect();
        let scaled = Tensor::stack(&rows, 0);
        for top_p in [0.5, 0.9, 0.99] {
            let p = SamplingParams { temperature: 1.0, top_k: 0, top_p };
            let (probs, indices) = candidates(&scaled, &p);
            let (got, want) = (kept(&probs, &indices), nucleus_by_full_sort(&scaled, top_p));
            for (row, (g, w)) in got.iter().zip(&want).enumerate() {
                let (gi, wi): (Vec<i64>, Vec<i64>) = (g.iter().map(|x| x.0).collect(), w.iter().map(|x| x.0).collect());
                assert_eq!(gi, wi, "top_p {top_p}, row {row}: kept tokens or their order differ");
                let err = g.iter().zip(w).map(|(a, b)| (a.1 - b.1).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-6, "top_p {top_p}, row {row}: probabilities differ by {err}");
            }
            if top_p == 0.9 {
                assert!(want[1].len() as i64 > 4 * NUCLEUS_FIRST_LOOK, "the flat row must need a wider look");
                assert!(want[0].len() < 50, "the peaked row has a small nucleus");
            }
        }
    }

    #[test]
    fn a_row_depends_only_on_its_own_seed() {
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let row = [0.3f32, 0.1, 0.5, 0.2, 0.4];
        let alone = sample(&logits(&[&row]), &p, &mut [RowRng::new(11)]).0[0];
        let other = [9.0f32, 0.0, 0.0, 0.0, 0.0];
        let batched = sample(&logits(&[&other, &row]), &p, &mut [RowRng::new(5), RowRng::new(11)]).0[1];
        assert_eq!(alone, batched);
    }

    #[test]
    fn forks_are_distinct_streams() {
        let r = RowRng::new(1);
        let (mut a, mut b) = (r.fork(0), r.fork(1));
        assert_ne!(a.next_u64(), b.next_u64());
        assert_eq!(r.fork(1), r.fork(1));
    }
}
