//! Heads on a backbone: next-token logits (`CausalLm`) and one scalar per position (`ScalarModel`) —
//! a value function reads every position, a reward model the last real token.

use iro_common::config::ValuePooling;
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::{ArchConfig, Backbone, Checkpoint, Linear, ModelConfig};
use crate::error::{Error, Result};
use crate::generate::kv_cache::KvCache;

/// A causal language model: backbone + output projection (its own, or tied to the input embeddings).
pub struct CausalLm {
    pub config: ModelConfig,
    pub backbone: Arc<Backbone>,
    lm_head: Linear,
}

impl CausalLm {
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(dir, kind, device)?)
    }

    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let backbone = ck.backbone()?;
        let shape = [ck.config.vocab_size(), ck.config.hidden_size()];
        let head_name = match ck.config.arch {
            ArchConfig::GptNeoX(_) => "embed_out.weight",
            ArchConfig::Llama(_) => "lm_head.weight",
        };
        let lm_head = match ck.weights.get_opt(head_name, &shape)? {
            Some(w) => Linear::new(w, None, ck.weights.layout()),
            None if ck.config.tie_word_embeddings() => {
                Linear::tied(backbone.embeddings().shallow_clone(), ck.weights.layout())
            }
            // Untied but absent: let `get` produce the error that names the tensor and the files.
            None => Linear::new(ck.weights.get(head_name, &shape)?, None, ck.weights.layout()),
        };
        Ok(Self { config: ck.config.clone(), backbone, lm_head })
    }

    /// Hidden states and logits [B, T, V] for the new tokens (see `Backbone::forward`).
    pub fn forward(&self, ids: &Tensor, valid: &Tensor, positions: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.logits(&self.backbone.forward(ids, valid, positions, cache))
    }

    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }
}

/// A linear map from a hidden state to one scalar, `w·h + b − offset`.
pub struct ScalarHead {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Subtracted from every output: the TL;DR reward models' `bias` config field, which centres the
    /// reference summaries' mean score at 0.
    pub offset: f64,
}

impl ScalarHead {
    /// [B, T, H] → [B, T], in the head's own dtype (an f32 value head on bf16 states reads them in f32).
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        let out = hidden.to_kind(self.weight.kind()).linear(&self.weight, self.bias.as_ref()).squeeze_dim(-1);
        if self.offset == 0.0 { out } else { out - self.offset }
    }
}

/// A small MLP value head on frozen hidden states: `w2 · gelu(w1 · h + b1) + b2`, [B, T, H] → [B, T].
pub struct MlpHead {
    pub dense_weight: Tensor,
    pub dense_bias: Tensor,
    pub out_weight: Tensor,
    pub out_bias: Tensor,
}

impl MlpHead {
    pub const NAMES: [&'static str; 4] =
        ["value_head.dense.weight", "value_head.dense.bias", "value_head.out.weight", "value_head.out.bias"];

    /// Fresh weights: small normal `dense`, zero `out` bias, small normal `out` weight.
    pub fn new(hidden: i64, width: i64, seed: u64, device: Device) -> Self {
        let t = |data: Vec<f32>, shape: &[i64]| Tensor::from_slice(&data).view(shape).to_device(device);
        Self {
            dense_weight: t(
                crate::train::value::normal_init((width * hidden) as usize, crate::train::value::INIT_STD, seed),
                &[width, hidden],
            ),
            dense_bias: Tensor::zeros([width], (Kind::Float, device)),
            out_weight: t(
                crate::train::value::normal_init(width as usize, crate::train::value::INIT_STD, seed ^ 0x5EED),
                &[1, width],
            ),
            out_bias: Tensor::zeros([1], (Kind::Float, device)),
        }
    }

    /// Loads a head saved by `checkpoint::save` (`model.safetensors` with the four `value_head.*` tensors).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let file = dir.join("model.safetensors");
        let tensors = Tensor::read_safetensors(&file)
            .map_err(|e| Error::Checkpoint { path: file.clone(), message: format!("cannot read safetensors: {e}") })?;
        let get = |name: &str| {
            tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_kind(Kind::Float).to_device(device)).ok_or_else(
                || Error::MissingTensor { path: dir.to_owned(), name: name.into(), files: file.display().to_string() },
            )
        };
        Ok(Self {
            dense_weight: get(Self::NAMES[0])?,
            dense_bias: get(Self::NAMES[1])?,
            out_weight: get(Self::NAMES[2])?,
            out_bias: get(Self::NAMES[3])?,
        })
    }

    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        let h = hidden.to_kind(Kind::Float).linear(&self.dense_weight, Some(&self.dense_bias)).gelu("none");
        h.linear(&self.out_weight, Some(&self.out_bias)).squeeze_dim(-1)
    }

    pub fn named(&self) -> Vec<(String, Tensor)> {
        let ts = [&self.dense_weight, &self.dense_bias, &self.out_weight, &self.out_bias];
        Self::NAMES.iter().zip(ts).map(|(n, t)| ((*n).to_owned(), t.shallow_clone())).collect()
    }
}

/// Tensor names of a linear `head`-kind value (`value.head_fit = "ridge"`): weight [1, H], bias [1].
pub const LINEAR_VALUE_HEAD: [&str; 2] = ["value_head.linear.weight", "value_head.linear.bias"];

