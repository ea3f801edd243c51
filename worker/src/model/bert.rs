//! BERT encoder (`BertModel`; all-MiniLM-L6-v2 is one): word + learned absolute position + token-type
//! embeddings, then post-norm layers of bidirectional attention over the real tokens and an exact-erf GELU
//! MLP. It feeds the sentence encoder of the embedding-similarity reward. Weight names are HF's, bare or
//! under the `bert.` prefix that the `BertFor*` classes add; extra tensors (`embeddings.position_ids`,
//! the pooler) are ignored.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::weights::Weights;
use super::{LayerNorm, Linear};
use crate::error::{Error, Result};

/// The `config.json` fields the encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
}

impl BertConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint { path: path.clone(), message: format!("malformed JSON: {e}") })?;
        Self::from_json(&raw, &path)
    }

    /// Refuses settings that would silently change the output (another activation, relative positions)
    /// rather than computing something else than the checkpoint was trained with.
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let err = |message: String| Error::Checkpoint { path: PathBuf::from(path), message };
        let int = |key: &str| {
            raw.get(key).and_then(Value::as_i64).ok_or_else(|| err(format!("missing integer field `{key}`")))
        };
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "bert" {
            return Err(err(format!("model_type `{model_type}` is not a BERT encoder (expected `bert`)")));
        }
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str).filter(|a| *a != "gelu") {
            return Err(err(format!("hidden_act `{act}` is not supported (only `gelu`, the exact erf form)")));
        }
        if let Some(pos) = raw.get("position_embedding_type").and_then(Value::as_str).filter(|p| *p != "absolute") {
            return Err(err(format!("position_embedding_type `{pos}` is not supported (only `absolute`)")));
        }
        let cfg = Self {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads: int("num_attention_heads")?,
            intermediate_size: int("intermediate_size")?,
            max_position_embeddings: int("max_position_embeddings")?,
            type_vocab_size: raw.get("type_vocab_size").and_then(Value::as_i64).unwrap_or(2),
            layer_norm_eps: raw.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-12),
            pad_token_id: raw.get("pad_token_id").and_then(Value::as_i64),
        };
        if cfg.num_heads <= 0 || cfg.hidden_size % cfg.num_heads != 0 {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_heads
            )));
        }
        Ok(cfg)
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
}

/// One post-norm layer; field names follow HF's `encoder.layer.{i}.*`.
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct Bert {
    pub config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    /// Loads `dir`'s config.json and weights, floating tensors cast to `kind` on `device`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let config = BertConfig::load(dir)?;
        let weights = Weights::load(dir, kind, device)?;
        Self::from_weights(&config, &weights)
    }

    /// Builds the encoder from weights already loaded, finding the name prefix (`bert.` or none) itself.
    pub fn from_weights(cfg: &BertConfig, w: &Weights) -> Result<Self> {
        // With neither present, the bare names make the error name the tensor a `BertModel` file has.
        let prefix = if w.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layer.{i}");
                let lin = |name: &str, i, o| Linear::load(w, &format!("{p}.{name}"), i, o, true);
                Ok(Layer {
                    query: lin("attention.self.query", h, h)?,
                    key: lin("attention.self.key", h, h)?,
                    value: lin("attention.self.value", h, h)?,
                    attention_output: lin("attention.output.dense", h, h)?,
                    attention_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    intermediate: lin("intermediate.dense", h, cfg.intermediate_size)?,
                    output: lin("output.dense", cfg.intermediate_size, h)?,
                    output_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let e = format!("{prefix}embeddings");
        Ok(Self {
            config: cfg.clone(),
            word_embeddings: w.get(&format!("{e}.word_embeddings.weight"), &[cfg.vocab_size, h])?,
            position_embeddings: w
                .get(&format!("{e}.position_embeddings.weight"), &[cfg.max_position_embeddings, h])?,
            token_type_embeddings: w.get(&format!("{e}.token_type_embeddings.weight"), &[cfg.type_vocab_size, h])?,
            embeddings_norm: LayerNorm::load(w, &format!("{e}.LayerNorm"), h, eps)?,
            layers,
        })
    }

    pub fn device(&self) -> Device {
        self.word_embeddings.device()
    }

    pub fn kind(&self) -> Kind {
        self.word_embeddings.kind()
    }

    /// `last_hidden_state` [B, T, H] for `ids` [B, T]. `valid` [B, T] marks real tokens; padding keys are
    /// hidden from every query (padding may sit anywhere, but every row needs at least one real token).
    /// Positions are 0..T, as `BertModel` uses them, so padding goes on the right. `token_types` defaults
    /// to all zeros (single sentences).
    pub fn forward(&self, ids: &Tensor, valid: &Tensor, token_types: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        if t > self.config.max_position_embeddings {
            return Err(Error::InvalidRequest(format!(
                "BERT input of {t} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let positions = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
        let types = match token_types {
            Some(tt) => tt.shallow_clone(),
            None => Tensor::zeros([b, t], (Kind::Int64, ids.device())),
        };
        let x = Tensor::embedding(&self.word_embeddings, ids, -1, false, false)
            + Tensor::embedding(&self.position_embeddings, &positions, -1, false, false)
            + Tensor::embedding(&self.token_type_embeddings, &types, -1, false, false);
        let mut x = self.embeddings_norm.forward(&x);
        // [B, 1, 1, T]: every query sees every real key.
        let mask = valid.to_kind(Kind::Bool).view([b, 1, 1, t]);
        for layer in &self.layers {
            let attn = layer.attention_output.forward(&self.attention(layer, &x, &mask));
            x = layer.attention_norm.forward(&(attn + &x));
            let mlp = layer.output.forward(&layer.intermediate.forward(&x).gelu("none"));
            x = layer.output_norm.forward(&(mlp + &x));
        }
        Ok(x)
    }

    fn attention(&self, layer: &Layer, x: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (nh, hd) = (self.config.num_heads, self.config.head_dim());
        let split = |l: &Linear| l.forward(x).view([b, t, nh, hd]).transpose(1, 2);
        let (q, k, v) = (split(&layer.query), split(&layer.key), split(&layer.value));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, false);
        out.transpose(1, 2).reshape([b, t, nh * hd])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<BertConfig> {
        BertConfig::from_json(&v, Path::new("config.json"))
    }

    fn minimal() -> Value {
        json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 12})
    }

    #[test]
    fn config_defaults_and_required_fields() {
        let cfg = parse(minimal()).unwrap();
        assert_eq!((cfg.type_vocab_size, cfg.layer_norm_eps, cfg.head_dim()), (2, 1e-12, 4));
        let mut v = minimal();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
    }

    #[test]
    fn config_refuses_what_would_change_the_output() {
        for (key, val) in
            [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"), ("model_type", "roberta")]
        {
            let mut v = minimal();
            v[key] = json!(val);
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(val), "{key}: {e}");
        }
    }
}
