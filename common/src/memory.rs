//! The memory plan `iro check-config` prints: per phase of a run, the bytes one worker's device needs (the
//! frozen models it keeps loaded, the KV caches of a search, the training state of its rank under each
//! `value.sharding`, the activations), against `cluster.device_memory_gib`, and which knob to turn when a phase
//! does not fit. Estimates from the models' `config.json` shapes, not measurements; what each term assumes is
//! said where it is computed.
//!
//! Residency follows the worker: it loads the policy and the reward models once and keeps every value function
//! V_1.. it has loaded for searching, so rollout t holds the values of the iterations before it and eval t its
//! own too; a train task first drops the loaded values (the trainer reads its starting point from its folder).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{RunConfig, ValueKind, ValuePrecision, ValueSharding};
use crate::error::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// What shrinks a search phase: the KV rows (W·K per prompt, at least one prompt per forward), the tokens per
/// row, and the value models it holds (one per iteration so far).
const SEARCH_KNOBS: &str = "search.beams x search.successors and sampling.batch_size (KV-cache rows), \
                            sampling.max_new_tokens, run.iterations (value models held), run.dtype";

/// The shape of one model, as far as memory goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Where the shape came from (a `config.json`).
    pub source: PathBuf,
    pub arch: String,
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab: u64,
    pub tied: bool,
    /// Every parameter of the backbone (embeddings, layers, final norm), no output head.
    pub backbone_params: u64,
    /// A `*ForSequenceClassification` / reward checkpoint (scalar head) rather than a causal LM.
    pub scalar: bool,
}

impl ModelShape {
    /// Reads the shape of an HF `config.json` (llama, mistral, gpt_neox, bert).
    pub fn from_config_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ConfigRead { path: path.to_owned(), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::ConfigParse { path: path.to_owned(), message: e.to_string() })?;
        let bad = |field: &str, message: &str| Error::ConfigValue {
            path: path.to_owned(),
            field: field.to_owned(),
            message: message.to_owned(),
        };
        let num =
            |field: &str| v.get(field).and_then(Value::as_u64).ok_or_else(|| bad(field, "missing or not a count"));
        let arch = v.get("model_type").and_then(Value::as_str).ok_or_else(|| bad("model_type", "missing"))?.to_owned();
        let (layers, hidden, heads, vocab) =
            (num("num_hidden_layers")?, num("hidden_size")?, num("num_attention_heads")?, num("vocab_size")?);
        let intermediate = num("intermediate_size")?;
        let kv_heads = num("num_key_value_heads").unwrap_or(heads);
        let head_dim = num("head_dim").unwrap_or(hidden / heads.max(1));
        let tied = v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(arch == "bert");
        let scalar = v
            .get("architectures")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|s| s.contains("SequenceClassification")));
        let (h, i) = (hidden, intermediate);
        let backbone_params = match arch.as_str() {
            // Attention (q, k, v, o), the gated MLP (gate, up, down), two RMSNorms per layer; one final norm.
            "llama" | "mistral" | "qwen2" => {
                let q = heads * head_dim;
                let kv = kv_heads * head_dim;
                vocab * h + layers * (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h) + h
            }
            // Fused QKV and dense with biases, the 4h MLP with biases, two LayerNorms per layer; the final one.
            "gpt_neox" => vocab * h + layers * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h) + 2 * h,
            // Word, position and type embeddings with their LayerNorm; per layer attention, MLP, two LayerNorms.
            "bert" => {
                let positions = num("max_position_embeddings").unwrap_or(512);
                (vocab + positions + 2) * h + 2 * h + layers * (4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h)
            }
            other => {
                return Err(bad(
                    "model_type",
                    &format!("`{other}`: the memory plan knows llama, mistral, gpt_neox, bert"),
                ));
            }
        };
        Ok(Self {
            source: path.to_owned(),
            arch,
            layers,
            hidden,
            intermediate,
            heads,
            kv_heads,
            head_dim,
            vocab,
            tied,
            backbone_params,
            scalar,
        })
    }

    /// Parameters as loaded for generation: the backbone and its LM head (none extra when tied).
    pub fn causal_lm_params(&self) -> u64 {
        self.backbone_params + if self.tied { 0 } else { self.vocab * self.hidden }
    }

    /// Parameters of the scalar model on this backbone (reward model, `model`-kind value): backbone + score.
    pub fn scalar_params(&self) -> u64 {
        self.backbone_params + self.hidden + 1
    }

    /// KV-cache bytes per row per token: keys and values of every layer.
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes
    }

    /// The parameters of the largest stage the layer-wise schedule gathers at once: the embeddings, or one layer.
    pub fn largest_stage_params(&self) -> u64 {
        let layer = (self.backbone_params - self.vocab * self.hidden) / self.layers.max(1);
        layer.max(self.vocab * self.hidden)
    }

    /// Activation bytes one decoder layer keeps for its backward, for `tokens` tokens of `batch` rows in
    /// `dtype_bytes`-byte floats: Korthikanti et al. (2022, "Reducing Activation Recomputation in Large
    /// Transformer Models") count s·b·h·34 bytes at 16 bits without the attention scores (11 for attention, 19
    /// for a 4h MLP, 4 for the norms); here the MLP share follows its actual width and no T×T scores are kept
    /// (fused attention), but a grouped-query layer keeps its own copy of the additive mask repeated for its g
    /// query heads per KV head (how `attend` feeds the fused kernel), b·g·s² floats.
    pub fn layer_activation_bytes(&self, tokens: u64, batch: u64, dtype_bytes: u64) -> u64 {
        let (s, b, h) = (tokens as f64, batch as f64, self.hidden as f64);
        let mlp_scale = self.intermediate as f64 / (4.0 * h);
        let dense = s * b * h * (15.0 + 19.0 * mlp_scale) * dtype_bytes as f64 / 2.0;
        let g = self.heads / self.kv_heads.max(1);
        let mask = if g > 1 { (batch * g * tokens * tokens * dtype_bytes) as f64 } else { 0.0 };
        (dense + mask) as u64
    }
}

