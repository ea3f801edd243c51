//! Resumable, HF-compatible value checkpoints. A checkpoint folder `checkpoint-<step>` holds
//! `model.safetensors` + `config.json` (for the `model` kind, a `*ForSequenceClassification` folder that
//! `ScalarModel::load` and transformers read; for the `head` kind, the head's tensors), and the training state:
//! `train_state.safetensors` (AdamW moments `m.<param>`, `v.<param>`) and `train_state.json` (`TrainState`).
//! Each is written to a hidden temp folder and renamed into place, so a crash never leaves half a checkpoint;
//! older checkpoints are removed only after the new one exists.
//!
//! A sharded training (`value.sharding` = `optimizer` or `full`) writes the same folder, its model files being
//! the gathered full model (rank 0 writes them, so the published V_t is the same HF folder), but the optimizer
//! state lives in one `shard-RRRRR-of-WWWWW.safetensors` per rank (that rank's slice of the weights and of both
//! moments, bucket by bucket) instead of `train_state.safetensors`. A rank whose `out_dir` is not rank 0's
//! (no shared filesystem) publishes its own copy of the folder holding its shard and `train_state.json`, which
//! is all its resume reads.

use iro_common::config::ValuePooling;
use std::path::{Path, PathBuf};

use iro_common::config::ValueSharding;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use super::optim::AdamW;
use super::shard::ShardedState;
use super::value::TrainableValue;
use crate::collective::Collective;
use crate::error::{Error, Result};

/// Where training stands after the optimizer step `step` (steps counted from 1; 0 = nothing done).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch the next step belongs to, and the position within that epoch's shuffled order where its
    /// batch starts.
    pub epoch: usize,
    pub position: usize,
    pub seed: u64,
    pub examples: usize,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub lr: f64,
    /// `model` or `head`.
    pub kind: String,
    /// The loss of every step so far.
    pub losses: Vec<f64>,
    /// `value.sharding` of the run that wrote the checkpoint (checkpoints from before sharding: `none`).
    #[serde(default)]
    pub sharding: ValueSharding,
    /// Ranks of the gang that wrote it; a sharded checkpoint holds one shard file per rank and resumes only
    /// with as many ranks.
    #[serde(default = "one")]
    pub world: usize,
    /// Sharded: the elements of every bucket, so a changed bucket plan (`cluster.bucket_bytes`) is refused
    /// instead of misreading the shards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<i64>,
}

fn one() -> usize {
    1
}

const PREFIX: &str = "checkpoint-";

/// The `config.json` key of a `head`-kind value: the decoder layers its states pass through (0: all of them).
pub const FEATURE_LAYERS: &str = "feature_layers";

/// The `config.json` key of a `head`-kind value: how it pools those states (`value.pooling`; absent: `last`).
pub const POOLING: &str = "pooling";

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_dir(out_dir: &Path, step: usize) -> PathBuf {
    out_dir.join(format!("{PREFIX}{step:08}"))
}

/// The newest complete checkpoint under `out_dir` (temp folders are hidden and never match).
pub fn latest(out_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(PREFIX)?.parse::<usize>().ok().map(|s| (s, e.path()))
        })
        .filter(|(_, p)| p.join("train_state.json").exists())
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

pub(crate) fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path)
        .map_err(|e| Error::Checkpoint { path: path.to_owned(), message: format!("cannot write safetensors: {e}") })
}

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    std::fs::write(path, text).map_err(io(path))
}