/// The head of a `head`-kind value folder (`model.safetensors`): the MLP (`MlpHead::NAMES`) or the linear head
/// of a ridge fit (`LINEAR_VALUE_HEAD`), in f32 on `device`.
pub fn load_value_head(dir: &Path, device: Device) -> Result<Head> {
    let file = dir.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&file)
        .map_err(|e| Error::Checkpoint { path: file.clone(), message: format!("cannot read safetensors: {e}") })?;
    if tensors.iter().any(|(n, _)| n == MlpHead::NAMES[0]) {
        return Ok(Head::Mlp(MlpHead::load(dir, device)?));
    }
    let get = |name: &str| {
        tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_kind(Kind::Float).to_device(device)).ok_or_else(
            || Error::MissingTensor {
                path: dir.to_owned(),
                name: format!("{name} (or the MLP head's {})", MlpHead::NAMES[0]),
                files: file.display().to_string(),
            },
        )
    };
    let (weight, bias) = (get(LINEAR_VALUE_HEAD[0])?, get(LINEAR_VALUE_HEAD[1])?);
    if weight.dim() != 2 || weight.size()[0] != 1 || bias.size() != [1] {
        return Err(Error::Checkpoint {
            path: file,
            message: format!(
                "a linear value head needs weight [1, H] and bias [1], got {:?} and {:?}",
                weight.size(),
                bias.size()
            ),
        });
    }
    Ok(Head::Linear(ScalarHead { weight, bias: Some(bias), offset: 0.0 }))
}

/// The head of a `ScalarModel`: a linear map (reward models, `model`-kind values, ridge-fitted `head`-kind values)
/// or the MLP of a `head`-kind value function on the frozen policy's hidden states.
pub enum Head {
    Linear(ScalarHead),
    Mlp(MlpHead),
}

impl Head {
    /// Width of the hidden state the head reads.
    pub fn input_width(&self) -> i64 {
        match self {
            Head::Linear(h) => h.weight.size()[1],
            Head::Mlp(h) => h.dense_weight.size()[1],
        }
    }

    /// [B, T, H] → [B, T]
    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        match self {
            Head::Linear(h) => h.forward(hidden),
            Head::Mlp(h) => h.forward(hidden),
        }
    }
}

/// A backbone with a scalar head at every position: reward models and value functions.
pub struct ScalarModel {
    pub config: ModelConfig,
    pub backbone: Arc<Backbone>,
    pub head: Head,
    /// The head reads the states after this many decoder layers (then the final norm); `None`: the final ones.
    /// Only a `head`-kind value on an intermediate layer (`value.feature_layers`) sets it.
    pub depth: Option<usize>,
    /// What of those states the head reads for a prefix (`value.pooling`); a [2H] input for `last_mean`.
    pub pooling: ValuePooling,
}

impl ScalarModel {
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(dir, kind, device)?)
    }

    /// Reads the head in whichever convention the checkpoint uses: HF's `*ForSequenceClassification`
    /// (`score.weight`, no bias) or the TL;DR reward models' `scalar_head` (weight + bias, and the
    /// config's `bias` subtracted).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let h = ck.config.hidden_size();
        let w = &ck.weights;
        let head = if let Some(weight) = w.get_opt("score.weight", &[1, h])? {
            ScalarHead { weight, bias: w.get_opt("score.bias", &[1])?, offset: 0.0 }
        } else if let Some(weight) = w.get_opt("scalar_head.weight", &[1, h])? {
            let offset = ck.config.raw.get("bias").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            ScalarHead { weight, bias: w.get_opt("scalar_head.bias", &[1])?, offset }
        } else {
            if ck.config.num_labels != 1 && ck.config.class.ends_with("ForSequenceClassification") {
                return Err(Error::Checkpoint {
                    path: w.dir().to_owned(),
                    message: format!("a scalar head needs num_labels = 1, config has {}", ck.config.num_labels),
                });
            }
            return Err(Error::MissingTensor {
                path: w.dir().to_owned(),
                name: "score.weight (or scalar_head.weight)".into(),
                files: "model weights".into(),
            });
        };
        Ok(Self {
            config: ck.config.clone(),
            backbone: ck.backbone()?,
            head: Head::Linear(head),
            depth: None,
            pooling: ValuePooling::Last,
        })
    }

    /// Per-position values [B, T].
    pub fn values(&self, ids: &Tensor, valid: &Tensor, positions: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.head.forward(&self.backbone.forward_to_depth(ids, valid, positions, cache, self.depth))
    }

    /// One score per row, read at the last real token (works for left and right padding).
    pub fn score(&self, ids: &Tensor, valid: &Tensor) -> Tensor {
        let positions = super::positions_from_valid(valid);
        let values = self.values(ids, valid, &positions, None);
        gather_last(&values, valid)
    }
}

/// `values` [B, T] read at each row's last `valid` position.
pub fn gather_last(values: &Tensor, valid: &Tensor) -> Tensor {
    let t = valid.size()[1];
    let idx = Tensor::arange(t, (Kind::Int64, valid.device())).unsqueeze(0) * valid.to_kind(Kind::Int64);
    let last = idx.argmax(-1, true);
    values.gather(1, &last, false).squeeze_dim(1)
}