/// The models a run loads, by role, as found.
#[derive(Debug, Clone, Default)]
pub struct RunShapes {
    pub policy: Option<ModelShape>,
    pub reward: Option<ModelShape>,
    pub eval_reward: Option<ModelShape>,
    /// The `model`-kind value function's starting point (`value.init`, else the policy).
    pub value: Option<ModelShape>,
    /// What could not be read, one line each.
    pub missing: Vec<String>,
}

impl RunShapes {
    /// Each model's `config.json` from its folder, or, where the folder is not on this machine (a config checked
    /// off-cluster), from `shapes/<folder name>.json`.
    pub fn find(config: &RunConfig, shapes: Option<&Path>) -> Self {
        let mut out = Self::default();
        let mut load = |what: &str, dir: &Path| -> Option<ModelShape> {
            if dir.as_os_str().is_empty() {
                return None;
            }
            let own = dir.join("config.json");
            let spare = shapes.and_then(|s| dir.file_name().map(|n| s.join(format!("{}.json", n.to_string_lossy()))));
            let path = if own.exists() { Some(own) } else { spare.filter(|p| p.exists()) };
            match path.map(|p| ModelShape::from_config_json(&p)) {
                Some(Ok(shape)) => Some(shape),
                Some(Err(e)) => {
                    out.missing.push(format!("{what}: {e}"));
                    None
                }
                None => {
                    out.missing
                        .push(format!("{what}: no {} (nor a shape file for it)", dir.join("config.json").display()));
                    None
                }
            }
        };
        let policy = load("policy.model", &config.policy.model);
        let reward = load("reward.model", &config.reward.model);
        let eval_reward = load("reward.eval_model", &config.reward.eval_model);
        let value = match config.value.kind {
            ValueKind::Model if !config.value.init.as_os_str().is_empty() => load("value.init", &config.value.init),
            ValueKind::Model => policy.clone(),
            ValueKind::Head => None,
        };
        Self { policy, reward, eval_reward, value, missing: out.missing }
    }
}

/// One term of a phase's estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub what: String,
    pub bytes: u64,
}

/// The estimate of one phase.
#[derive(Debug, Clone, PartialEq)]
pub struct PhasePlan {
    /// `rollout 1`, `train 2`, `eval 3`.
    pub phase: String,
    pub terms: Vec<Term>,
    /// The knobs that shrink this phase, for the refusal.
    pub knobs: &'static str,
}

