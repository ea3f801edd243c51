//! IRO as tasks (iro.md): a rollout shard samples from pi_{t-1} and scores and selects its candidates, the
//! train task fits V_t on the selected candidates, an eval shard decodes held-out prompts with pi_t (and, at
//! iteration 1, with the baselines). `Pipeline` is the `TaskRunner` that does this work; the local driver
//! (`local`) and the cluster's task loop (`runtime`) only decide which task runs where. Everything a task needs
//! is derived from the run config, its iteration and shard, and what earlier phases wrote to the store.

mod checkpoints;
pub mod data;
mod diagnostics;
pub mod efficiency;
mod eval;
mod gang;
pub mod local;
pub mod report;
mod rollout;
pub mod scoring;
pub mod select;
mod train;
pub mod value_bench;
pub(crate) mod values;

use std::path::{Path, PathBuf};

use iro_common::config::{RewardKind, RunConfig};
use iro_common::layout::RunLayout;
use iro_common::store::Store;
use tch::{Device, Kind};

use self::data::RunData;
use crate::error::{Error, Result};
use crate::generate::GenerateOptions;
use crate::generate::sampler::SamplingParams;
use crate::jobs::generate::{pad_token, stop_tokens};
use crate::model::CausalLm;
use crate::reward::{EmbeddingSimilarityReward, Reward, RewardModel, RewardPrompt};
use crate::runtime::{TaskControl, TaskOutput, TaskPhase, TaskRef, TaskRunner};
use crate::text::Tokenizer;

/// A reward the pipeline holds across tasks.
pub type BoxedReward = Box<dyn Reward>;

/// The loaded state of one worker: the frozen policy, the rewards and the data, loaded once and kept across
/// tasks; value functions are loaded the first time a task needs them.
pub struct Pipeline {
    config: RunConfig,
    layout: RunLayout,
    store: Store,
    runtime: BlockOn,
    device: Device,
    kind: Kind,
    policy_dir: PathBuf,
    policy: CausalLm,
    tokenizer: Tokenizer,
    eos: Vec<i64>,
    pad: i64,
    data: RunData,
    reward: BoxedReward,
    /// `None`: the evaluation reward is the training one.
    eval_reward: Option<BoxedReward>,
    /// V_1, V_2, ... as far as loaded.
    values: Vec<values::LoadedValue>,
    /// The weak-to-strong pair, loaded on first use.
    w2s: Option<(CausalLm, CausalLm)>,
    /// Best-of-N's candidates by test prompt id, kept from iteration 1's eval for the value diagnostics of later
    /// iterations (the same seeds draw the same candidates, so a worker without them samples them again).
    drawn: std::collections::HashMap<String, Vec<crate::search::Candidate>>,
    /// Local scratch space (value checkpoints of a remote store live here while training).
    work_dir: PathBuf,
    /// This rank's ring listener between publishing its gang endpoint and the gang forming.
    gang_listener: Option<std::net::TcpListener>,
}

