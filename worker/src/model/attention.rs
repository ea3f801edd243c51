//! Pieces both architectures share: rotary position embeddings (full or partial, plain or Llama-3
//! rescaled), the attention mask for left-padded batches with a KV cache, and the fused attention call.

use tch::{Kind, Tensor};

use super::config::Llama3RopeScaling;

/// Rotary embedding over the first `dims` dimensions of each head, HF's `rotate_half` layout.
#[derive(Debug)]
pub struct Rope {
    /// [dims / 2] inverse frequencies, f32.
    inv_freq: Tensor,
    pub dims: i64,
}

impl Rope {
    pub fn new(dims: i64, theta: f64, scaling: Option<&Llama3RopeScaling>, device: tch::Device) -> Self {
        let mut inv: Vec<f64> = (0..dims / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dims as f64)).collect();
        if let Some(s) = scaling {
            inv = llama3_scale(&inv, s);
        }
        let inv: Vec<f32> = inv.into_iter().map(|f| f as f32).collect();
        Self { inv_freq: Tensor::from_slice(&inv).to_device(device), dims }
    }

    /// cos and sin for `positions` [B, T], shaped [B, 1, T, dims] to broadcast over heads; computed in f32
    /// (as transformers does) and cast to `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Rotates the first `dims` channels of `x` [B, heads, T, head_dim]; the rest pass through.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let head_dim = x.size()[3];
        let (rot, pass) = if self.dims == head_dim {
            (x.shallow_clone(), None)
        } else {
            (x.narrow(3, 0, self.dims), Some(x.narrow(3, self.dims, head_dim - self.dims)))
        };
        let half = self.dims / 2;
        let rotated = Tensor::cat(&[-rot.narrow(3, half, half), rot.narrow(3, 0, half)], 3);
        let out = rot * cos + rotated * sin;
        match pass {
            Some(p) => Tensor::cat(&[out, p], 3),
            None => out,
        }
    }
}

/// Llama-3.1 rescaling: low frequencies are divided by `factor`, high ones kept, the band between blended.
fn llama3_scale(inv_freq: &[f64], s: &Llama3RopeScaling) -> Vec<f64> {
    let low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// Boolean attention mask [B, 1, T, S] (true = may attend) for `T` new queries at absolute slots
/// `past..past+T` over `S = past + T` key slots, given which key slots hold real tokens (`valid` [B, S]).
/// A query always sees itself, so a padding query has one finite score instead of a row of -inf
/// (whose NaN would leak through the next layer's keys and values).
pub fn causal_mask(valid: &Tensor, past: i64, new: i64) -> Tensor {
    let total = past + new;
    let device = valid.device();
    let q = Tensor::arange_start(past, total, (Kind::Int64, device)).view([-1, 1]);
    let k = Tensor::arange(total, (Kind::Int64, device)).view([1, -1]);
    let causal = k.le_tensor(&q); // [T, S]
    let diagonal = k.eq_tensor(&q);
    let m = causal.unsqueeze(0).logical_and(&valid.view([valid.size()[0], 1, total]));
    m.logical_or(&diagonal.unsqueeze(0)).unsqueeze(1)
}

/// Fused attention (flash / memory-efficient kernels where libtorch has them). `q` [B, H, T, D],
/// `k`/`v` [B, H_kv, S, D] with H a multiple of H_kv (grouped-query attention).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let (b, h, t, d) = q.size4().expect("q is [B, H, T, D]");
    let kv_heads = k.size()[1];
    if h == kv_heads {
        return Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, false);
    }
    // Grouped-query attention without copying keys/values: the g = H / H_kv query heads that share kv head j
    // (heads j·g .. (j+1)·g, as HF's repeat_kv pairs them) become g·T query rows of one head j. libtorch's
    // `enable_gqa` flag would do the same on GPU, but on CPU it falls back to the unfused path, which was
    // 3-4× slower per call at decode shapes (worker/examples/sdpa_probe.rs).
    let g = h / kv_heads;
    let q = q.reshape([b, kv_heads, g * t, d]);
    // Row r = gi·T + t of the grouped queries has query t's mask row.
    let mask = if t == 1 { mask.shallow_clone() } else { mask.repeat([1, 1, g, 1]) };
    let out = Tensor::scaled_dot_product_attention(&q, k, v, Some(&mask), 0.0, false, None, false);
    out.reshape([b, h, t, d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_hides_left_padding() {
        // row 0: [pad, a, b]; row 1: [a, b, c]
        let valid = Tensor::from_slice(&[false, true, true, true, true, true]).view([2, 3]);
        let m = causal_mask(&valid, 0, 3);
        let got: Vec<bool> = Vec::try_from(m.flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        let want = [
            true, false, false,   false, true, false,   false, true, true,   // row 0: pad sees itself only
            true, false, false,   true, true, false,    true, true, true,    // row 1: plain causal
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16.0,
        };
        let inv = [2.0, 0.5, 0.01];
        let out = llama3_scale(&inv, &s);
        assert_eq!(out[0], 2.0); // wavelength 3.1 < 16/4: kept
        assert!((out[2] - 0.01 / 8.0).abs() < 1e-12); // wavelength 628 > 16
        assert!(out[1] < 0.5 && out[1] > 0.5 / 8.0); // 12.6 lies in the blended band
    }
}
