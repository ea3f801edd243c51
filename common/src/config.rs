//! The run config: one TOML file holds every knob of a run, each with the default from `iro.md`
//! (the paper's TL;DR setup unless noted). Unknown fields are errors, so a typo never silently
//! falls back to a default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub run: RunSection,
    pub policy: PolicySection,
    pub data: DataSection,
    pub sampling: SamplingSection,
    pub reward: RewardSection,
    pub select: SelectSection,
    pub value: ValueSection,
    pub search: SearchSection,
    pub baselines: BaselinesSection,
    pub cluster: ClusterSection,
}

/// Identity and placement of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Every object key of the run derives from this id (see `layout`).
    pub id: String,
    pub seed: u64,
    /// Number of IRO iterations T.
    pub iterations: u32,
    /// Object store: a local folder path, or `s3://bucket/prefix`.
    pub store: String,
    /// `auto` (CUDA when libtorch sees it), `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `auto` (bf16 on CUDA, f32 on CPU), `f32`, `bf16`, `f16`.
    pub dtype: String,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            id: "iro".into(),
            seed: 42,
            iterations: 3,
            store: "runs".into(),
            device: "auto".into(),
            dtype: "auto".into(),
        }
    }
}

/// The frozen model and how prompts are formatted for it (one formatter per task, used everywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// HF folder: config.json, model.safetensors (or an index), tokenizer.json.
    pub model: PathBuf,
    pub prompt_format: PromptFormat,
    /// TL;DR: prompts are cut to fit this many tokens.
    pub max_prompt_tokens: usize,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self { model: PathBuf::new(), prompt_format: PromptFormat::Tldr, max_prompt_tokens: 512 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// Used as given.
    Raw,
    /// `SUBREDDIT: r/..\n\nTITLE: ..\n\nPOST: ..\n\nTL;DR:`
    Tldr,
    /// `<|im_start|>user ...` (SmolLM2).
    Chatml,
    /// Llama-3 Instruct's header tokens, with an empty system turn (as the official IRO code sends it).
    Llama3,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub format: DataFormat,
    pub train: PathBuf,
    pub test: PathBuf,
    /// Fresh prompts per iteration (disjoint slices of one seeded shuffle).
    pub prompts_per_iteration: usize,
    /// Held-out prompts decoded at evaluation.
    pub test_prompts: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            format: DataFormat::Jsonl,
            train: PathBuf::new(),
            test: PathBuf::new(),
            prompts_per_iteration: 8192,
            test_prompts: 300,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// One JSON object per line with a `prompt` field.
    Jsonl,
    /// TL;DR records: id, subreddit, title, post, summary (JSONL or parquet).
    Tldr,
    /// AlpacaEval's JSON array: instruction, output (the reference), generator.
    AlpacaEval,
}

/// How the frozen model samples, in rollouts, search and baselines alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Rows per forward batch.
    pub batch_size: usize,
}

