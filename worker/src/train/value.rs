//! The value function being trained, in its two kinds (`value.kind`): `model`, a whole backbone + scalar head
//! whose every weight is trained (the paper), and `head`, a small MLP on the frozen policy's last hidden
//! states (our addition: no second forward pass at decode time). Each lists its trainable tensors by name,
//! in a fixed order, so the optimizer state and the checkpoints line up.

use std::path::Path;
use std::sync::Arc;

use iro_common::data::SplitMix64;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
pub use crate::model::heads::MlpHead;
use crate::model::heads::{Head, ScalarHead};
use crate::model::{ArchConfig, Backbone, Checkpoint, ModelConfig, ScalarModel};

/// Standard deviation of a freshly initialised head (HF's `initializer_range` default).
pub(crate) const INIT_STD: f64 = 0.02;

/// `n` normal draws (Box-Muller on SplitMix64), so a fresh head is the same on every device and libtorch build.
pub fn normal_init(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut uniform = move || -> f64 { ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64 };
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// What is being trained.
pub enum TrainableValue {
    /// Every floating backbone tensor and the scalar head.
    Model {
        model: Box<ScalarModel>,
        /// Trainable tensors under the names they are saved with (HF's canonical backbone prefix,
        /// `score.weight`, `score.bias`), sorted by name.
        params: Vec<(String, Tensor)>,
    },
    /// Only the head; the backbone runs under `no_grad`, through its first `depth` layers (`None`: all).
    Head { backbone: Arc<Backbone>, head: MlpHead, depth: Option<usize> },
}

/// HF's own prefix for the backbone of `*ForSequenceClassification`.
pub fn canonical_prefix(config: &ModelConfig) -> &'static str {
    match config.arch {
        ArchConfig::GptNeoX(_) => "gpt_neox.",
        ArchConfig::Llama(_) => "model.",
    }
}

impl TrainableValue {
    /// A `model`-kind value function from an HF folder: a `*ForSequenceClassification` / reward checkpoint
    /// (or one saved by this trainer) keeps its head; a policy folder gets a fresh small-random `score.weight`
    /// drawn from `seed`. `kind` should be f32 for training.
    pub fn model_from_dir(dir: &Path, kind: Kind, device: Device, seed: u64) -> Result<Self> {
        let ck = Checkpoint::load_trainable(dir, kind, device)?;
        let h = ck.config.hidden_size();
        let has_head = ck.weights.contains("score.weight") || ck.weights.contains("scalar_head.weight");
        let model = if has_head {
            ScalarModel::from_checkpoint(&ck)?
        } else {
            let w = Tensor::from_slice(&normal_init(h as usize, INIT_STD, seed))
                .view([1, h])
                .to_kind(kind)
                .to_device(device);
            ScalarModel {
                config: ck.config.clone(),
                backbone: ck.backbone()?,
                head: Head::Linear(ScalarHead { weight: w, bias: None, offset: 0.0 }),
                depth: None,
                pooling: iro_common::config::ValuePooling::Last,
            }
        };
        let canonical = canonical_prefix(&ck.config);
        let mut params: Vec<(String, Tensor)> = ck
            .weights
            .tensors()
            .filter(|(_, t)| t.is_floating_point())
            .filter_map(|(n, t)| n.strip_prefix(ck.prefix.as_str()).map(|rest| (format!("{canonical}{rest}"), t)))
            // A checkpoint without a prefix also holds its head: keep the backbone's tensors only.
            .filter(|(n, _)| !n.contains("score.") && !n.contains("scalar_head."))
            .map(|(n, t)| (n, t.shallow_clone()))
            .collect();
        let Head::Linear(head) = &model.head else {
            return Err(Error::Checkpoint {
                path: dir.to_owned(),
                message: "a `model` value function needs a linear score head".into(),
            });
        };
        params.push(("score.weight".into(), head.weight.shallow_clone()));
        if let Some(b) = &head.bias {
            params.push(("score.bias".into(), b.shallow_clone()));
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, t) in &params {
            let _ = t.set_requires_grad(true);
        }
        Ok(Self::Model { model: Box::new(model), params })
    }

    /// A `head`-kind value function on a frozen backbone: fresh (`from = None`, width `width`, drawn from `seed`,
    /// its output bias at `start`, the mean training target) or loaded from a saved head checkpoint.
    ///
    /// Why the bias: rewards are used in their own units (β keeps its meaning) and need not be centred (the
    /// MiniLM similarity sits near 0.6); a head whose output starts at 0 spends its first steps fitting that
    /// offset, which ranks nothing. Starting at the mean leaves every step for the differences between prefixes.
    pub fn head(
        backbone: Arc<Backbone>,
        hidden: i64,
        width: i64,
        from: Option<&Path>,
        seed: u64,
        start: f64,
        depth: Option<usize>,
    ) -> Result<Self> {
        let device = backbone.device();
        let head = match from {
            Some(dir) => MlpHead::load(dir, device)?,
            None => {
                let head = MlpHead::new(hidden, width, seed, device);
                tch::no_grad(|| {
                    let _ = head.out_bias.shallow_clone().fill_(start);
                });
                head
            }
        };
        for (_, t) in head.named() {
            let _ = t.set_requires_grad(true);
        }
        Ok(Self::Head { backbone, head, depth })
    }

    /// The trainable tensors with their saved names, in a fixed order.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        match self {
            Self::Model { params, .. } => params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            Self::Head { head, .. } => head.named(),
        }
    }

    pub fn params(&self) -> Vec<Tensor> {
        self.named_params().into_iter().map(|(_, t)| t).collect()
    }

    /// Per-position values [B, T] (f32), with the graph to the trainable tensors.
    pub fn values(&self, ids: &Tensor, valid: &Tensor, positions: &Tensor) -> Tensor {
        match self {
            Self::Model { model, .. } => model.values(ids, valid, positions, None).to_kind(Kind::Float),
            Self::Head { backbone, head, depth } => {
                let hidden = tch::no_grad(|| backbone.forward_to_depth(ids, valid, positions, None, *depth)).detach();
                head.forward(&hidden)
            }
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Model { model, .. } => model.backbone.device(),
            Self::Head { backbone, .. } => backbone.device(),
        }
    }
}