/// transformers' name of a weight dtype (`config.json`'s `dtype`).
fn hf_dtype(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

/// The tensors of `model.safetensors` and the `config.json` of a value function.
fn model_files(value: &TrainableValue) -> (Vec<(String, Tensor)>, Value) {
    match value {
        TrainableValue::Model { model, params } => {
            let mut tensors: Vec<(String, Tensor)> =
                params.iter().filter(|(n, _)| n != "score.bias").map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
            // A TL;DR reward model's `bias` config offset is folded into `score.bias`, so the saved head is plain.
            let (offset, bias) = match &model.head {
                crate::model::heads::Head::Linear(h) => (h.offset, h.bias.as_ref()),
                crate::model::heads::Head::Mlp(_) => (0.0, None),
            };
            match bias {
                Some(b) => tensors.push(("score.bias".into(), b.detach() - offset)),
                None if offset != 0.0 => tensors.push(("score.bias".into(), Tensor::from_slice(&[-offset as f32]))),
                None => {}
            }
            let mut config = model.config.raw.clone();
            let class = match model.config.arch {
                crate::model::ArchConfig::GptNeoX(_) => "GPTNeoXForSequenceClassification",
                crate::model::ArchConfig::Llama(_) => "LlamaForSequenceClassification",
            };
            if let Some(obj) = config.as_object_mut() {
                obj.insert("architectures".into(), json!([class]));
                obj.insert("num_labels".into(), json!(1));
                obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
                obj.insert("label2id".into(), json!({"LABEL_0": 0}));
                obj.remove("bias");
                // The dtype the weights are saved in (a bf16 training saves bf16), so `dtype="auto"` loaders get it.
                let dtype = hf_dtype(tensors.first().map_or(Kind::Float, |(_, t)| t.kind()));
                obj.insert("dtype".into(), json!(dtype));
                if obj.contains_key("torch_dtype") {
                    obj.insert("torch_dtype".into(), json!(dtype));
                }
            }
            (tensors, config)
        }
        TrainableValue::Head { head, depth, .. } => {
            let width = head.dense_weight.size()[0];
            let hidden = head.dense_weight.size()[1];
            let config = json!({
                "iro_value_kind": "head", "hidden_size": hidden, "head_width": width,
                FEATURE_LAYERS: depth.unwrap_or(0),
            });
            (head.named(), config)
        }
    }
}

fn tmp_dir(out_dir: &Path, step: usize) -> PathBuf {
    out_dir.join(format!(".tmp-{PREFIX}{step:08}"))
}

/// An empty temp folder for the checkpoint after `step` (a stale one from a crash is cleared).
pub(crate) fn fresh_tmp(out_dir: &Path, step: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let tmp = tmp_dir(out_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Writes `train_state.json` last into `tmp`, renames it to `checkpoint-<step>` and removes older checkpoints.
pub(crate) fn publish(out_dir: &Path, tmp: &Path, state: &TrainState) -> Result<PathBuf> {
    write_json(&tmp.join("train_state.json"), state)?;
    let final_dir = checkpoint_dir(out_dir, state.step);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(tmp, &final_dir).map_err(io(&final_dir))?;
    for entry in std::fs::read_dir(out_dir).map_err(io(out_dir))?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && entry.path() != final_dir {
            std::fs::remove_dir_all(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(final_dir)
}

fn write_model(dir: &Path, value: &TrainableValue) -> Result<()> {
    let (tensors, config) = model_files(value);
    write_tensors(&dir.join("model.safetensors"), &tensors)?;
    write_json(&dir.join("config.json"), &config)
}

/// Writes `checkpoint-<state.step>` under `out_dir` atomically and removes older checkpoints.
pub fn save(out_dir: &Path, value: &TrainableValue, opt: &AdamW, state: &TrainState) -> Result<PathBuf> {
    let tmp = fresh_tmp(out_dir, state.step)?;
    write_model(&tmp, value)?;
    let names: Vec<String> = value.named_params().into_iter().map(|(n, _)| n).collect();
    save_moments(&tmp, &names, opt)?;
    publish(out_dir, &tmp, state)
}

/// Writes `opt`'s moments (and masters) of the parameters `names` to `train_state.safetensors` in `dir`.
pub(crate) fn save_moments(dir: &Path, names: &[String], opt: &AdamW) -> Result<()> {
    let mut moments = Vec::with_capacity(2 * names.len());
    for (i, (name, (m, v))) in names.iter().zip(opt.m.iter().zip(&opt.v)).enumerate() {
        moments.push((format!("m.{name}"), m.shallow_clone()));
        moments.push((format!("v.{name}"), v.shallow_clone()));
        if let Some(master) = &opt.master {
            moments.push((format!("master.{name}"), master[i].shallow_clone()));
        }
    }
    write_tensors(&dir.join("train_state.safetensors"), &moments)
}

/// The file of rank `rank`'s shard in a checkpoint written by `world` ranks.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.safetensors")
}

/// The sharded [`save`], called by every rank of the gang in step: rank 0 writes the model files from `value`
/// (whose weights must be whole: the caller gathers them first with `full`), every rank its shard file, then
/// rank 0 writes `train_state.json` and renames the folder into place. Barriers order the three, so the folder
/// appears complete or not at all. A rank that still sees the temp folder after rank 0 renamed it does not share
/// rank 0's `out_dir` and publishes its own copy (its shard and the train state).
pub fn save_sharded(
    out_dir: &Path,
    value: &TrainableValue,
    shards: &ShardedState,
    state: &TrainState,
    collective: &mut dyn Collective,
) -> Result<PathBuf> {
    let (rank, world) = (collective.rank(), collective.world());
    if rank == 0 {
        let tmp = fresh_tmp(out_dir, state.step)?;
        write_model(&tmp, value)?;
    }
    collective.barrier()?;
    let tmp = tmp_dir(out_dir, state.step);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_tensors(&tmp.join(shard_file(rank, world)), &shards.shard_tensors())?;
    collective.barrier()?;
    if rank == 0 {
        publish(out_dir, &tmp, state)?;
    }
    collective.barrier()?;
    if rank != 0 && tmp.exists() {
        publish(out_dir, &tmp, state)?;
    }
    Ok(checkpoint_dir(out_dir, state.step))
}

/// Writes a linear `head`-kind value (a ridge fit: `weight` [1, H], `bias` [1]) as the one checkpoint
/// `checkpoint-00000001` under `out_dir`, atomically, with a `train_state.json` marking it complete.
pub fn save_linear_head(
    out_dir: &Path,
    weight: &Tensor,
    bias: &Tensor,
    depth: Option<usize>,
    pooling: ValuePooling,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let final_dir = checkpoint_dir(out_dir, 1);
    let tmp = out_dir.join(format!(".tmp-{PREFIX}{:08}", 1));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let names = crate::model::heads::LINEAR_VALUE_HEAD;
    let tensors = [(names[0].to_owned(), weight.shallow_clone()), (names[1].to_owned(), bias.shallow_clone())];
    write_tensors(&tmp.join("model.safetensors"), &tensors)?;
    let hidden = weight.size().last().copied().unwrap_or(0);
    let config = json!({
        "iro_value_kind": "head", "head": "linear", "hidden_size": hidden, FEATURE_LAYERS: depth.unwrap_or(0),
        POOLING: pooling.as_str(),
    });
    write_json(&tmp.join("config.json"), &config)?;
    let state = json!({"step": 1, "total_steps": 1, "kind": "head", "fit": "ridge"});
    write_json(&tmp.join("train_state.json"), &state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// Reads a checkpoint's `train_state.json`.
pub fn read_train_state(dir: &Path) -> Result<TrainState> {
    let json_path = dir.join("train_state.json");
    let text = std::fs::read_to_string(&json_path).map_err(io(&json_path))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { path: json_path.clone(), message: format!("malformed train state: {e}") })
}

/// Restores this rank's shards (weights and moments) from its shard file in `dir`; `state` is the folder's train
/// state, already checked against this gang.
pub fn load_shards(
    dir: &Path,
    state: &TrainState,
    shards: &mut ShardedState,
    collective: &mut dyn Collective,
) -> Result<()> {
    let file = dir.join(shard_file(collective.rank(), state.world));
    let tensors = Tensor::read_safetensors(&file)
        .map_err(|e| Error::Checkpoint { path: file.clone(), message: format!("cannot read safetensors: {e}") })?;
    shards.load_shards(&tensors, &file, collective)?;
    shards.steps = state.step as u64;
    Ok(())
}

/// Reads `train_state.json` and fills `opt`'s moments from `train_state.safetensors` (by parameter name).
pub fn load_train_state(dir: &Path, value: &TrainableValue, opt: &mut AdamW) -> Result<TrainState> {
    load_moments(dir, &value.named_params(), opt)
}

/// Reads `train_state.json` and fills `opt`'s moments (and masters) for the parameters `params` from
/// `train_state.safetensors`, by name: any trainer that saves with [`save_moments`].
pub(crate) fn load_moments(dir: &Path, params: &[(String, Tensor)], opt: &mut AdamW) -> Result<TrainState> {
    let state = read_train_state(dir)?;
    let file = dir.join("train_state.safetensors");
    let tensors = Tensor::read_safetensors(&file)
        .map_err(|e| Error::Checkpoint { path: file.clone(), message: format!("cannot read safetensors: {e}") })?;
    let find = |name: &str, like: &Tensor| -> Result<Tensor> {
        let t = tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| Error::MissingTensor {
            path: dir.to_owned(),
            name: name.to_owned(),
            files: file.display().to_string(),
        })?;
        if t.size() != like.size() {
            return Err(Error::TensorShape {
                file: file.clone(),
                name: name.to_owned(),
                expected: like.size(),
                actual: t.size(),
            });
        }
        Ok(t.to_kind(Kind::Float).to_device(like.device()))
    };
    opt.m = params.iter().map(|(n, p)| find(&format!("m.{n}"), p)).collect::<Result<_>>()?;
    opt.v = params.iter().map(|(n, p)| find(&format!("v.{n}"), p)).collect::<Result<_>>()?;
    if opt.master.is_some() {
        // bf16 weights: the f32 masters the updates accumulate in (the model file holds them rounded).
        opt.master = Some(params.iter().map(|(n, p)| find(&format!("master.{n}"), p)).collect::<Result<_>>()?);
    }
    opt.steps = state.step as u64;
    Ok(state)
}
