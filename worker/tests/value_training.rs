//! iro.md step 4 ("Optimize"): value training on the tiny fixtures — the loss falls for both value kinds,
//! a saved `model`-kind checkpoint is an HF seqcls folder `ScalarModel` reads back to the same values, and a
//! training killed after a checkpoint and resumed ends with exactly the weights of an uninterrupted one.

#[path = "support/value_examples.rs"]
mod value_examples;

use value_examples::examples;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iro_worker::model::{Checkpoint, ScalarModel};
use iro_worker::train::{
    FeatureCache, TrainReport, TrainableValue, ValueExample, ValueInit, ValueTrainConfig, build_batch, checkpoint,
    constant_predictor_loss, mean_target, squared_error_sum, train_value,
};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn config(lr: f64, epochs: usize) -> ValueTrainConfig {
    ValueTrainConfig {
        lr,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs,
        batch_size: 4,
        micro_batch_size: 2,
        checkpoint_every: 0,
        seed: 7,
        pad_id: 0,
        sharding: iro_common::config::ValueSharding::None,
        activation_checkpointing: false,
    }
}

fn model_init(name: &str) -> ValueInit {
    ValueInit::Model { dir: fixture(name), kind: Kind::Float, device: Device::Cpu }
}

fn head_init(name: &str) -> ValueInit {
    let ck = Checkpoint::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
    ValueInit::Head {
        backbone: ck.backbone().unwrap(),
        hidden: ck.config.hidden_size(),
        width: 16,
        from: None,
        depth: None,
    }
}

fn train(cfg: &ValueTrainConfig, data: &[ValueExample], init: &ValueInit, out: &Path) -> TrainReport {
    train_value(cfg, data, init, out, false, |_| ControlFlow::Continue(())).unwrap()
}

fn assert_loss_drops(report: &TrainReport) {
    let first = report.losses[0];
    assert!(report.final_loss * 5.0 <= first, "loss {first} → {} (losses {:?})", report.final_loss, report.losses);
    assert_eq!(report.steps, report.total_steps);
}

#[test]
fn model_kind_from_policy_gets_fresh_head_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let report = train(&config(2e-3, 15), &examples(8, 1), &model_init("llama_gqa_tied"), dir.path());
    assert_loss_drops(&report);
}

#[test]
fn model_kind_from_seqcls_keeps_head_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let report = train(&config(2e-3, 15), &examples(8, 2), &model_init("neox_seqcls"), dir.path());
    assert_loss_drops(&report);
}

#[test]
fn head_kind_learns_on_frozen_policy() {
    let dir = tempfile::tempdir().unwrap();
    let init = head_init("neox_parallel");
    let ValueInit::Head { backbone, .. } = &init else { unreachable!() };
    let embed_before = backbone.embeddings().copy();
    let data = examples(8, 3);
    let report = train(&config(1e-2, 30), &data, &init, dir.path());
    // A fresh head starts at the mean target, so falling below its first loss is not enough: it must end well
    // below the best constant's loss (it learned which sequences score higher).
    let constant = constant_predictor_loss(&data);
    assert!(report.final_loss * 5.0 <= constant, "final {} vs constant {constant}", report.final_loss);
    assert!(backbone.embeddings().equal(&embed_before), "the frozen backbone must not change");
}

#[test]
fn a_fresh_head_starts_at_the_mean_target() {
    let init = head_init("neox_parallel");
    let ValueInit::Head { backbone, hidden, .. } = &init else { unreachable!() };
    let data = examples(8, 3);
    let mean = mean_target(&data);
    // Token-weighted: rewards by index with |y| + 1 targets each.
    let weighted: f64 = data.iter().map(|e| e.reward * e.targets() as f64).sum::<f64>()
        / data.iter().map(|e| e.targets() as f64).sum::<f64>();
    assert!((mean - weighted).abs() < 1e-12);
    let value = TrainableValue::head(backbone.clone(), *hidden, 16, None, 7, mean, None).unwrap();
    let TrainableValue::Head { head, .. } = &value else { unreachable!() };
    assert!((head.out_bias.double_value(&[0]) - mean).abs() < 1e-6);
}