impl PhasePlan {
    pub fn total(&self) -> u64 {
        self.terms.iter().map(|t| t.bytes).sum()
    }
}

/// A rank's training state and working set under one `value.sharding` / checkpointing setting.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOption {
    pub sharding: ValueSharding,
    pub checkpointing: bool,
    /// Weights, gradients and AdamW moments held at the step (f32).
    pub state: u64,
    /// Whole weights and gradients held while computing beyond the state (a gathered stage, the full-bucket
    /// gradient sums), and activations.
    pub working: u64,
    pub activations: u64,
}

impl TrainOption {
    pub fn total(&self) -> u64 {
        self.state + self.working + self.activations
    }

    pub fn label(&self) -> String {
        format!("sharding {}{}", self.sharding.as_str(), if self.checkpointing { " + checkpointing" } else { "" })
    }
}

/// The plan of a whole run. Training counts `value.precision`: f32 throughout, or bf16 weights, gradients and
/// activations beside f32 masters and moments.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub device_bytes: u64,
    pub phases: Vec<PhasePlan>,
    /// Every training setting at this gang size, the configured one marked by `configured`.
    pub train_options: Vec<TrainOption>,
    pub configured: usize,
    pub missing: Vec<String>,
}

fn dtype_bytes(config: &RunConfig) -> u64 {
    match config.run.dtype.as_str() {
        "f32" => 4,
        "bf16" | "f16" => 2,
        // `auto` is bf16 on CUDA, which the device memory figure is about; f32 when the run says CPU.
        _ if config.run.device == "cpu" => 4,
        _ => 2,
    }
}

/// The training state and working set of one rank under `sharding` (f32: training always runs in f32).
pub fn train_option(
    value: &ModelShape,
    sharding: ValueSharding,
    checkpointing: bool,
    precision: ValuePrecision,
    ranks: u64,
    tokens: u64,
    micro_batch: u64,
) -> TrainOption {
    let p = value.scalar_params();
    let r = ranks.max(1);
    let stage = value.largest_stage_params();
    // `w` bytes per weight as the passes use it; bf16 adds an f32 master (and its gradients come out in bf16).
    let (w, master) = match precision {
        ValuePrecision::F32 => (4, 0),
        ValuePrecision::Bf16 => (2, 4),
    };
    // Per parameter: weights w (+ master), gradients (in `.grad`, w; as summed shards, f32), two f32 moments.
    let state = match sharding {
        ValueSharding::None => (2 * w + master + 8) * p,
        ValueSharding::Optimizer => w * p + (master + 4 + 8) * p / r,
        ValueSharding::Full => (4 + 4 + 8) * p / r,
    };
    // Beyond the state while computing: `optimizer` sums this step's whole gradients per bucket in f32 until the
    // reduce-scatter (all buckets without checkpointing, one stage with it) next to autograd's fresh ones (w);
    // `full` also gathers the weights it runs (the whole model for the step without checkpointing, one stage
    // with it). Plain data parallelism accumulates straight into `.grad`, part of its state.
    let working = match (sharding, checkpointing) {
        (ValueSharding::None, _) => 0,
        (ValueSharding::Optimizer, false) => (4 + w) * p,
        (ValueSharding::Optimizer, true) => (4 + w) * stage,
        (ValueSharding::Full, false) => (4 + 2 * w) * p,
        (ValueSharding::Full, true) => (4 + 2 * w) * stage,
    };
    // Activations in the passes' dtype, plus the [b, 1, s, s] additive mask every layer shares. Checkpointing
    // keeps each layer's [b, s, h] input and one layer's activations at a time.
    let layer = value.layer_activation_bytes(tokens, micro_batch, w);
    let mask = micro_batch * tokens * tokens * w;
    let activations = mask
        + if checkpointing {
            value.layers * tokens * micro_batch * value.hidden * w + layer
        } else {
            value.layers * layer
        };
    TrainOption { sharding, checkpointing, state, working, activations }
}

