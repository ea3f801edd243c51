//! Frozen-model architectures on libtorch, loaded from HF checkpoint folders: the backbones
//! (`gpt_neox`, `llama`), and the heads that turn their hidden states into next-token logits
//! (`CausalLm`) or one scalar per position (`ScalarModel`: reward models and value functions).

pub mod attention;
pub mod bert;
pub mod config;
pub mod gpt_neox;
pub mod heads;
pub mod llama;
pub mod packed;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

pub use config::{ArchConfig, ModelConfig};
pub use heads::{CausalLm, ScalarModel};
pub use weights::{WeightLayout, Weights};

use crate::error::Result;
use crate::generate::kv_cache::{CacheShape, KvCache};

/// A dense layer, `x·Wᵀ + b` for HF's [out, in] weight `W`, kept as the weights' `layout` says. For CPU inference
/// it also multiplies through MKL's packed copies when the row count suits them (`packed`).
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
    packed: Option<packed::PackedWeight>,
}

impl Linear {
    pub fn load(w: &Weights, name: &str, input: i64, output: i64, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), &[output, input])?;
        let bias = if bias { Some(w.get(&format!("{name}.bias"), &[output])?) } else { None };
        Ok(Self::new(weight, bias, w.layout()))
    }

    /// From an [out, in] weight.
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout) -> Self {
        let (weight, packed) = match layout {
            WeightLayout::Checkpoint => (weight, None),
            WeightLayout::Transposed => {
                let weight = weight.tr().contiguous();
                let packed = packed::PackedWeight::new(&weight, true);
                (weight, packed)
            }
        };
        Self { weight, bias, layout, packed }
    }

    /// A tied output head: the [V, H] embedding matrix itself (a transposed copy would cost its size again),
    /// packed like the other layers when `layout` is for CPU inference.
    pub fn tied(embedding: Tensor, layout: WeightLayout) -> Self {
        let packed = match layout {
            WeightLayout::Checkpoint => None,
            WeightLayout::Transposed => packed::PackedWeight::new(&embedding, false),
        };
        Self { weight: embedding, bias: None, layout: WeightLayout::Checkpoint, packed }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.layout == WeightLayout::Checkpoint && self.packed.is_none() {
            return x.linear(&self.weight, self.bias.as_ref());
        }
        // Packed and transposed products take a matrix: fold the leading dimensions, unfold after.
        let mut shape = x.size();
        let input = shape.pop().expect("a Linear input has a feature dimension");
        let x2 = x.reshape([-1, input]);
        let y = match self.packed.as_ref().and_then(|p| p.matmul(&x2, self.bias.as_ref())) {
            Some(y) => y,
            None => match (self.layout, &self.bias) {
                (WeightLayout::Checkpoint, bias) => x2.linear(&self.weight, bias.as_ref()),
                (WeightLayout::Transposed, Some(b)) => b.addmm(&x2, &self.weight),
                (WeightLayout::Transposed, None) => x2.mm(&self.weight),
            },
        };
        shape.push(y.size()[1]);
        y.view(shape.as_slice())
    }
}

/// LayerNorm with weight and bias (GPT-NeoX, BERT), HF names `{name}.weight` / `{name}.bias`.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[dim])?,
            bias: w.get(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.weight.size()[0]], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// State of one forward call shared by every layer: rotary positions, the attention mask, and the
/// cache the layers append their keys and values to (none when scoring or training whole sequences).
pub struct Step<'a> {
    pub positions: Tensor,
    pub mask: Tensor,
    cache: Option<&'a mut KvCache>,
    /// Run only the first this many decoder layers (then the final norm); `None`: all of them.
    pub depth: Option<usize>,
    /// Keep the residual stream after this many layers in `tapped` (the forward goes on through every layer).
    pub tap: Option<usize>,
    pub tapped: Option<Tensor>,
}

impl Step<'_> {
    /// Called by an architecture after its layer `i` (from 0) with the residual stream `x`.
    fn after_layer(&mut self, i: usize, x: &Tensor) {
        if self.tap == Some(i + 1) {
            self.tapped = Some(x.shallow_clone());
        }
    }
}

impl Step<'_> {
    /// The keys/values layer `layer` attends over: the new ones alone, or every cached slot so far.
    fn keys_values(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        match self.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v),
            None => (k, v),
        }
    }
}

/// What the layers of one layer-by-layer forward share ([`Backbone::begin`]).
pub struct LayerPass {
    step: Step<'static>,
    cos: Tensor,
    sin: Tensor,
}