impl Default for SamplingSection {
    fn default() -> Self {
        Self { temperature: 0.7, top_k: 50, top_p: 1.0, max_new_tokens: 53, batch_size: 16 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    pub kind: RewardKind,
    /// Training reward model (HF scalar-head checkpoint) or the sentence encoder folder.
    pub model: PathBuf,
    /// Evaluation reward model; empty means the training one.
    pub eval_model: PathBuf,
    /// The chat template of `model` (`kind = "model"` only). Unset, or equal to `policy.prompt_format`: the
    /// reward model reads the prompt exactly as the policy saw it. Otherwise it formats the raw prompt (the
    /// instruction) with this template, as the official instruction-following code scores with the reward
    /// model's own template (a Mistral reward model on Llama-3 prompts).
    pub prompt_format: Option<PromptFormat>,
    /// The same for `eval_model`; unset means the policy's format, like `prompt_format`.
    pub eval_prompt_format: Option<PromptFormat>,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            kind: RewardKind::Model,
            model: PathBuf::new(),
            eval_model: PathBuf::new(),
            prompt_format: None,
            eval_prompt_format: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// A scalar head on a causal LM read at the last non-pad token.
    Model,
    /// Cosine similarity to the reference answer under a sentence encoder.
    EmbeddingSimilarity,
}

/// Reweight/resample: which candidates the next value function learns from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectSection {
    pub method: SelectMethod,
    /// `method = "softmax"` draws with weights softmax(r / (temperature · unit)), the unit set by
    /// `temperature_unit`.
    pub temperature: f64,
    /// What `temperature` is measured in (softmax only). `prompt_sd` (default): the standard deviation of the
    /// prompt's own candidate rewards, so temperature 1 means the same sharpness whatever the reward's scale (a
    /// cosine reward whose candidates spread by 0.1 and a reward model's by 2 alike); a prompt whose candidates
    /// all score the same draws uniformly. `reward`: the reward's raw units, softmax(r / temperature).
    pub temperature_unit: TemperatureUnit,
    /// Responses kept per prompt.
    pub per_prompt: usize,
    /// Plain samples drawn per prompt at iteration 1 (the paper draws 1). More, with `per_prompt` as many, train
    /// V_1 on several answers to each prompt: the Monte-Carlo value of the base policy, with within-prompt contrast.
    pub first_samples: usize,
}

impl Default for SelectSection {
    fn default() -> Self {
        Self {
            method: SelectMethod::Argmax,
            temperature: 1.0,
            temperature_unit: TemperatureUnit::PromptSd,
            per_prompt: 1,
            first_samples: 1,
        }
    }
}

/// The unit of `select.temperature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemperatureUnit {
    /// The standard deviation of the prompt's candidate rewards.
    PromptSd,
    /// The reward's own units.
    Reward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectMethod {
    Argmax,
    Softmax,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValueSection {
    pub kind: ValueKind,
    /// Backbone of V_1 (`model` kind): an HF folder; empty means the policy's own.
    pub init: PathBuf,
    /// V_t starts from V_{t-1} (TL;DR); false re-initialises every V_t from `init` (instruction following).
    pub warm_start: bool,
    pub lr: f64,
    pub adam_eps: f64,
    /// AdamW's decoupled weight decay: 0.01 is torch's default, which the official `c_train.py` keeps
    /// (`optim.AdamW(lr, eps)` without a `weight_decay` argument).
    pub weight_decay: f64,
    pub epochs: usize,
    /// Effective batch: micro-batches are accumulated (across ranks too) up to this many sequences.
    pub batch_size: usize,
    pub micro_batch_size: usize,
    /// beta_i of each V_i in the ensemble sum V_i / beta_i; the last value repeats for later iterations.
    pub betas: Vec<f64>,
    /// Save a resumable checkpoint every this many optimizer steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Hidden width of the `head` kind's MLP.
    pub head_width: usize,
    /// What V_t regresses onto: `reward` (the paper) or `prompt_centred`, each reward minus the mean reward of
    /// its prompt's selected candidates.
    pub targets: ValueTargets,
    /// How a `head`-kind value is fitted: `adamw` (the MLP of width `head_width`, trained like the `model` kind)
    /// or `ridge` (a linear head solved in closed form, its shrinkage chosen by cross-validation over prompts).
    pub head_fit: HeadFit,
    /// `head` kind: the head reads the policy's states after this many decoder layers (then the final norm); 0
    /// means all of them. `iro bench value --layers` measures which depth's states rank candidates best; the
    /// decoder keeps that layer's states beside the logits, so guidance still costs no extra forward pass.
    pub feature_layers: usize,
    /// `head` kind: which of those states the head reads for a prefix: `last` (the state at its last token, as
    /// the paper's value models do), `mean` (the mean of the states from the prompt's last token through the
    /// prefix's last) or `last_mean` (both, concatenated). Our addition: a sentence-embedding reward pools its
    /// encoder's states, and `iro bench value --pooling` measures what each choice buys.
    pub pooling: ValuePooling,
    /// Folds of the ridge fit's cross-validation (prompts are dealt to folds; at most one fold per prompt).
    pub ridge_folds: usize,
    /// How a training gang of `cluster.train_ranks` ranks splits the training state (ZeRO's stages): `none`
    /// (plain data parallelism: every rank holds the weights, gradients and both AdamW moments, 16 bytes per
    /// f32 parameter), `optimizer` (weights replicated, gradients reduce-scattered and AdamW moments kept as
    /// 1/R shards: 4 + 12/R bytes) or `full` (weights too, gathered only while in use: 16/R bytes).
    pub sharding: ValueSharding,
    /// Recompute each decoder layer in the backward instead of keeping its activations (`model` kind only): a
    /// micro-batch then holds one [B, T, H] input per layer plus one layer's activations, at the price of a
    /// second forward. With `sharding = "full"` it also makes each layer's weights gathered only while that
    /// layer runs (ZeRO-3's schedule) instead of the whole model for the step.
    pub activation_checkpointing: bool,
    /// `f32`, or `bf16` mixed precision (`model` kind): weights and activations in bf16 for the forward and
    /// backward passes, f32 master weights and AdamW moments (in the shards when sharded), the loss in f32.
    pub precision: ValuePrecision,
}

/// How a `head`-kind value function is fitted (`value.head_fit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadFit {
    /// An MLP head trained by AdamW on the Monte-Carlo loss, as the `model` kind is.
    Adamw,
    /// A linear head `w·h + b`: ridge regression of the same targets on the frozen states, the shrinkage picked
    /// by cross-validation over held-out prompts, shrunk towards V_{t-1} on a warm start (our addition: on a few
    /// hundred candidates the MLP memorises its prompts; worker/src/train/ridge.rs).
    Ridge,
}

/// `value.pooling`: the features a `head`-kind value reads for a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValuePooling {
    /// The state at the prefix's last token [H].
    #[default]
    Last,
    /// The mean of the states from the prompt's last token through the prefix's last [H].
    Mean,
    /// `last` and `mean` concatenated [2H].
    LastMean,
}

