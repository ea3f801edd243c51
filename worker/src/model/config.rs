//! Architecture hyper-parameters read from an HF `config.json`. Parsed from a JSON value rather than a
//! fixed serde struct because transformers has renamed keys across versions (`rotary_pct` vs
//! `partial_rotary_factor`, `rope_theta` at the top level vs inside `rope_parameters`); every spelling a
//! released checkpoint uses is accepted, and a missing required key is an error naming it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// Which backbone a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchConfig {
    GptNeoX(NeoXConfig),
    Llama(LlamaConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeoXConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub intermediate_size: i64,
    /// Fraction of each head's dimensions that are rotated (Pythia: 0.25).
    pub rotary_pct: f64,
    pub rope_theta: f64,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub tie_word_embeddings: bool,
}

impl NeoXConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }
    pub fn rotary_dims(&self) -> i64 {
        (self.head_dim() as f64 * self.rotary_pct) as i64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub intermediate_size: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

/// Llama-3.1's frequency-dependent RoPE rescaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Everything the engine needs from config.json beyond the backbone shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: ArchConfig,
    /// `architectures[0]`, e.g. `LlamaForCausalLM`, `GPTNeoXForSequenceClassification`.
    pub class: String,
    pub num_labels: i64,
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
    pub pad_token_id: Option<i64>,
    /// The raw JSON, kept so a saved value model can carry the config it was built from.
    pub raw: Value,
}