/// A transformer stack up to and including its final norm.
pub enum Backbone {
    GptNeoX(gpt_neox::GptNeoX),
    Llama(llama::Llama),
}

impl Backbone {
    pub fn load(config: &ModelConfig, w: &Weights, prefix: &str) -> Result<Self> {
        Ok(match &config.arch {
            ArchConfig::GptNeoX(c) => Backbone::GptNeoX(gpt_neox::GptNeoX::load(c, w, prefix)?),
            ArchConfig::Llama(c) => Backbone::Llama(llama::Llama::load(c, w, prefix)?),
        })
    }

    /// Hidden states [B, T, H] after the final norm for `ids` [B, T]. `valid` [B, T] marks real tokens
    /// (false for left padding); `positions` [B, T] are the rotary positions. With a cache, the new tokens
    /// attend to every cached slot and are appended to it.
    pub fn forward(&self, ids: &Tensor, valid: &Tensor, positions: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.forward_to_depth(ids, valid, positions, cache, None)
    }

    /// `forward` through the first `depth` decoder layers only, then the final norm (`None`: every layer): the
    /// states an intermediate-layer value head reads. A cache filled this way holds only those layers' keys.
    pub fn forward_to_depth(
        &self,
        ids: &Tensor,
        valid: &Tensor,
        positions: &Tensor,
        cache: Option<&mut KvCache>,
        depth: Option<usize>,
    ) -> Tensor {
        self.forward_impl(ids, valid, positions, cache, depth, None).0
    }

    /// `forward` through every layer, and also the states after the first `tap` layers (with the final norm,
    /// as `forward_to_depth(tap)` gives them): the decoder's logits and an intermediate-layer value head's input
    /// from one pass. `None`, or every layer: the second output is the first.
    pub fn forward_tapped(
        &self,
        ids: &Tensor,
        valid: &Tensor,
        positions: &Tensor,
        cache: Option<&mut KvCache>,
        tap: Option<usize>,
    ) -> (Tensor, Tensor) {
        let (hidden, tapped) = self.forward_impl(ids, valid, positions, cache, None, tap);
        let tapped = tapped.map_or_else(|| hidden.shallow_clone(), |x| self.final_norm(&x));
        (hidden, tapped)
    }

    fn final_norm(&self, x: &Tensor) -> Tensor {
        match self {
            Backbone::GptNeoX(m) => m.finish(x),
            Backbone::Llama(m) => m.finish(x),
        }
    }

    fn forward_impl(
        &self,
        ids: &Tensor,
        valid: &Tensor,
        positions: &Tensor,
        cache: Option<&mut KvCache>,
        depth: Option<usize>,
        tap: Option<usize>,
    ) -> (Tensor, Option<Tensor>) {
        let new = ids.size()[1];
        let (mask, cache) = match cache {
            Some(c) => {
                let past = c.len();
                let all = c.push_valid(valid);
                (attention::causal_mask(&all, past, new), Some(c))
            }
            None => (attention::causal_mask(valid, 0, new), None),
        };
        // Additive form, built once per forward for every layer: libtorch's fused CPU kernel takes a float mask
        // directly, while a bool one is converted inside every attention call (worker/examples/sdpa_probe.rs).
        let mask = Tensor::zeros(mask.size(), (self.kind(), mask.device()))
            .masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
        let mut step = Step { positions: positions.shallow_clone(), mask, cache, depth, tap, tapped: None };
        let hidden = match self {
            Backbone::GptNeoX(m) => m.forward(ids, &mut step),
            Backbone::Llama(m) => m.forward(ids, &mut step),
        };
        if let Some(c) = step.cache {
            c.advance(new);
        }
        (hidden, step.tapped)
    }

    /// Starts a layer-by-layer forward (no cache) of `ids` [B, T]: the pass every [`Self::layer`] call of it
    /// shares (mask, rotary tables). Training drives the layers one at a time to recompute them in the backward
    /// (activation checkpointing) and to gather each layer's sharded weights only while it runs;
    /// `embed` → `layer` 0..n → `finish` computes exactly what [`Self::forward`] does.
    pub fn begin(&self, valid: &Tensor, positions: &Tensor) -> LayerPass {
        let mask = attention::causal_mask(valid, 0, valid.size()[1]);
        let mask = Tensor::zeros(mask.size(), (self.kind(), mask.device()))
            .masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
        let (cos, sin) = match self {
            Backbone::GptNeoX(m) => m.rope_tables(positions),
            Backbone::Llama(m) => m.rope_tables(positions),
        };
        LayerPass {
            step: Step {
                positions: positions.shallow_clone(),
                mask,
                cache: None,
                depth: None,
                tap: None,
                tapped: None,
            },
            cos,
            sin,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Backbone::GptNeoX(m) => m.num_layers(),
            Backbone::Llama(m) => m.num_layers(),
        }
    }