impl ValuePooling {
    /// The name config files and `config.json` use.
    pub fn as_str(self) -> &'static str {
        match self {
            ValuePooling::Last => "last",
            ValuePooling::Mean => "mean",
            ValuePooling::LastMean => "last_mean",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [ValuePooling::Last, ValuePooling::Mean, ValuePooling::LastMean].into_iter().find(|p| p.as_str() == s)
    }

    /// How many hidden-size blocks the features hold.
    pub fn blocks(self) -> i64 {
        if self == ValuePooling::LastMean { 2 } else { 1 }
    }
}

/// `value.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValuePrecision {
    #[default]
    F32,
    Bf16,
}

/// `value.sharding`: which training state a rank keeps only its 1/R shard of (ZeRO stages 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValueSharding {
    /// Every rank holds everything (DDP).
    #[default]
    None,
    /// Gradients and AdamW moments are sharded; the weights are replicated (ZeRO-2).
    Optimizer,
    /// Weights, gradients and AdamW moments are sharded (ZeRO-3, FSDP `FULL_SHARD`).
    Full,
}

impl ValueSharding {
    /// The config spelling (`none`, `optimizer`, `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optimizer => "optimizer",
            Self::Full => "full",
        }
    }
}

/// The regression target of value training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueTargets {
    /// r(x, y), as the paper and the official code.
    Reward,
    /// r(x, y) − mean of r over the prompt's selected candidates (our deviation). CBS only compares rows of one
    /// prompt, and E[r | x, y_<k] − E[r | x] orders them exactly as E[r | x, y_<k] does, so the guide is the same
    /// for an exact value function; a learned one no longer spends its few examples on which prompt scores high
    /// (the larger share of the variance here) and learns only which continuation does. Needs several selected
    /// candidates per prompt (`select.per_prompt`, `select.first_samples`); a prompt with one gets target 0.
    PromptCentred,
}