impl MemoryPlan {
    /// The plan of `config` on devices of `device_bytes` with the models `shapes` found.
    pub fn new(config: &RunConfig, shapes: &RunShapes, device_bytes: u64) -> Self {
        let d = dtype_bytes(config);
        let (s, v) = (&config.search, &config.value);
        let tokens = (config.policy.max_prompt_tokens + config.sampling.max_new_tokens) as u64;
        let mut phases = Vec::new();
        let weights = |what: &str, shape: &Option<ModelShape>, causal: bool| -> Option<Term> {
            shape.as_ref().map(|m| Term {
                what: what.to_owned(),
                bytes: d * if causal && !m.scalar { m.causal_lm_params() } else { m.scalar_params() },
            })
        };
        let value_bytes = match (&v.kind, &shapes.value, &shapes.policy) {
            (ValueKind::Model, Some(m), _) => d * m.scalar_params(),
            (ValueKind::Head, _, Some(p)) => 4 * (p.hidden * v.head_width as u64 + 2 * v.head_width as u64 + 1),
            _ => 0,
        };
        // Value models with their own backbone keep their own KV caches in a guided search.
        let value_kv = match (&v.kind, &shapes.value) {
            (ValueKind::Model, Some(m)) => m.kv_bytes_per_token(d),
            _ => 0,
        };
        let resident = |values: usize| -> Vec<Term> {
            let mut terms: Vec<Term> = [
                weights("policy", &shapes.policy, true),
                weights("reward model", &shapes.reward, false),
                weights("eval reward model", &shapes.eval_reward, false),
            ]
            .into_iter()
            .flatten()
            .collect();
            if values > 0 && value_bytes > 0 {
                terms.push(Term { what: format!("{values} value model(s)"), bytes: values as u64 * value_bytes });
            }
            terms
        };
        // One forward's working set of the widest model in a batch of `rows` full sequences: the MLP's
        // intermediate (gate, up and their product) and a few hidden-sized tensors of one layer (fused attention
        // kernels keep no T×T scores).
        let forward_bytes = |rows: u64| -> u64 {
            [&shapes.policy, &shapes.reward, &shapes.eval_reward, &shapes.value]
                .iter()
                .filter_map(|m| m.as_ref())
                .map(|m| rows * tokens * (3 * m.intermediate + 6 * m.hidden) * d)
                .max()
                .unwrap_or(0)
        };
        let search_terms = |values: usize, group: usize| -> Vec<Term> {
            let rows = ((config.sampling.batch_size / group.max(1)).max(1) * group) as u64;
            let per_token = shapes.policy.as_ref().map_or(0, |p| p.kv_bytes_per_token(d)) + values as u64 * value_kv;
            vec![
                Term { what: format!("KV caches ({rows} rows x {tokens} tokens)"), bytes: rows * tokens * per_token },
                Term { what: "activations".into(), bytes: forward_bytes(rows) },
            ]
        };
        let ranks = config.cluster.train_ranks as u64;
        let micro = v.micro_batch_size as u64;
        let mut train_options = Vec::new();
        let mut configured = 0;
        if let (ValueKind::Model, Some(m)) = (&v.kind, &shapes.value) {
            for sharding in [ValueSharding::None, ValueSharding::Optimizer, ValueSharding::Full] {
                for checkpointing in [false, true] {
                    if sharding == v.sharding && checkpointing == v.activation_checkpointing {
                        configured = train_options.len();
                    }
                    train_options.push(train_option(m, sharding, checkpointing, v.precision, ranks, tokens, micro));
                }
            }
        }
        let iterations = config.run.iterations as usize;
        for t in 1..=iterations {
            let group = if t == 1 { config.select.first_samples } else { s.beams * s.successors };
            let mut terms = resident(t - 1);
            terms.extend(search_terms(if t == 1 { 0 } else { t - 1 }, group));
            phases.push(PhasePlan { phase: format!("rollout {t}"), terms, knobs: SEARCH_KNOBS });
            let mut terms = resident(0);
            match train_options.get(configured) {
                Some(o) => {
                    let r = if o.sharding == ValueSharding::None { String::new() } else { format!(", R = {ranks}") };
                    terms.push(Term { what: format!("training state ({}{r})", o.label()), bytes: o.state });
                    terms.push(Term { what: "gathered weights and gradient sums".into(), bytes: o.working });
                    terms.push(Term {
                        what: format!("activations (micro-batch {micro} x {tokens} tokens)"),
                        bytes: o.activations,
                    });
                }
                None => terms.push(Term { what: "value head training".into(), bytes: 4 * value_bytes }),
            }
            phases.push(PhasePlan {
                phase: format!("train {t}"),
                terms,
                knobs: "value.sharding, cluster.train_ranks, value.activation_checkpointing, value.micro_batch_size",
            });
            let mut terms = resident(t);
            terms.extend(search_terms(t, s.beams * s.successors));
            phases.push(PhasePlan { phase: format!("eval {t}"), terms, knobs: SEARCH_KNOBS });
        }
        Self { device_bytes, phases, train_options, configured, missing: shapes.missing.clone() }
    }