#[test]
fn cached_backbone_states_give_the_loss_and_gradient_of_a_full_forward() {
    let init = head_init("neox_parallel");
    let ValueInit::Head { backbone, hidden, .. } = &init else { unreachable!() };
    let value = TrainableValue::head(backbone.clone(), *hidden, 16, None, 3, 0.4, None).unwrap();
    let TrainableValue::Head { head, .. } = &value else { unreachable!() };
    let data = examples(6, 9);
    let micro: Vec<(usize, &ValueExample)> = data.iter().enumerate().collect();
    let refs: Vec<&ValueExample> = data.iter().collect();
    let b = build_batch(&refs, 0, Device::Cpu).unwrap();
    let grads = |loss: &Tensor| -> Vec<Tensor> {
        for p in value.params() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss.backward();
        value.params().iter().map(|p| p.grad().copy()).collect()
    };
    let full = squared_error_sum(&value.values(&b.ids, &b.valid, &b.positions), &b.target_mask, &b.rewards);
    let want = grads(&full);
    let mut cache = FeatureCache::default();
    // Two passes: the first computes the states, the second reads them back (in another order).
    for pass in 0..2 {
        let mut order = micro.clone();
        if pass == 1 {
            order.reverse();
        }
        let (states, rewards) = cache.micro_batch(backbone, &order, 0, Device::Cpu).unwrap();
        let cached = (head.forward(&states) - rewards).square().sum(Kind::Float) * 0.5;
        let diff = (cached.double_value(&[]) - full.double_value(&[])).abs();
        assert!(diff <= 1e-4 * full.double_value(&[]).abs().max(1.0), "pass {pass}: loss differs by {diff}");
        for (g, w) in grads(&cached).iter().zip(&want) {
            let err = f64::try_from((g - w).abs().max()).unwrap();
            assert!(err <= 1e-4, "pass {pass}: gradient differs by {err}");
        }
    }
    assert_eq!(cache.len(), data.len());
}

fn value_on(model: &ScalarModel, data: &[ValueExample]) -> Tensor {
    let refs: Vec<&ValueExample> = data.iter().collect();
    let b = build_batch(&refs, 0, Device::Cpu).unwrap();
    tch::no_grad(|| model.values(&b.ids, &b.valid, &b.positions, None)).masked_select(&b.valid)
}

#[test]
fn saved_model_checkpoint_is_hf_seqcls_and_loads_with_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = examples(6, 4);
    let mut cfg = config(1e-3, 2);
    cfg.checkpoint_every = 1;
    let report = train(&cfg, &data, &model_init("neox_parallel"), dir.path());
    assert_eq!(checkpoint::latest(dir.path()), Some(report.checkpoint.clone()));
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "older checkpoints are removed, no temp folder is left");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.checkpoint.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["architectures"][0], "GPTNeoXForSequenceClassification");
    assert_eq!(json["num_labels"], 1);

    // The in-memory trained value function, rebuilt from the same checkpoint via the trainer's own loader, and
    // the engine's ScalarModel::load must agree.
    let loaded = ScalarModel::load(&report.checkpoint, Kind::Float, Device::Cpu).unwrap();
    let trained = TrainableValue::model_from_dir(&report.checkpoint, Kind::Float, Device::Cpu, 0).unwrap();
    let TrainableValue::Model { model, .. } = &trained else { unreachable!() };
    let a = value_on(&loaded, &data);
    let b = value_on(model, &data);
    assert!(a.allclose(&b, 0.0, 0.0, false));
    // And training moved it away from the fresh-headed start.
    let fresh = TrainableValue::model_from_dir(&fixture("neox_parallel"), Kind::Float, Device::Cpu, cfg.seed).unwrap();
    let TrainableValue::Model { model: fresh, .. } = &fresh else { unreachable!() };
    assert!(!value_on(fresh, &data).allclose(&a, 1e-6, 1e-6, false));
}

