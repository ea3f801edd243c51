//! The engine against Hugging Face `transformers` on the same weights: tiny random-weight checkpoints and
//! their reference outputs written by `scripts/fixtures/make_fixtures.py` (checked in; no Python needed).
//! Outputs at padding positions are arbitrary in both implementations, so only real tokens are compared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use iro_worker::generate::sampler::SamplingParams;
use iro_worker::generate::{GenerateOptions, generate};
use iro_worker::model::{CausalLm, Checkpoint, ModelConfig, ScalarModel};
use tch::{Device, Kind, Tensor};

const LOGIT_TOL: f64 = 1e-4;
const VALUE_TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load(name: &str) -> Self {
        let dir = fixture(name);
        let tensors = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Self { tensors, json }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference tensor {name}"))
    }

    fn valid(&self) -> Tensor {
        self.t("attention_mask").to_kind(Kind::Bool)
    }

    /// Rows of `input_ids` without their left padding.
    fn prompts(&self) -> Vec<Vec<i64>> {
        let ids: Vec<Vec<i64>> = Vec::try_from(self.t("input_ids")).unwrap();
        let mask: Vec<Vec<i64>> = Vec::try_from(self.t("attention_mask")).unwrap();
        ids.iter()
            .zip(&mask)
            .map(|(r, m)| r.iter().zip(m).filter(|(_, m)| **m == 1).map(|(t, _)| *t).collect())
            .collect()
    }
}

/// Max |a - b| over the positions where `valid` [B, T] is true (a, b: [B, T, ...]).
fn max_err_on_valid(a: &Tensor, b: &Tensor, valid: &Tensor) -> f64 {
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs();
    let diff = if diff.dim() > 2 { diff.flatten(2, -1).amax(&[-1i64][..], false) } else { diff };
    diff.masked_select(valid).max().double_value(&[])
}

fn check_causal_lm(name: &str) {
    let r = Reference::load(name);
    let lm = CausalLm::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let hidden = lm.backbone.forward(r.t("input_ids"), &r.valid(), r.t("position_ids"), None);
    let err = max_err_on_valid(&lm.logits(&hidden), r.t("logits"), &r.valid());
    assert!(err <= LOGIT_TOL, "{name}: logits max-abs error {err:e} > {LOGIT_TOL:e}");
    if let Some(h) = r.tensors.get("hidden_states") {
        let err = max_err_on_valid(&hidden, h, &r.valid());
        assert!(err <= VALUE_TOL, "{name}: hidden states max-abs error {err:e}");
    }
    // Positions derived from the mask must equal the ones transformers used.
    let derived = iro_worker::model::positions_from_valid(&r.valid());
    assert!(derived.masked_select(&r.valid()).equal(&r.t("position_ids").masked_select(&r.valid())));
}

fn check_greedy(name: &str) {
    let r = Reference::load(name);
    let lm = CausalLm::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
    let eos = r.json["eos_token_id"].as_i64().unwrap();
    let pad = r.json["pad_token_id"].as_i64().unwrap();
    let want: Vec<Vec<i64>> = Vec::try_from(r.t("greedy_ids")).unwrap();
    let prompts = r.prompts();
    let opts = GenerateOptions {
        max_new_tokens: want[0].len(),
        sampling: SamplingParams::GREEDY,
        eos_token_ids: vec![eos],
        pad_token_id: pad,
    };
    let out = generate(&lm, &prompts, &[0, 1, 2], &opts).unwrap();
    let mut stopped = 0;
    for (row, (got, want)) in out.iter().zip(&want).enumerate() {
        let mut padded = got.tokens.clone();
        padded.resize(want.len(), pad);
        assert_eq!(&padded, want, "{name}: greedy row {row}");
        assert_eq!(got.stopped_at_eos, got.tokens.last() == Some(&eos));
        stopped += got.stopped_at_eos as usize;
    }
    assert!(stopped >= 1 && stopped < out.len(), "{name}: the fixture must stop some rows early and not others");
}

#[test]
fn gpt_neox_parallel_residual_partial_rotary_logits_match_transformers() {
    check_causal_lm("neox_parallel");
}

#[test]
fn gpt_neox_sharded_checkpoint_loads_through_its_index() {
    check_causal_lm("neox_parallel_sharded");
}

#[test]
fn gpt_neox_sequential_full_rotary_logits_match_transformers() {
    check_causal_lm("neox_sequential");
}

#[test]
fn llama_gqa_tied_embeddings_logits_match_transformers() {
    check_causal_lm("llama_gqa_tied");
}