impl Default for ValueSection {
    fn default() -> Self {
        Self {
            kind: ValueKind::Model,
            init: PathBuf::new(),
            warm_start: true,
            lr: 3e-6,
            adam_eps: 1e-5,
            weight_decay: 0.01,
            epochs: 10,
            batch_size: 256,
            micro_batch_size: 8,
            betas: vec![1.0],
            checkpoint_every: 50,
            head_width: 256,
            targets: ValueTargets::Reward,
            head_fit: HeadFit::Adamw,
            feature_layers: 0,
            pooling: ValuePooling::Last,
            ridge_folds: 5,
            sharding: ValueSharding::None,
            activation_checkpointing: false,
            precision: ValuePrecision::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// A full backbone + scalar head (the paper).
    Model,
    /// A small head on the frozen policy's own hidden states (our addition).
    Head,
}

/// Chunk-level beam search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSection {
    /// W
    pub beams: usize,
    /// K
    pub successors: usize,
    /// L, in tokens.
    pub chunk_length: usize,
    #[serde(rename = "final")]
    pub final_pick: FinalPick,
}

impl Default for SearchSection {
    fn default() -> Self {
        Self { beams: 4, successors: 4, chunk_length: 8, final_pick: FinalPick::RewardArgmax }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalPick {
    RewardArgmax,
    ValueArgmax,
    First,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselinesSection {
    pub methods: Vec<Baseline>,
    pub best_of_n: usize,
    pub args_k: usize,
    /// ARGS's w in `log pi(token) + w · reward term`, the term set by `args_weight_unit`.
    pub args_weight: f64,
    /// `candidate_sd` (default): the reward term is (r − mean) / sd over the k candidate tokens of that step, so
    /// w = 1 weighs one standard deviation of the reward like one nat of log-probability whatever the reward's
    /// scale (with a cosine reward in [−1, 1], raw w = 1 leaves ARGS all but greedy); when the k rewards are
    /// equal (sd 0, up to f32 noise) the reward term is 0 and the log-probability decides. `reward`: the term is
    /// r itself, in the reward's units (ARGS as Khanov et al. write it).
    pub args_weight_unit: ArgsWeightUnit,
    /// Weak-to-strong search: the tuned / untuned small model pair.
    pub w2s_tuned: PathBuf,
    pub w2s_untuned: PathBuf,
}

impl Default for BaselinesSection {
    fn default() -> Self {
        Self {
            methods: vec![Baseline::Base, Baseline::BestOfN],
            best_of_n: 16,
            args_k: 16,
            args_weight: 1.0,
            args_weight_unit: ArgsWeightUnit::CandidateSd,
            w2s_tuned: PathBuf::new(),
            w2s_untuned: PathBuf::new(),
        }
    }
}

/// The unit of `baselines.args_weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgsWeightUnit {
    /// The standard deviation of the step's k candidate rewards.
    CandidateSd,
    /// The reward's own units.
    Reward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    Base,
    BestOfN,
    Args,
    WeakToStrong,
}

/// How the coordinator cuts the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Prompts per rollout/eval shard.
    pub shard_size: usize,
    pub lease_timeout_s: u64,
    pub heartbeat_interval_s: u64,
    /// Distinct workers that may fail a task before it, and the run, fail (a repeat on the same worker counts
    /// only when no other worker could take it; released leases, store outages and gang join timeouts never count).
    pub max_attempts: u32,
    /// A worker that fails this many tasks in a row gets no new task for `quarantine_s` (0: never quarantine).
    /// The last healthy worker is never quarantined, so a one-worker run still fails on a poison task.
    pub quarantine_after: u32,
    pub quarantine_s: u64,
    /// A lost task waits 1 s, 2 s, 4 s, ... (at most this long) before it is leased again.
    pub retry_backoff_max_s: u64,
    /// Ranks of the data-parallel value-training gang.
    pub train_ranks: usize,
    /// Gradients are summed across the gang in buckets of this many bytes (PyTorch DDP's 25 MiB by default).
    pub bucket_bytes: usize,
    /// The longest one collective call (all-reduce, broadcast, barrier, joining the gang) may take before it
    /// fails naming the ranks that did not answer.
    pub collective_deadline_s: u64,
    /// Memory of each worker's device in GiB (GPU memory; for CPU workers, the pod's memory limit): the figure
    /// `iro check-config`'s memory plan holds every phase against, refusing a config that cannot fit. 0 prints
    /// the plan without judging it.
    pub device_memory_gib: f64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            shard_size: 64,
            lease_timeout_s: 120,
            heartbeat_interval_s: 10,
            max_attempts: 3,
            quarantine_after: 3,
            quarantine_s: 900,
            retry_backoff_max_s: 60,
            train_ranks: 1,
            bucket_bytes: 25 * 1024 * 1024,
            collective_deadline_s: 300,
            // An A100/H100.
            device_memory_gib: 80.0,
        }
    }
}

