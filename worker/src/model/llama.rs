//! Llama (Llama-3, SmolLM2, Mistral-style): RMSNorm, grouped-query attention, RoPE (optionally with
//! Llama-3 rescaling), SwiGLU MLP. Weight names are HF's under `model.`.

use tch::{Kind, Tensor};

use super::attention::{Rope, attend};
use super::config::LlamaConfig;
use super::weights::Weights;
use super::{Linear, Step};
use crate::error::Result;
use crate::generate::kv_cache::CacheShape;

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &Weights, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.get(&format!("{name}.weight"), &[dim])?, eps })
    }

    /// Normalises in f32 and casts back before the weight, as transformers does (it matters in bf16).
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(kind)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    rope: Rope,
}

impl Llama {
    /// `prefix` is the backbone's name prefix including the trailing dot, e.g. `model.`.
    pub fn load(cfg: &LlamaConfig, w: &Weights, prefix: &str) -> Result<Self> {
        let h = cfg.hidden_size;
        let (q_dim, kv_dim) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("{prefix}layers.{i}");
                let attn =
                    |name: &str, i, o| Linear::load(w, &format!("{p}.self_attn.{name}"), i, o, cfg.attention_bias);
                let mlp = |name: &str, i, o| Linear::load(w, &format!("{p}.mlp.{name}"), i, o, cfg.mlp_bias);
                Ok(Layer {
                    input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, eps)?,
                    post_attention_layernorm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
                    q_proj: attn("q_proj", h, q_dim)?,
                    k_proj: attn("k_proj", h, kv_dim)?,
                    v_proj: attn("v_proj", h, kv_dim)?,
                    o_proj: attn("o_proj", q_dim, h)?,
                    gate_proj: mlp("gate_proj", h, cfg.intermediate_size)?,
                    up_proj: mlp("up_proj", h, cfg.intermediate_size)?,
                    down_proj: mlp("down_proj", cfg.intermediate_size, h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = w.get(&format!("{prefix}embed_tokens.weight"), &[cfg.vocab_size, h])?;
        let device = embed_tokens.device();
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::load(w, &format!("{prefix}norm"), h, eps)?,
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref(), device),
        })
    }

    pub fn embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    pub fn cache_shape(&self) -> CacheShape {
        CacheShape { layers: self.layers.len(), kv_heads: self.cfg.num_kv_heads, head_dim: self.cfg.head_dim }
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
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// The rotary tables every layer of one forward uses, in the weights' dtype.
    pub fn rope_tables(&self, positions: &Tensor) -> (Tensor, Tensor) {
        self.rope.cos_sin(positions, self.embed_tokens.kind())
    }

    /// Decoder layer `i` on its input `x` [B, T, H].
    pub fn layer(&self, i: usize, x: &Tensor, cos: &Tensor, sin: &Tensor, step: &mut Step) -> Tensor {
        let layer = &self.layers[i];
        let x = x + self.attention(layer, &layer.input_layernorm.forward(x), i, cos, sin, step);
        let h = layer.post_attention_layernorm.forward(&x);
        &x + layer.down_proj.forward(&(layer.gate_proj.forward(&h).silu() * layer.up_proj.forward(&h)))
    }

    /// The final norm after the last layer.
    pub fn finish(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    fn attention(&self, layer: &Layer, x: &Tensor, i: usize, cos: &Tensor, sin: &Tensor, step: &mut Step) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let q = layer.q_proj.forward(x).view([b, t, nh, hd]).transpose(1, 2);
        let k = layer.k_proj.forward(x).view([b, t, nkv, hd]).transpose(1, 2);
        let v = layer.v_proj.forward(x).view([b, t, nkv, hd]).transpose(1, 2);
        let q = self.rope.apply(&q, cos, sin);
        let k = self.rope.apply(&k, cos, sin);
        let (k, v) = step.keys_values(i, k, v);
        let out = attend(&q, &k, &v, &step.mask);
        layer.o_proj.forward(&out.transpose(1, 2).reshape([b, t, nh * hd]))
    }
}