    /// The phases that do not fit the device.
    pub fn too_big(&self) -> Vec<&PhasePlan> {
        if self.device_bytes == 0 {
            return Vec::new();
        }
        self.phases.iter().filter(|p| p.total() > self.device_bytes).collect()
    }

    /// The report `iro check-config` prints.
    pub fn render(&self) -> String {
        let gib = |b: u64| b as f64 / GIB;
        let mut out = String::new();
        let device = if self.device_bytes == 0 {
            "no device memory figure (cluster.device_memory_gib = 0): nothing is refused".to_owned()
        } else {
            format!("against {:.1} GiB per device (cluster.device_memory_gib)", gib(self.device_bytes))
        };
        out.push_str(&format!("memory plan, per worker device, estimated {device}:\n"));
        for line in &self.missing {
            out.push_str(&format!("  not estimated: {line}\n"));
        }
        for p in &self.phases {
            let verdict = if self.device_bytes == 0 {
                ""
            } else if p.total() <= self.device_bytes {
                "fits"
            } else {
                "DOES NOT FIT"
            };
            let terms: Vec<String> = p.terms.iter().map(|t| format!("{} {:.1}", t.what, gib(t.bytes))).collect();
            out.push_str(&format!(
                "  {:<10} {:>7.1} GiB  {verdict:<12}  {}\n",
                p.phase,
                gib(p.total()),
                terms.join(" + ")
            ));
        }
        if !self.train_options.is_empty() {
            out.push_str("  training settings of one rank (state + gathered/working + activations), this gang size:\n");
            for (i, o) in self.train_options.iter().enumerate() {
                let mark = if i == self.configured { "  <- configured" } else { "" };
                out.push_str(&format!(
                    "    {:<38} {:>7.1} GiB = {:.1} + {:.1} + {:.1}{mark}\n",
                    o.label(),
                    gib(o.total()),
                    gib(o.state),
                    gib(o.working),
                    gib(o.activations)
                ));
            }
        }
        out
    }