impl RunConfig {
    /// Reads, parses and validates a config file; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::ConfigRead { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `origin` is only used in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let config: RunConfig =
            toml::from_str(text).map_err(|e| Error::ConfigParse { path: origin.to_owned(), message: e.to_string() })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Range and consistency checks serde cannot express.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(Error::ConfigValue { path: origin.to_owned(), field: field.to_owned(), message })
        };
        if let Err(e) = crate::layout::check_id("run id", &self.run.id) {
            return bad("run.id", e.to_string());
        }
        if self.run.iterations == 0 {
            return bad("run.iterations", "must be at least 1".into());
        }
        if !["auto", "f32", "bf16", "f16"].contains(&self.run.dtype.as_str()) {
            return bad("run.dtype", format!("`{}` is not one of auto, f32, bf16, f16", self.run.dtype));
        }
        let device = self.run.device.as_str();
        let cuda_index_ok = device.strip_prefix("cuda:").is_some_and(|i| i.parse::<usize>().is_ok());
        if !(["auto", "cpu", "cuda"].contains(&device) || cuda_index_ok) {
            return bad("run.device", format!("`{device}` is not one of auto, cpu, cuda, cuda:N"));
        }
        let s = &self.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad("sampling.temperature", format!("{} must be a finite number >= 0", s.temperature));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("sampling.top_p", format!("{} must be in (0, 1]", s.top_p));
        }
        for (field, v) in [
            ("sampling.max_new_tokens", s.max_new_tokens),
            ("sampling.batch_size", s.batch_size),
            ("search.beams", self.search.beams),
            ("search.successors", self.search.successors),
            ("search.chunk_length", self.search.chunk_length),
            ("select.per_prompt", self.select.per_prompt),
            ("select.first_samples", self.select.first_samples),
            ("value.epochs", self.value.epochs),
            ("value.batch_size", self.value.batch_size),
            ("value.micro_batch_size", self.value.micro_batch_size),
            ("value.head_width", self.value.head_width),
            ("data.prompts_per_iteration", self.data.prompts_per_iteration),
            ("cluster.shard_size", self.cluster.shard_size),
            ("cluster.train_ranks", self.cluster.train_ranks),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.select.per_prompt > self.search.beams * self.search.successors {
            return bad(
                "select.per_prompt",
                format!(
                    "{} exceeds the W·K = {} candidates per prompt",
                    self.select.per_prompt,
                    self.search.beams * self.search.successors
                ),
            );
        }
        let r = &self.reward;
        for (field, format) in
            [("reward.prompt_format", r.prompt_format), ("reward.eval_prompt_format", r.eval_prompt_format)]
        {
            let Some(format) = format else { continue };
            if r.kind != RewardKind::Model {
                return bad(field, format!("only a `model` reward reads the prompt, not {:?}", r.kind));
            }
            // A TL;DR prompt is built from a post's fields with the policy's tokenizer; there is no raw text to
            // re-format, so a reward model can only read it as the policy does.
            if format == PromptFormat::Tldr && self.policy.prompt_format != PromptFormat::Tldr {
                return bad(field, "`tldr` needs policy.prompt_format = \"tldr\"".into());
            }
        }
        if r.eval_prompt_format.is_some() && r.eval_model.as_os_str().is_empty() {
            return bad(
                "reward.eval_prompt_format",
                "is set but reward.eval_model is empty: the training reward model evaluates, with reward.prompt_format"
                    .into(),
            );
        }
        let t = self.select.temperature;
        if self.select.method == SelectMethod::Softmax && !(t > 0.0 && t.is_finite()) {
            return bad("select.temperature", format!("{t} must be a finite number > 0 for softmax resampling"));
        }
        let v = &self.value;
        if v.lr.is_nan() || v.lr <= 0.0 {
            return bad("value.lr", format!("{} must be > 0", v.lr));
        }
        if !(v.weight_decay >= 0.0 && v.weight_decay.is_finite()) {
            return bad("value.weight_decay", format!("{} must be a finite number >= 0", v.weight_decay));
        }
        if v.ridge_folds < 2 {
            return bad("value.ridge_folds", format!("{} must be at least 2 (one fold is held out)", v.ridge_folds));
        }
        if v.head_fit == HeadFit::Ridge && self.cluster.train_ranks > 1 {
            return bad(
                "cluster.train_ranks",
                format!(
                    "{} ranks, but a ridge head (value.head_fit) is one closed-form fit: set 1",
                    self.cluster.train_ranks
                ),
            );
        }
        if v.feature_layers > 0 && v.kind != ValueKind::Head {
            return bad("value.feature_layers", "only a `head`-kind value reads the policy's inner states".into());
        }
        if v.pooling != ValuePooling::Last && (v.kind != ValueKind::Head || v.head_fit != HeadFit::Ridge) {
            // The AdamW head trains through `TrainableValue`, which reads one state per target; only the ridge fit
            // reads the pooled feature cache (`iro bench value` fits both on pooled states).
            return bad(
                "value.pooling",
                "pooled states are read only by a `head`-kind value with head_fit = \"ridge\"".into(),
            );
        }
        if v.head_fit == HeadFit::Ridge && v.kind != ValueKind::Head {
            return bad(
                "value.head_fit",
                "`ridge` fits a head on the policy's states: it needs value.kind = \"head\"".into(),
            );
        }
        if !v.batch_size.is_multiple_of(v.micro_batch_size * self.cluster.train_ranks) {
            return bad(
                "value.batch_size",
                format!(
                    "{} is not a multiple of micro_batch_size ({}) x cluster.train_ranks ({})",
                    v.batch_size, v.micro_batch_size, self.cluster.train_ranks
                ),
            );
        }
        if v.activation_checkpointing && v.kind != ValueKind::Model {
            return bad(
                "value.activation_checkpointing",
                "needs value.kind = \"model\": a `head` value has no decoder layers to recompute".into(),
            );
        }
        if v.precision == ValuePrecision::Bf16 && v.kind != ValueKind::Model {
            return bad(
                "value.precision",
                "bf16 needs value.kind = \"model\": a `head` is small and trains in f32 on the frozen states".into(),
            );
        }
        if v.betas.is_empty() || v.betas.iter().any(|b| b.is_nan() || *b <= 0.0) {
            return bad("value.betas", "needs at least one value, each > 0".into());
        }
        let w = self.baselines.args_weight;
        if !(w >= 0.0 && w.is_finite()) {
            return bad("baselines.args_weight", format!("{w} must be a finite number >= 0"));
        }
        if self.cluster.max_attempts == 0 {
            return bad("cluster.max_attempts", "must be at least 1".into());
        }
        if self.cluster.bucket_bytes < 1024 {
            return bad("cluster.bucket_bytes", format!("{} must be at least 1024", self.cluster.bucket_bytes));
        }
        let gib = self.cluster.device_memory_gib;
        if !(gib >= 0.0 && gib.is_finite()) {
            return bad("cluster.device_memory_gib", format!("{gib} must be a finite number >= 0"));
        }
        if self.cluster.collective_deadline_s == 0 {
            return bad("cluster.collective_deadline_s", "must be at least 1".into());
        }
        if self.cluster.heartbeat_interval_s == 0 || self.cluster.heartbeat_interval_s >= self.cluster.lease_timeout_s {
            return bad(
                "cluster.heartbeat_interval_s",
                format!("must be in [1, lease_timeout_s = {})", self.cluster.lease_timeout_s),
            );
        }
        Ok(())
    }

    /// beta_i of value function V_i (1-based); later iterations reuse the last configured beta.
    pub fn beta(&self, i: usize) -> f64 {
        let betas = &self.value.betas;
        betas[i.saturating_sub(1).min(betas.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RunConfig> {
        RunConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_the_paper_defaults() {
        let c = parse("").unwrap();
        assert_eq!((c.search.beams, c.search.successors, c.search.chunk_length), (4, 4, 8));
        assert_eq!(c.value.lr, 3e-6);
        assert_eq!(c.value.adam_eps, 1e-5);
        assert_eq!(c.value.weight_decay, 0.01, "torch's AdamW default, as c_train.py");
        assert_eq!(c.value.batch_size, 256);
        assert_eq!(c.select.method, SelectMethod::Argmax);
        assert_eq!(c.select.temperature_unit, TemperatureUnit::PromptSd);
        assert_eq!(c.baselines.args_weight_unit, ArgsWeightUnit::CandidateSd);
        assert_eq!(c.sampling.max_new_tokens, 53);
    }

    #[test]
    fn unknown_field_is_named_in_the_error() {
        let err = parse("[search]\nbeems = 4\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("test.toml") && msg.contains("beems"), "{msg}");
        assert_eq!(err.kind(), "config_parse");
    }

    #[test]
    fn wrong_type_is_named_in_the_error() {
        let msg = parse("[sampling]\ntemperature = \"hot\"\n").unwrap_err().to_string();
        assert!(msg.contains("temperature"), "{msg}");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (text, field) in [
            ("[search]\nbeams = 0\n", "search.beams"),
            ("[sampling]\ntop_p = 1.5\n", "sampling.top_p"),
            ("[run]\nid = \"../x\"\n", "run.id"),
            ("[run]\ndevice = \"tpu\"\n", "run.device"),
            ("[value]\nbatch_size = 10\nmicro_batch_size = 4\n", "value.batch_size"),
            ("[value]\nbetas = []\n", "value.betas"),
            ("[value]\nweight_decay = -0.1\n", "value.weight_decay"),
            ("[value]\nridge_folds = 1\n", "value.ridge_folds"),
            ("[value]\nkind = \"model\"\nfeature_layers = 12\n", "value.feature_layers"),
            ("[value]\nkind = \"model\"\npooling = \"mean\"\n", "value.pooling"),
            ("[value]\nkind = \"model\"\nhead_fit = \"ridge\"\n", "value.head_fit"),
            ("[value]\nkind = \"head\"\nactivation_checkpointing = true\n", "value.activation_checkpointing"),
            ("[value]\nkind = \"head\"\nprecision = \"bf16\"\n", "value.precision"),
            ("[baselines]\nargs_weight = -1.0\n", "baselines.args_weight"),
            ("[reward]\nkind = \"embedding_similarity\"\nprompt_format = \"chatml\"\n", "reward.prompt_format"),
            ("[policy]\nprompt_format = \"llama3\"\n[reward]\nprompt_format = \"tldr\"\n", "reward.prompt_format"),
            ("[reward]\neval_prompt_format = \"chatml\"\n", "reward.eval_prompt_format"),
            ("[select]\nper_prompt = 17\n", "select.per_prompt"),
            ("[cluster]\nbucket_bytes = 10\n", "cluster.bucket_bytes"),
            ("[cluster]\ncollective_deadline_s = 0\n", "cluster.collective_deadline_s"),
            ("[cluster]\ndevice_memory_gib = -1.0\n", "cluster.device_memory_gib"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.kind(), "config_value", "{text}");
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn reward_prompt_formats_default_to_the_policys_and_parse() {
        let c = parse("").unwrap();
        assert_eq!((c.reward.prompt_format, c.reward.eval_prompt_format), (None, None));
        let c = parse(
            "[policy]\nprompt_format = \"llama3\"\n[reward]\nprompt_format = \"chatml\"\neval_model = \"rm\"\n\
             eval_prompt_format = \"raw\"\n",
        )
        .unwrap();
        assert_eq!(c.reward.prompt_format, Some(PromptFormat::Chatml));
        assert_eq!(c.reward.eval_prompt_format, Some(PromptFormat::Raw));
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c);
    }

    #[test]
    fn the_softmax_temperature_unit_parses() {
        let c = parse("[select]\nmethod = \"softmax\"\ntemperature = 0.5\ntemperature_unit = \"reward\"\n").unwrap();
        assert_eq!((c.select.temperature, c.select.temperature_unit), (0.5, TemperatureUnit::Reward));
        let msg = parse("[select]\ntemperature_unit = \"sd\"\n").unwrap_err().to_string();
        assert!(msg.contains("temperature_unit"), "{msg}");
    }

    #[test]
    fn value_sharding_defaults_to_none_parses_and_names_its_field_when_wrong() {
        assert_eq!(parse("").unwrap().value.sharding, ValueSharding::None);
        for (text, want) in
            [("none", ValueSharding::None), ("optimizer", ValueSharding::Optimizer), ("full", ValueSharding::Full)]
        {
            let c = parse(&format!("[value]\nsharding = \"{text}\"\n")).unwrap();
            assert_eq!((c.value.sharding, c.value.sharding.as_str()), (want, text));
            assert_eq!(parse(&toml::to_string(&c).unwrap()).unwrap(), c);
        }
        let c = parse("[value]\nprecision = \"bf16\"\n").unwrap();
        assert_eq!(
            (c.value.precision, parse("").unwrap().value.precision),
            (ValuePrecision::Bf16, ValuePrecision::F32)
        );
        let err = parse("[value]\nsharding = \"zero3\"\n").unwrap_err();
        assert_eq!(err.kind(), "config_parse");
        let msg = err.to_string();
        assert!(msg.contains("sharding") && msg.contains("full"), "{msg}");
    }

    #[test]
    fn betas_repeat_the_last_value() {
        let c = parse("[value]\nbetas = [1.0, 2.0, 2.5]\n").unwrap();
        assert_eq!([c.beta(1), c.beta(2), c.beta(3), c.beta(7)], [1.0, 2.0, 2.5, 2.5]);
    }

    #[test]
    fn round_trips_through_toml() {
        let c = parse("[run]\nid = \"x1\"\niterations = 2\n").unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c);
    }
}