impl ModelConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint { path: path.clone(), message: format!("malformed JSON: {e}") })?;
        Self::from_json(raw, &path)
    }

    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let top = Reader { v: &raw, path };
        // The TL;DR reward models (`ScalarModel`) nest their backbone's config under `base_config`.
        let r = match (top.str_opt(&["model_type"]), raw.get("base_config")) {
            (None, Some(base)) if base.is_object() => Reader { v: base, path },
            _ => top,
        };
        let class = raw.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("").to_owned();
        let model_type = r.str_opt(&["model_type"]).unwrap_or_default();
        let arch = match model_type.as_str() {
            "gpt_neox" => ArchConfig::GptNeoX(NeoXConfig {
                vocab_size: r.int(&["vocab_size"])?,
                hidden_size: r.int(&["hidden_size"])?,
                num_layers: r.int(&["num_hidden_layers"])?,
                num_heads: r.int(&["num_attention_heads"])?,
                intermediate_size: r.int(&["intermediate_size"])?,
                rotary_pct: r
                    .float_opt(&["rotary_pct", "partial_rotary_factor", "rope_parameters.partial_rotary_factor"])
                    .unwrap_or(0.25),
                rope_theta: r
                    .float_opt(&["rope_theta", "rotary_emb_base", "rope_parameters.rope_theta"])
                    .unwrap_or(10000.0),
                layer_norm_eps: r.float_opt(&["layer_norm_eps"]).unwrap_or(1e-5),
                use_parallel_residual: r.bool_opt("use_parallel_residual").unwrap_or(true),
                tie_word_embeddings: r.bool_opt("tie_word_embeddings").unwrap_or(false),
            }),
            "llama" | "mistral" => {
                let hidden_size = r.int(&["hidden_size"])?;
                let num_heads = r.int(&["num_attention_heads"])?;
                let head_dim = match raw.get("head_dim") {
                    Some(Value::Number(n)) => n.as_i64().unwrap_or(hidden_size / num_heads),
                    _ => hidden_size / num_heads,
                };
                ArchConfig::Llama(LlamaConfig {
                    vocab_size: r.int(&["vocab_size"])?,
                    hidden_size,
                    num_layers: r.int(&["num_hidden_layers"])?,
                    num_heads,
                    num_kv_heads: r.int(&["num_key_value_heads"]).unwrap_or(num_heads),
                    head_dim,
                    intermediate_size: r.int(&["intermediate_size"])?,
                    rms_norm_eps: r.float_opt(&["rms_norm_eps"]).unwrap_or(1e-6),
                    rope_theta: r.float_opt(&["rope_theta", "rope_parameters.rope_theta"]).unwrap_or(10000.0),
                    rope_scaling: r.rope_scaling()?,
                    tie_word_embeddings: r.bool_opt("tie_word_embeddings").unwrap_or(false),
                    attention_bias: r.bool_opt("attention_bias").unwrap_or(false),
                    mlp_bias: r.bool_opt("mlp_bias").unwrap_or(false),
                })
            }
            other => {
                let arch = if other.is_empty() { format!("{class} (no model_type)") } else { other.to_owned() };
                return Err(Error::UnsupportedArchitecture { path: path.to_owned(), arch });
            }
        };
        Ok(Self {
            arch,
            class,
            num_labels: Reader { v: &raw, path }.int(&["num_labels"]).unwrap_or_else(|_| {
                raw.get("id2label").and_then(Value::as_object).map(|m| m.len() as i64).unwrap_or(1)
            }),
            eos_token_ids: match raw.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
                _ => Vec::new(),
            },
            bos_token_id: raw.get("bos_token_id").and_then(Value::as_i64),
            pad_token_id: raw.get("pad_token_id").and_then(Value::as_i64),
            raw,
        })
    }

    pub fn vocab_size(&self) -> i64 {
        match &self.arch {
            ArchConfig::GptNeoX(c) => c.vocab_size,
            ArchConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> i64 {
        match &self.arch {
            ArchConfig::GptNeoX(c) => c.hidden_size,
            ArchConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match &self.arch {
            ArchConfig::GptNeoX(c) => c.num_layers as usize,
            ArchConfig::Llama(c) => c.num_layers as usize,
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match &self.arch {
            ArchConfig::GptNeoX(c) => c.tie_word_embeddings,
            ArchConfig::Llama(c) => c.tie_word_embeddings,
        }
    }
}

/// Typed lookups with alternative spellings; `a.b` reads a nested key.
struct Reader<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn lookup(&self, key: &str) -> Option<&Value> {
        key.split('.').try_fold(self.v, |v, k| v.get(k)).filter(|v| !v.is_null())
    }

    fn int(&self, keys: &[&str]) -> Result<i64> {
        keys.iter().find_map(|k| self.lookup(k).and_then(Value::as_i64)).ok_or_else(|| self.missing(keys))
    }

    fn float_opt(&self, keys: &[&str]) -> Option<f64> {
        keys.iter().find_map(|k| self.lookup(k).and_then(Value::as_f64))
    }

    fn str_opt(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find_map(|k| self.lookup(k).and_then(Value::as_str).map(str::to_owned))
    }

    fn bool_opt(&self, key: &str) -> Option<bool> {
        self.lookup(key).and_then(Value::as_bool)
    }

    fn missing(&self, keys: &[&str]) -> Error {
        Error::Checkpoint {
            path: PathBuf::from(self.path),
            message: format!("missing integer field `{}`", keys.join("` / `")),
        }
    }

    /// `rope_scaling` (or transformers 5's `rope_parameters`): absent/default, or llama3; anything else is refused
    /// rather than silently ignored, since it would change every logit.
    fn rope_scaling(&self) -> Result<Option<Llama3RopeScaling>> {
        let Some(s) = self.lookup("rope_scaling").or_else(|| self.lookup("rope_parameters")) else { return Ok(None) };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| {
            s.get(k).and_then(Value::as_f64).ok_or_else(|| Error::Checkpoint {
                path: PathBuf::from(self.path),
                message: format!("rope_scaling of type llama3 lacks `{k}`"),
            })
        };
        match kind {
            "default" => Ok(None),
            "llama3" => Ok(Some(Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            })),
            other => Err(Error::Checkpoint {
                path: PathBuf::from(self.path),
                message: format!("rope_scaling type `{other}` is not supported (supported: default, llama3)"),
            }),
        }
    }
}