    /// `Err` naming the phases that do not fit and the knobs that would shrink them.
    pub fn check(&self, origin: &Path) -> Result<()> {
        let big = self.too_big();
        let Some(first) = big.first() else { return Ok(()) };
        let gib = |b: u64| b as f64 / GIB;
        let phases: Vec<String> = big.iter().map(|p| format!("{} needs {:.1} GiB", p.phase, gib(p.total()))).collect();
        let mut knobs: Vec<&str> = Vec::new();
        for p in &big {
            if !knobs.contains(&p.knobs) {
                knobs.push(p.knobs);
            }
        }
        let mut message = format!(
            "{} of a {:.1} GiB device: change {}",
            phases.join(", "),
            gib(self.device_bytes),
            knobs.join("; or ")
        );
        let train = big.iter().any(|p| p.phase.starts_with("train"));
        if let (true, Some(best)) = (train, self.train_options.iter().min_by_key(|o| o.total())) {
            message.push_str(&format!(" (the smallest training setting at this gang size is {})", best.label()));
        }
        let field =
            if train { "value.sharding" } else { first.knobs.split(' ').next().unwrap_or("sampling.batch_size") };
        Err(Error::ConfigValue { path: origin.to_owned(), field: field.to_owned(), message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    fn shape(name: &str) -> ModelShape {
        ModelShape::from_config_json(&repo(&format!("configs/model-shapes/{name}.json"))).unwrap()
    }

    /// The parameter formulas give the published sizes: Llama-3-8B 8.03 B, Mistral-7B 7.24 B with its LM head
    /// (7.11 B as a classifier), Pythia-6.9B 6.86 B, Pythia-1B 1.01 B, SmolLM2-135M 134.5 M, MiniLM-L6 22.6 M.
    #[test]
    fn parameter_counts_match_the_published_sizes() {
        let close = |got: u64, want: f64| (got as f64 / want - 1.0).abs() < 0.005;
        let cases = [
            (shape("Meta-Llama-3-8B-Instruct").causal_lm_params(), 8.030e9),
            (shape("reward-7b").causal_lm_params(), 7.242e9),
            (shape("pythia-6.9b-tldr-sft").causal_lm_params(), 6.857e9),
            (shape("pythia-1b-tldr-sft").causal_lm_params(), 1.012e9),
            (shape("smollm2-135m-instruct").causal_lm_params(), 134.5e6),
            // 22.7 M with the pooler, which mean pooling does not load.
            (shape("all-minilm-l6-v2").backbone_params, 22.565e6),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert!(close(got, want), "case {i}: {got} parameters, published {want}");
        }
        assert!(shape("reward-7b").scalar && !shape("Meta-Llama-3-8B-Instruct").scalar);
    }

    /// ZeRO's per-rank state: 16·P, 4·P + 12·P/R, 16·P/R.
    #[test]
    fn training_state_follows_the_zero_stages() {
        let m = shape("reward-7b");
        let p = m.scalar_params();
        let state = |s| train_option(&m, s, false, ValuePrecision::F32, 4, 1024, 1).state;
        assert_eq!(state(ValueSharding::None), 16 * p);
        assert_eq!(state(ValueSharding::Optimizer), 4 * p + 3 * p);
        assert_eq!(state(ValueSharding::Full), 4 * p);
        // Checkpointing cuts both the activations and, with full sharding, the gathered working set.
        let plain = train_option(&m, ValueSharding::Full, false, ValuePrecision::F32, 4, 2560, 1);
        let ckpt = train_option(&m, ValueSharding::Full, true, ValuePrecision::F32, 4, 2560, 1);
        assert!(ckpt.activations * 4 < plain.activations && ckpt.working * 10 < plain.working);
        // bf16 mixed precision: the same 16 bytes per parameter (bf16 weights and gradients beside an f32
        // master) without sharding, less with it; half the activations.
        let bf16 = |s, c| train_option(&m, s, c, ValuePrecision::Bf16, 4, 2560, 1);
        assert_eq!(bf16(ValueSharding::None, false).state, 16 * p);
        assert_eq!(bf16(ValueSharding::Optimizer, false).state, 2 * p + 4 * p);
        assert!(bf16(ValueSharding::Full, true).activations * 2 <= ckpt.activations + 4096);
    }

    /// The instruction-following overlay on 80 GiB devices: plain data parallelism cannot train the 7B value
    /// model; the shipped full sharding with checkpointing can.
    #[test]
    fn the_8b_overlay_trains_only_sharded_on_80_gib() {
        let path = repo("k8s/overlays/alpaca-llama3-8b/run-config.toml");
        let config = RunConfig::load(&path).unwrap();
        let shapes = RunShapes::find(&config, Some(&repo("configs/model-shapes")));
        assert!(shapes.missing.is_empty(), "{:?}", shapes.missing);
        let device = 80u64 << 30;
        let train_1 = |c: &RunConfig| {
            let plan = MemoryPlan::new(c, &shapes, device);
            plan.phases.iter().find(|p| p.phase == "train 1").unwrap().total()
        };
        assert!(train_1(&config) <= device, "shipped setting: {}", MemoryPlan::new(&config, &shapes, device).render());
        let mut plain = config.clone();
        plain.value.sharding = ValueSharding::None;
        plain.value.activation_checkpointing = false;
        assert!(train_1(&plain) > device);
        let err = MemoryPlan::new(&plain, &shapes, device).check(&path).unwrap_err().to_string();
        assert!(err.contains("train 1") && err.contains("value.sharding"), "{err}");
    }
}