impl Pipeline {
    /// Loads the policy, tokenizer, rewards and data of `config`. `device` overrides `run.device` (a worker's
    /// `--device`); `work_dir` is local scratch space.
    pub fn open(config: RunConfig, device: Option<&str>, work_dir: &Path) -> Result<Self> {
        check_paths(&config)?;
        let device = crate::device::parse_device(device.unwrap_or(&config.run.device))?;
        let kind = crate::device::parse_dtype(&config.run.dtype, device)?;
        let layout = RunLayout::new(&config.run.id)?;
        let store = Store::open(&config.run.store)?;
        let policy_dir = config.policy.model.clone();
        let policy = CausalLm::load(&policy_dir, kind, device)?;
        let tokenizer = Tokenizer::load(&policy_dir)?;
        let eos = stop_tokens(&policy_dir, &policy.config)?;
        if eos.is_empty() {
            return Err(Error::Checkpoint {
                path: policy_dir.clone(),
                message: "no eos_token_id in config.json or generation_config.json: responses could never end".into(),
            });
        }
        let pad = pad_token(&policy.config, &eos);
        let data = RunData::load(&config)?;
        let r = &config.reward;
        // A reward model reads the prompt as the policy saw it, unless it has a chat template of its own.
        let policy_format = config.policy.prompt_format;
        let reward_prompt = RewardPrompt::resolve(r.prompt_format, policy_format);
        let reward = load_reward(r.kind, &r.model, kind, device, reward_prompt)?;
        let eval_reward = if r.eval_model.as_os_str().is_empty() {
            None
        } else {
            let eval_prompt = RewardPrompt::resolve(r.eval_prompt_format, policy_format);
            Some(load_reward(r.kind, &r.eval_model, kind, device, eval_prompt)?)
        };
        tracing::info!(
            run = %config.run.id, policy = %policy_dir.display(), device = ?device, dtype = ?kind,
            train_prompts = data.train.len(), test_prompts = data.test_prompts().len(), "pipeline loaded"
        );
        Ok(Self {
            layout,
            store,
            runtime: BlockOn::new()?,
            device,
            kind,
            policy_dir,
            policy,
            tokenizer,
            eos,
            pad,
            data,
            reward,
            eval_reward,
            values: Vec::new(),
            w2s: None,
            drawn: Default::default(),
            work_dir: work_dir.to_owned(),
            gang_listener: None,
            config,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn layout(&self) -> &RunLayout {
        &self.layout
    }

    fn sampling(&self) -> SamplingParams {
        let s = &self.config.sampling;
        SamplingParams { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p }
    }

    /// How the frozen model samples a plain response here (rollouts, baselines, diagnostics, the benchmark).
    fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.config.sampling.max_new_tokens,
            sampling: self.sampling(),
            eos_token_ids: self.eos.clone(),
            pad_token_id: self.pad,
        }
    }

    fn eval_reward(&self) -> &dyn Reward {
        self.eval_reward.as_deref().unwrap_or(self.reward.as_ref())
    }

    /// Runs a future on this pipeline's async runtime (the store is async; the tensor work is not).
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

// SAFETY: a `Pipeline` is `!Send` only because its models share weights through `Arc<Backbone>` (tch's
// `Tensor` is `Send` but not `Sync`). Every clone of such an `Arc` is owned by this pipeline (policy, head-kind
// values, rewards, a training's borrowed backbone that is dropped before `run` returns), so moving the pipeline
// moves all of them together: no two threads ever hold clones of one `Arc`, and the tensors are used from one
// thread at a time.
unsafe impl Send for Pipeline {}

impl TaskRunner for Pipeline {
    fn run(&mut self, task: &TaskRef, control: &TaskControl) -> Result<TaskOutput> {
        let t = task.iteration;
        if t == 0 || t > self.config.run.iterations {
            return Err(Error::InvalidRequest(format!(
                "task {}: iteration {t} is outside 1..={}",
                task.task_id, self.config.run.iterations
            )));
        }
        let span = tracing::info_span!("task", id = %task.task_id, attempt = task.attempt, phase = %task.phase, t, shard = task.shard);
        let _enter = span.enter();
        match task.phase {
            TaskPhase::Rollout => self.rollout(t, task.shard, task.attempt, control),
            TaskPhase::Train => self.train(t, task, control),
            TaskPhase::Eval => self.eval(t, task.shard, task.attempt, control),
        }
    }

    fn gang_endpoint(&mut self, task: &TaskRef) -> Result<String> {
        let e = gang::endpoint(task.rank, self.device)?;
        self.gang_listener = Some(e.listener);
        Ok(e.published)
    }
}

/// The folders a run needs, named by their config field when missing (before anything slow is loaded).
fn check_paths(config: &RunConfig) -> Result<()> {
    let b = &config.baselines;
    let w2s = b.methods.contains(&iro_common::config::Baseline::WeakToStrong);
    let required = [
        ("policy.model", &config.policy.model, true),
        ("data.train", &config.data.train, true),
        ("reward.model", &config.reward.model, true),
        ("baselines.w2s_tuned", &b.w2s_tuned, w2s),
        ("baselines.w2s_untuned", &b.w2s_untuned, w2s),
    ];
    for (field, path, needed) in required {
        if needed && path.as_os_str().is_empty() {
            return Err(Error::InvalidRequest(format!("run config: `{field}` is empty; this run needs it")));
        }
        if needed && !path.exists() {
            return Err(Error::InvalidRequest(format!("run config: `{field}` = {} does not exist", path.display())));
        }
    }
    Ok(())
}

fn load_reward(kind: RewardKind, dir: &Path, dtype: Kind, device: Device, prompt: RewardPrompt) -> Result<BoxedReward> {
    Ok(match kind {
        // The sentence encoder is tiny: f32 everywhere keeps its similarities comparable across devices.
        RewardKind::EmbeddingSimilarity => Box::new(EmbeddingSimilarityReward::load(dir, Kind::Float, device)?),
        RewardKind::Model => Box::new(RewardModel::load(dir, dtype, device, prompt)?),
    })
}

/// A way to wait for async store calls from the synchronous task code: the caller's tokio runtime when there
/// is one (a worker's task runs on a blocking thread of it), else a small runtime of our own.
enum BlockOn {
    Handle(tokio::runtime::Handle),
    Own(tokio::runtime::Runtime),
}

impl BlockOn {
    fn new() -> Result<Self> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => Ok(BlockOn::Handle(h)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(BlockOn::Own)
                .map_err(|e| Error::InvalidRequest(format!("cannot start an async runtime for the store: {e}"))),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            BlockOn::Handle(h) => h.block_on(f),
            BlockOn::Own(rt) => rt.block_on(f),
        }
    }
}