    /// The input of layer 0: the token embeddings [B, T, H].
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        match self {
            Backbone::GptNeoX(m) => m.embed(ids),
            Backbone::Llama(m) => m.embed(ids),
        }
    }

    /// Layer `i` of a pass begun with [`Self::begin`].
    pub fn layer(&self, i: usize, x: &Tensor, pass: &mut LayerPass) -> Tensor {
        let LayerPass { step, cos, sin } = pass;
        match self {
            Backbone::GptNeoX(m) => m.layer(i, x, cos, sin, step),
            Backbone::Llama(m) => m.layer(i, x, cos, sin, step),
        }
    }

    /// The final norm after the last layer: the hidden states [`Self::forward`] returns.
    pub fn finish(&self, x: &Tensor) -> Tensor {
        match self {
            Backbone::GptNeoX(m) => m.finish(x),
            Backbone::Llama(m) => m.finish(x),
        }
    }

    pub fn cache_shape(&self) -> CacheShape {
        match self {
            Backbone::GptNeoX(m) => m.cache_shape(),
            Backbone::Llama(m) => m.cache_shape(),
        }
    }

    /// An empty cache for `batch` rows of at most `capacity` tokens, in the weights' dtype and device.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        let e = self.embeddings();
        KvCache::new(self.cache_shape(), batch, capacity, e.kind(), e.device())
    }

    /// The input embedding matrix [V, H] (also the output head when embeddings are tied).
    pub fn embeddings(&self) -> &Tensor {
        match self {
            Backbone::GptNeoX(m) => m.embeddings(),
            Backbone::Llama(m) => m.embeddings(),
        }
    }

    pub fn device(&self) -> Device {
        self.embeddings().device()
    }

    pub fn kind(&self) -> Kind {
        self.embeddings().kind()
    }
}

/// A checkpoint folder loaded once: config, weights on the target device, and the backbone's name prefix.
/// Heads are built from it, sharing the backbone (`Arc`) so a policy and a value head on the same
/// checkpoint hold one copy of the weights.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub weights: Weights,
    pub prefix: String,
}

impl Checkpoint {
    /// For inference: dense layers may keep their own copy of a matrix in a faster layout (`WeightLayout`).
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::with_weights(dir, Weights::load(dir, kind, device)?)
    }

    /// For training: every layer uses the checkpoint's own tensors (the ones `weights` lists).
    pub fn load_trainable(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::with_weights(dir, Weights::load(dir, kind, device)?.trainable())
    }

    fn with_weights(dir: &Path, weights: Weights) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let prefix = backbone_prefix(&config, &weights);
        Ok(Self { config, weights, prefix })
    }

    pub fn backbone(&self) -> Result<Arc<Backbone>> {
        // An `Arc` only to share one copy of the weights between heads on the same thread (policy, head-kind
        // values); `Pipeline` documents why moving all of them together to another thread is sound.
        #[allow(clippy::arc_with_non_send_sync)]
        Ok(Arc::new(Backbone::load(&self.config, &self.weights, &self.prefix)?))
    }
}

/// Where the backbone's tensors live: HF classes use `gpt_neox.` / `model.`; reward-model wrappers
/// put the backbone under `lm_backbone.`; a bare `GPTNeoXModel`/`LlamaModel` has no prefix.
fn backbone_prefix(config: &ModelConfig, w: &Weights) -> String {
    let embed = match config.arch {
        ArchConfig::GptNeoX(_) => "embed_in.weight",
        ArchConfig::Llama(_) => "embed_tokens.weight",
    };
    for prefix in ["gpt_neox.", "model.", "lm_backbone.", "lm_backbone.gpt_neox.", "lm_backbone.model.", ""] {
        if w.contains(&format!("{prefix}{embed}")) {
            return prefix.to_owned();
        }
    }
    // Nothing matches: fall back to the HF class's own prefix so the error names the tensor it expects.
    match config.arch {
        ArchConfig::GptNeoX(_) => "gpt_neox.".into(),
        ArchConfig::Llama(_) => "model.".into(),
    }
}

/// Rotary positions for a padded batch: each real token's index among its row's real tokens
/// (`cumsum(mask) - 1`, clamped at 0 for padding), as transformers computes them for left padding.
pub fn positions_from_valid(valid: &Tensor) -> Tensor {
    (valid.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0)
}