#[test]
fn llama_untied_llama3_rope_explicit_head_dim_logits_match_transformers() {
    check_causal_lm("llama_untied_scaled");
}

#[test]
fn greedy_continuations_are_token_identical_with_early_eos() {
    for name in ["neox_parallel", "neox_sequential", "llama_gqa_tied", "llama_untied_scaled"] {
        check_greedy(name);
    }
}

fn check_scalar(name: &str) {
    let r = Reference::load(name);
    let m = ScalarModel::load(&fixture(name), Kind::Float, Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let values = m.values(r.t("input_ids"), &r.valid(), r.t("position_ids"), None);
    let err = max_err_on_valid(&values, r.t("values"), &r.valid());
    assert!(err <= VALUE_TOL, "{name}: per-token values max-abs error {err:e}");
    let scores = m.score(r.t("input_ids"), &r.valid());
    let err = (scores - r.t("scores")).abs().max().double_value(&[]);
    assert!(err <= VALUE_TOL, "{name}: scores max-abs error {err:e}");
}

#[test]
fn gpt_neox_sequence_classification_head_matches_transformers() {
    check_scalar("neox_seqcls");
}

#[test]
fn llama_sequence_classification_head_matches_transformers() {
    check_scalar("llama_seqcls");
}

#[test]
fn tldr_scalar_reward_model_with_bias_matches_the_reference() {
    check_scalar("tldr_scalar_rm");
    // Right padding, as the TL;DR scripts feed it: the score is read at the last real token.
    let r = Reference::load("tldr_scalar_rm");
    let m = ScalarModel::load(&fixture("tldr_scalar_rm"), Kind::Float, Device::Cpu).unwrap();
    let _g = tch::no_grad_guard();
    let valid = r.t("right_attention_mask").to_kind(Kind::Bool);
    let scores = m.score(r.t("right_input_ids"), &valid);
    let err = (scores - r.t("right_scores")).abs().max().double_value(&[]);
    assert!(err <= VALUE_TOL, "right-padded scores max-abs error {err:e}");
}

#[test]
fn transformers_4_and_5_config_spellings_parse_alike() {
    for name in ["neox_parallel", "neox_sequential", "llama_gqa_tied", "llama_untied_scaled"] {
        let dir = fixture(name);
        let v5 = ModelConfig::load(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("config.legacy.json")).unwrap();
        let legacy = ModelConfig::from_json(serde_json::from_str(&text).unwrap(), &dir).unwrap();
        assert_eq!(v5.arch, legacy.arch, "{name}");
    }
}

#[test]
fn one_checkpoint_serves_a_policy_and_a_value_head_from_one_copy_of_the_weights() {
    let ck = Checkpoint::load(&fixture("llama_gqa_tied"), Kind::Float, Device::Cpu).unwrap();
    let a = CausalLm::from_checkpoint(&ck).unwrap();
    let b = CausalLm::from_checkpoint(&ck).unwrap();
    assert_eq!(a.backbone.embeddings().data_ptr(), b.backbone.embeddings().data_ptr());
}

/// A copy of a fixture folder whose config.json and weights a test may break.
fn broken_copy(name: &str, edit_config: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit_config(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> iro_worker::Error {
    CausalLm::load(dir, Kind::Float, Device::Cpu).err().expect("loading must fail")
}

#[test]
fn loading_errors_name_the_tensor_the_file_and_the_architecture() {
    // A config with one more layer than the weights: the missing tensor is named.
    let dir = broken_copy("llama_gqa_tied", |c| c["num_hidden_layers"] = 3.into());
    let err = load_err(dir.path());
    assert_eq!(err.kind(), "missing_tensor");
    assert!(err.to_string().contains("model.layers.2.") && err.to_string().contains("model.safetensors"), "{err}");
    // A wider MLP than the weights: the mis-shaped tensor and its file are named.
    let dir = broken_copy("neox_parallel", |c| c["intermediate_size"] = 100.into());
    let err = load_err(dir.path());
    assert_eq!(err.kind(), "tensor_shape");
    assert!(err.to_string().contains("dense_h_to_4h.weight") && err.to_string().contains("model.safetensors"), "{err}");
    // An architecture the engine does not implement.
    let dir = broken_copy("neox_parallel", |c| c["model_type"] = "mamba".into());
    let err = load_err(dir.path());
    assert_eq!(err.kind(), "unsupported_architecture");
    assert!(err.to_string().contains("mamba"), "{err}");
    // No weights at all.
    let dir = broken_copy("neox_parallel", |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_eq!(load_err(dir.path()).kind(), "checkpoint");
}
