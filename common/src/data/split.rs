//! The seeded split (iro.md step 1): one shuffle of all prompt indices from the run seed; iteration t takes
//! the t-th consecutive slice, so slices of different iterations are disjoint and a resumed run gets the same
//! ones. The shuffle is written out here (SplitMix64 + Fisher-Yates) so the order never changes with a
//! library version.

use crate::error::{Error, Result};

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed 64-bit generator, fully determined by its seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The current state: `SplitMix64::new(g.state())` continues exactly where `g` is.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` without modulo bias (Lemire's multiply-shift with rejection). `bound` must be > 0.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SplitMix64::below needs a positive bound");
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A permutation of `0..n` determined by `seed` alone (Fisher-Yates, drawing from the top down).
pub fn shuffled_order(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// The prompt indices of iteration `iteration` (counted from 1): positions `(t-1)·k .. t·k` of
/// `shuffled_order(n, seed)`. [`Error::DataExhausted`] when the data has fewer than `t·k` prompts.
pub fn iteration_slice(n: usize, seed: u64, iteration: u32, per_iteration: usize) -> Result<Vec<usize>> {
    if iteration == 0 {
        return Err(Error::InvalidId {
            what: "iteration",
            value: "0".into(),
            message: "iterations are counted from 1".into(),
        });
    }
    let start = (iteration as usize - 1).saturating_mul(per_iteration);
    let end = start.saturating_add(per_iteration);
    if end > n || end == usize::MAX {
        return Err(Error::DataExhausted { iteration, start, end, available: n });
    }
    Ok(shuffled_order(n, seed)[start..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_outputs() {
        // First outputs of the reference C implementation seeded with 1234567.
        let mut rng = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn below_stays_in_range_and_hits_every_value() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[rng.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
