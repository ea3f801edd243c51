//! The demo's reward: cosine similarity between a response and the reference answer under a sentence
//! encoder (all-MiniLM-L6-v2), in [-1, 1]. The prompt is not looked at.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{Reward, RewardInput, SentenceEncoder};
use crate::error::{Error, Result};

pub struct EmbeddingSimilarityReward {
    encoder: SentenceEncoder,
}

impl EmbeddingSimilarityReward {
    pub fn new(encoder: SentenceEncoder) -> Self {
        Self { encoder }
    }

    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Ok(Self::new(SentenceEncoder::load(dir, kind, device)?))
    }

    pub fn encoder(&self) -> &SentenceEncoder {
        &self.encoder
    }

    /// Cosine similarity of each (a, b) pair. Every distinct text is embedded once, so the many candidates
    /// of one prompt share their reference's embedding.
    pub fn similarities(&self, pairs: &[(&str, &str)]) -> Result<Vec<f64>> {
        let mut unique: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, i64> = HashMap::new();
        let mut slot = |text| {
            *index.entry(text).or_insert_with(|| {
                unique.push(text);
                unique.len() as i64 - 1
            })
        };
        let (left, right): (Vec<i64>, Vec<i64>) = pairs.iter().map(|&(a, b)| (slot(a), slot(b))).unzip();
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let emb = self.encoder.encode(&unique)?.to_kind(Kind::Double);
        let device = emb.device();
        let pick = |idx: &[i64]| emb.index_select(0, &Tensor::from_slice(idx).to_device(device));
        let (a, b) = (pick(&left), pick(&right));
        // Full cosine rather than a dot product, so an encoder without a Normalize module is still right.
        let dot = (&a * &b).sum_dim_intlist(-1, false, Kind::Double);
        let norms = a.norm_scalaropt_dim(2, [-1i64], false) * b.norm_scalaropt_dim(2, [-1i64], false);
        let cos = dot / norms.clamp_min(1e-12);
        Ok(Vec::try_from(cos.to_device(Device::Cpu))?)
    }
}

impl Reward for EmbeddingSimilarityReward {
    /// Similarity of each response to its reference; an item without a reference is an error.
    fn score(&self, items: &[RewardInput<'_>]) -> Result<Vec<f64>> {
        let pairs = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                let reference = it.reference.ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "{} reward: item {i} has no reference answer to compare the response with",
                        self.name()
                    ))
                })?;
                Ok((it.response, reference))
            })
            .collect::<Result<Vec<_>>>()?;
        self.similarities(&pairs)
    }

    fn name(&self) -> &'static str {
        "embedding_similarity"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reward() -> EmbeddingSimilarityReward {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert_tiny");
        EmbeddingSimilarityReward::load(&dir, Kind::Float, Device::Cpu).unwrap()
    }

    fn item<'a>(response: &'a str, reference: Option<&'a str>) -> RewardInput<'a> {
        RewardInput { prompt: "Summarise.", raw_prompt: "Summarise.", response, reference }
    }

    #[test]
    fn missing_reference_is_an_error_naming_the_item() {
        let r = reward();
        let items = [item("a", Some("b")), item("c", None)];
        let e = r.score(&items).unwrap_err();
        assert_eq!(e.kind(), "invalid_request");
        assert!(e.to_string().contains("item 1"), "{e}");
    }

    #[test]
    fn score_is_the_pairwise_similarity_and_shared_references_embed_once() {
        let r = reward();
        let (x, y, z) =
            ("A good summary keeps the main point.", "Tomatoes!", "The miller checked the ropes every morning.");
        let items = [item(x, Some(z)), item(y, Some(z)), item(z, Some(z)), item(x, Some(y))];
        let got = r.score(&items).unwrap();
        let one_by_one: Vec<f64> =
            items.iter().map(|it| r.similarities(&[(it.response, it.reference.unwrap())]).unwrap()[0]).collect();
        for (g, w) in got.iter().zip(&one_by_one) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {one_by_one:?}");
        }
        assert!((got[2] - 1.0).abs() < 1e-6);
        assert!(got.iter().all(|s| (-1.0..=1.0 + 1e-9).contains(s)));
        assert!(r.score(&[]).unwrap().is_empty());
    }
}
