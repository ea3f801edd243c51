//! GPT-NeoX (Pythia): LayerNorm, fused QKV with partial rotary embeddings, parallel or sequential
//! residual. Weight names are HF's, under a prefix (`gpt_neox.` in the HF classes, none or `lm_backbone.`
//! in reward-model wrappers).

use tch::Tensor;

use super::attention::{Rope, attend};
use super::config::NeoXConfig;
use super::weights::Weights;
use super::{LayerNorm, Linear, Step};
use crate::error::Result;
use crate::generate::kv_cache::CacheShape;

struct Layer {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    h_to_4h: Linear,
    four_h_to_h: Linear,
}

pub struct GptNeoX {
    cfg: NeoXConfig,
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    rope: Rope,
}

impl GptNeoX {
    /// `prefix` is the backbone's name prefix including the trailing dot, e.g. `gpt_neox.`.
    pub fn load(cfg: &NeoXConfig, w: &Weights, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("{prefix}layers.{i}");
                Ok(Layer {
                    input_layernorm: LayerNorm::load(w, &format!("{p}.input_layernorm"), h, eps)?,
                    post_attention_layernorm: LayerNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
                    query_key_value: Linear::load(w, &format!("{p}.attention.query_key_value"), h, 3 * h, true)?,
                    dense: Linear::load(w, &format!("{p}.attention.dense"), h, h, true)?,
                    h_to_4h: Linear::load(w, &format!("{p}.mlp.dense_h_to_4h"), h, cfg.intermediate_size, true)?,
                    four_h_to_h: Linear::load(w, &format!("{p}.mlp.dense_4h_to_h"), cfg.intermediate_size, h, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_in = w.get(&format!("{prefix}embed_in.weight"), &[cfg.vocab_size, h])?;
        let device = embed_in.device();
        Ok(Self {
            cfg: cfg.clone(),
            embed_in,
            layers,
            final_layer_norm: LayerNorm::load(w, &format!("{prefix}final_layer_norm"), h, eps)?,
            rope: Rope::new(cfg.rotary_dims(), cfg.rope_theta, None, device),
        })
    }

    pub fn embeddings(&self) -> &Tensor {
        &self.embed_in
    }

    pub fn cache_shape(&self) -> CacheShape {
        CacheShape { layers: self.layers.len(), kv_heads: self.cfg.num_heads, head_dim: self.cfg.head_dim() }
    }

    pub fn forward(&self, ids: &Tensor, step: &mut Step) -> Tensor {
        let mut x = self.embed(ids);
        let (cos, sin) = self.rope_tables(&step.positions);
        for i in 0..self.layers.len().min(step.depth.unwrap_or(usize::MAX)) {
            x = self.layer(i, &x, &cos, &sin, step);
            step.after_layer(i, &x);
        }
        self.finish(&x)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The token embeddings [B, T, H]: the input of layer 0.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_in, ids, -1, false, false)
    }

    /// The rotary tables every layer of one forward uses, in the weights' dtype.
    pub fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        self.rope.cos_sin(positions, self.embed_in.kind())
    }

    /// Layer `i` on its input `x` [B, T, H], with the parallel or the sequential residual.
    pub fn layer(&self, i: usize, x: &Tensor, cos: &Tensor, sin: &Tensor, step: &mut Step) -> Tensor {
        let layer = &self.layers[i];
        let attn = self.attention(layer, &layer.input_layernorm.forward(x), i, cos, sin, step);
        if self.cfg.use_parallel_residual {
            let mlp = Self::mlp(layer, &layer.post_attention_layernorm.forward(x));
            x + attn + mlp
        } else {
            let x = x + attn;
            let mlp = Self::mlp(layer, &layer.post_attention_layernorm.forward(&x));
            x + mlp
        }
    }

    /// The final LayerNorm after the last layer.
    pub fn finish(&self, x: &Tensor) -> Tensor {
        self.final_layer_norm.forward(x)
    }

    fn attention(&self, layer: &Layer, x: &Tensor, i: usize, cos: &Tensor, sin: &Tensor, step: &mut Step) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (self.cfg.num_heads, self.cfg.head_dim());
        // HF's fused layout: per head, [q | k | v] of head_dim each.
        let qkv = layer.query_key_value.forward(x).view([b, t, nh, 3 * hd]).transpose(1, 2);
        let q = self.rope.apply(&qkv.narrow(3, 0, hd), cos, sin);
        let k = self.rope.apply(&qkv.narrow(3, hd, hd), cos, sin);
        let v = qkv.narrow(3, 2 * hd, hd);
        let (k, v) = step.keys_values(i, k, v);
        let out = attend(&q, &k, &v, &step.mask);
        layer.dense.forward(&out.transpose(1, 2).reshape([b, t, nh * hd]))
    }

    fn mlp(layer: &Layer, x: &Tensor) -> Tensor {
        layer.four_h_to_h.forward(&layer.h_to_4h.forward(x).gelu("none"))
    }
}