/// Weights after a whole training in `out` (read from its final checkpoint's model.safetensors).
fn final_weights(out: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(checkpoint::latest(out).unwrap().join("model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn assert_resume_is_exact(init_straight: &ValueInit, init_resumed: impl Fn() -> ValueInit, lr: f64) {
    let data = examples(10, 5);
    let mut cfg = config(lr, 3); // 3 steps per epoch (10 / 4 rounded up), 9 in all
    cfg.checkpoint_every = 4;
    let straight = tempfile::tempdir().unwrap();
    let full = train(&cfg, &data, init_straight, straight.path());
    assert_eq!(full.steps, 9);

    let resumed = tempfile::tempdir().unwrap();
    let killed = train_value(&cfg, &data, &init_resumed(), resumed.path(), true, |p| {
        if p.step == 4 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(killed.steps, 4);
    // Fresh objects: everything comes back from disk.
    let rest = train_value(&cfg, &data, &init_resumed(), resumed.path(), true, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(rest.steps, 9);
    assert_eq!(rest.losses.len(), 9);
    for (a, b) in full.losses.iter().zip(&rest.losses) {
        assert!((a - b).abs() <= 1e-6, "losses {:?} vs {:?}", full.losses, rest.losses);
    }

    let (a, b) = (final_weights(straight.path()), final_weights(resumed.path()));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{na}: max abs diff {diff}");
    }
}

#[test]
fn resumed_model_training_ends_with_the_same_weights() {
    assert_resume_is_exact(&model_init("llama_seqcls"), || model_init("llama_seqcls"), 1e-3);
}

#[test]
fn resumed_head_training_ends_with_the_same_weights() {
    let init = head_init("neox_parallel");
    let ValueInit::Head { backbone, hidden, .. } = &init else { unreachable!() };
    let (backbone, hidden): (Arc<_>, i64) = (backbone.clone(), *hidden);
    let again = move || ValueInit::Head { backbone: backbone.clone(), hidden, width: 16, from: None, depth: None };
    assert_resume_is_exact(&init, again, 1e-2);
}

/// bf16 mixed precision (`value.precision = "bf16"`: the pipeline builds the value model in bf16): bf16 weights
/// and activations in the passes, f32 master weights and AdamW moments, the loss in f32. Over 200 AdamW steps
/// on the llama_seqcls fixture its loss curve tracks the f32 one within the tolerance below; the checkpoint is a
/// bf16 HF folder that loads, and a bf16
/// training resumed from it ends with the uninterrupted run's weights (the masters travel in the train state).
#[test]
fn bf16_mixed_precision_tracks_the_f32_loss_curve() {
    let mut cfg = config(1e-3, 50);
    cfg.checkpoint_every = 100;
    let data = examples(16, 3);
    let bf16 = ValueInit::Model { dir: fixture("llama_seqcls"), kind: Kind::BFloat16, device: Device::Cpu };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = train(&cfg, &data, &model_init("llama_seqcls"), a.path());
    let half = train(&cfg, &data, &bf16, b.path());
    assert_eq!((full.steps, half.steps), (200, 200));
    assert_loss_drops(&full);
    // Each step's loss within 2% of f32's plus 2% of the first loss (bf16 keeps 8 bits of mantissa).
    let scale = full.losses[0];
    let worst = full
        .losses
        .iter()
        .zip(&half.losses)
        .map(|(f, h)| (f - h).abs() / (0.02 * f + 0.02 * scale))
        .fold(0.0, f64::max);
    eprintln!(
        "bf16 vs f32 loss: first {:.4} / {:.4}, final {:.5} / {:.5}, worst step at {:.2} of the tolerance",
        half.losses[0], full.losses[0], half.final_loss, full.final_loss, worst
    );
    assert!(worst <= 1.0, "bf16 loss leaves the f32 curve: {:?} vs {:?}", half.losses, full.losses);

    let saved = Tensor::read_safetensors(half.checkpoint.join("model.safetensors")).unwrap();
    assert!(saved.iter().all(|(_, t)| t.kind() == Kind::BFloat16), "the bf16 checkpoint's weights are bf16");
    ScalarModel::load(&half.checkpoint, Kind::Float, Device::Cpu).unwrap();

    let resumed = tempfile::tempdir().unwrap();
    let stopped = train_value(&cfg, &data, &bf16, resumed.path(), false, |p| {
        if p.step == 150 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert_eq!(stopped.steps, 150);
    let rest = train_value(&cfg, &data, &bf16, resumed.path(), true, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(rest.steps, 200);
    let diff = final_weights(b.path())
        .iter()
        .zip(final_weights(resumed.path()))
        .map(|((_, x), (_, y))| (x.to_kind(Kind::Float) - y.to_kind(Kind::Float)).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert_eq!(diff, 0.0, "a resumed bf16 training ends elsewhere");
}

/// A bf16 value model as training publishes it is a folder transformers reads: `bf16_value` was written by this
/// trainer (`worker/examples/bf16_value_fixture.rs`, bf16 mixed precision) and loaded by transformers'
/// `AutoModelForSequenceClassification` in float32 (`scripts/fixtures/make_bf16_value_reference.py`), whose values
/// iro's reader (what `iro score` runs) must give on the same ids. A fresh bf16 training must publish that same
/// layout: the same tensor names, shapes and dtypes and the same config, so what transformers read there it reads here.
#[test]
fn a_bf16_value_model_loads_in_transformers_with_the_values_iro_reads() {
    let folder = fixture("bf16_value");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap()).unwrap();
    assert_eq!(reference["class"], "LlamaForSequenceClassification", "{reference}");
    assert_eq!(reference["saved_dtype"], "bfloat16", "{reference}");
    let model = ScalarModel::load(&folder, Kind::Float, Device::Cpu).unwrap();
    let sequences = reference["sequences"].as_array().unwrap();
    let values = reference["values"].as_array().unwrap();
    assert_eq!(sequences.len(), values.len());
    for (ids, want) in sequences.iter().zip(values) {
        let ids: Vec<i64> = ids.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let valid = Tensor::ones([1, ids.len() as i64], (Kind::Bool, Device::Cpu));
        let got = tch::no_grad(|| model.score(&Tensor::from_slice(&ids).unsqueeze(0), &valid)).double_value(&[0]);
        let want = want.as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4, "ids {ids:?}: iro reads {got}, transformers {want}");
    }

    // The same training again publishes the same layout.
    let cfg = config(1e-3, 5);
    let bf16 = ValueInit::Model { dir: fixture("llama_seqcls"), kind: Kind::BFloat16, device: Device::Cpu };
    let out = tempfile::tempdir().unwrap();
    let report = train(&cfg, &examples(16, 3), &bf16, out.path());
    let layout = |dir: &Path| -> Vec<(String, Vec<i64>, Kind)> {
        let mut t: Vec<_> = Tensor::read_safetensors(dir.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.size(), t.kind()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert_eq!(layout(&report.checkpoint), layout(&folder), "a bf16 training publishes another tensor layout");
    let config = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(config(&report.checkpoint), config(&folder), "a bf16 training publishes another config.json");
}
