//! Sentence embeddings the sentence-transformers way (all-MiniLM-L6-v2): BERT's last hidden states,
//! mean-pooled over the real tokens, L2-normalised. The recipe is read from the folder's
//! `modules.json` / `1_Pooling/config.json` / `sentence_bert_config.json` where present, and anything
//! other than mean pooling is refused rather than computed differently.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tokenizers::TruncationParams;

use crate::error::{Error, Result};
use crate::model::bert::Bert;

/// Token ids right-padded to the batch's longest row: `ids` [B, T] int64, `valid` [B, T] bool.
pub struct TokenBatch {
    pub ids: Tensor,
    pub valid: Tensor,
}

pub struct SentenceEncoder {
    bert: Bert,
    /// Our own copy with padding off (the shipped tokenizer.json pads every text to a fixed 128) and
    /// truncation at `max_len`; rows are padded per batch instead.
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    recipe: Recipe,
    pad_id: i64,
    batch_size: usize,
}

impl SentenceEncoder {
    pub const DEFAULT_BATCH_SIZE: usize = 32;

    /// Loads a sentence-transformers folder (config.json, model.safetensors, tokenizer.json and the
    /// optional sentence-transformers files) with floating weights cast to `kind` on `device`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let bert = Bert::load(dir, kind, device)?;
        let recipe = Recipe::load(dir, bert.config.max_position_embeddings as usize)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tok_err = |message: String| Error::Tokenizer { path: tokenizer_path.clone(), message };
        if !tokenizer_path.exists() {
            return Err(tok_err("file not found".into()));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| tok_err(e.to_string()))?;
        // The pad id only has to be a valid embedding row: padded positions are masked everywhere.
        let pad_id = tokenizer
            .get_padding()
            .map(|p| i64::from(p.pad_id))
            .or_else(|| tokenizer.token_to_id("[PAD]").map(i64::from))
            .or(bert.config.pad_token_id)
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: recipe.max_len, ..Default::default() }))
            .map_err(|e| tok_err(format!("cannot truncate to {} tokens: {e}", recipe.max_len)))?;
        Ok(Self { bert, tokenizer, tokenizer_path, recipe, pad_id, batch_size: Self::DEFAULT_BATCH_SIZE })
    }

    /// Texts per forward pass in `encode` (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Longest input in word pieces, [CLS] and [SEP] included; longer texts are cut at the end.
    pub fn max_len(&self) -> usize {
        self.recipe.max_len
    }

    /// Embedding width.
    pub fn dim(&self) -> i64 {
        self.bert.config.hidden_size
    }

    /// Whether embeddings are L2-normalised (a `Normalize` module, or no modules.json at all).
    pub fn normalizes(&self) -> bool {
        self.recipe.normalize
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// Word-piece ids of each text with [CLS] / [SEP], truncated to `max_len`, unpadded.
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<i64>>> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenizer {
            path: self.tokenizer_path.clone(),
            message: format!("cannot encode: {e}"),
        })?;
        Ok(encodings.iter().map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect()).collect())
    }

    /// Right-pads `rows` to the longest one, on the model's device.
    pub fn pad(&self, rows: &[Vec<i64>]) -> TokenBatch {
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut valid = Vec::with_capacity(rows.len() * width);
        for row in rows {
            ids.extend(row.iter().copied().chain(std::iter::repeat_n(self.pad_id, width - row.len())));
            valid.extend((0..width).map(|i| i < row.len()));
        }
        let shape = [rows.len() as i64, width as i64];
        let device = self.bert.device();
        TokenBatch {
            ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            valid: Tensor::from_slice(&valid).view(shape).to_device(device),
        }
    }

    /// Sentence embeddings [B, H] (f32) of one padded batch.
    pub fn embed(&self, batch: &TokenBatch) -> Result<Tensor> {
        let hidden = tch::no_grad(|| self.bert.forward(&batch.ids, &batch.valid, None))?;
        let pooled = mean_pool(&hidden, &batch.valid);
        Ok(if self.recipe.normalize { l2_normalize(&pooled) } else { pooled })
    }

    /// Sentence embeddings [N, H] (f32, on the model's device) of `texts`, in their order. Texts are
    /// batched by similar length so little compute goes to padding.
    pub fn encode(&self, texts: &[&str]) -> Result<Tensor> {
        let device = self.bert.device();
        let ids = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut parts = Vec::new();
        for chunk in order.chunks(self.batch_size) {
            let rows: Vec<Vec<i64>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            parts.push(self.embed(&self.pad(&rows))?);
        }
        let out = Tensor::zeros([texts.len() as i64, self.dim()], (Kind::Float, device));
        if parts.is_empty() {
            return Ok(out);
        }
        let order: Vec<i64> = order.iter().map(|&i| i as i64).collect();
        Ok(out.index_copy(0, &Tensor::from_slice(&order).to_device(device), &Tensor::cat(&parts, 0)))
    }
}

/// Mean of `hidden` [B, T, H] over the positions where `valid` [B, T] is true, in f32 →[B, H]
/// (sentence-transformers: `sum(h · mask) / clamp(sum(mask), 1e-9)`).
pub fn mean_pool(hidden: &Tensor, valid: &Tensor) -> Tensor {
    let mask = valid.to_kind(Kind::Float).unsqueeze(-1);
    let sum = (hidden.to_kind(Kind::Float) * &mask).sum_dim_intlist(1, false, Kind::Float);
    sum / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9)
}

/// Rows of `x` [N, H] scaled to unit L2 norm (`F.normalize`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1i64], true).clamp_min(1e-12)
}

/// What the sentence-transformers files say about how to turn hidden states into an embedding.
#[derive(Debug, Clone, PartialEq)]
struct Recipe {
    max_len: usize,
    normalize: bool,
}

impl Recipe {
    /// Without `modules.json` the folder is taken to be all-MiniLM-L6-v2's recipe (mean, normalise).
    fn load(dir: &Path, max_positions: usize) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let (pooling_dir, normalize) = if modules_path.exists() {
            let modules = read_json(&modules_path)?;
            let bad = |message: String| Error::Checkpoint { path: modules_path.clone(), message };
            let list = modules.as_array().ok_or_else(|| bad("expected a list of modules".into()))?;
            let (mut pooling, mut normalize) = (None, false);
            for m in list {
                let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
                match kind.rsplit('.').next().unwrap_or("") {
                    "Transformer" => {}
                    "Pooling" => pooling = Some(dir.join(m.get("path").and_then(Value::as_str).unwrap_or(""))),
                    "Normalize" => normalize = true,
                    _ => {
                        return Err(bad(format!(
                            "module `{kind}` is not supported (only Transformer, Pooling, Normalize)"
                        )));
                    }
                }
            }
            (pooling.ok_or_else(|| bad("no Pooling module".into()))?, normalize)
        } else {
            (dir.join("1_Pooling"), true)
        };
        let pooling_path = pooling_dir.join("config.json");
        if pooling_path.exists() {
            let pooling = read_json(&pooling_path)?;
            let modes = pooling
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| k.starts_with("pooling_mode_") && v == &&Value::Bool(true));
            let modes: Vec<&str> = modes.map(|(k, _)| k.as_str()).collect();
            if modes != ["pooling_mode_mean_tokens"] {
                return Err(Error::Checkpoint {
                    path: pooling_path,
                    message: format!("only mean pooling is supported, the config enables {modes:?}"),
                });
            }
        }
        let st_path = dir.join("sentence_bert_config.json");
        let max_len = if st_path.exists() {
            read_json(&st_path)?.get("max_seq_length").and_then(Value::as_u64).map(|n| n as usize)
        } else {
            None
        };
        Ok(Self { max_len: max_len.unwrap_or(max_positions).min(max_positions), normalize })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint { path: path.to_owned(), message: format!("malformed JSON: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert_tiny")
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    const MODULES: &str = r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
        {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
        {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#;

    #[test]
    fn recipe_of_a_minilm_folder_is_mean_normalised_with_its_max_seq_length() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "modules.json", MODULES);
        write(
            dir.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_cls_token":false,"pooling_mode_mean_tokens":true}"#,
        );
        write(dir.path(), "sentence_bert_config.json", r#"{"max_seq_length":256,"do_lower_case":false}"#);
        assert_eq!(Recipe::load(dir.path(), 512).unwrap(), Recipe { max_len: 256, normalize: true });
        // Never beyond the position table.
        assert_eq!(Recipe::load(dir.path(), 128).unwrap().max_len, 128);
    }

    #[test]
    fn recipe_without_sentence_transformers_files_defaults_to_minilm() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Recipe::load(dir.path(), 128).unwrap(), Recipe { max_len: 128, normalize: true });
    }

    #[test]
    fn recipe_refuses_other_pooling_and_extra_modules() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "modules.json", MODULES);
        write(
            dir.path(),
            "1_Pooling/config.json",
            r#"{"pooling_mode_cls_token":true,"pooling_mode_mean_tokens":false}"#,
        );
        let e = Recipe::load(dir.path(), 512).unwrap_err().to_string();
        assert!(e.contains("pooling_mode_cls_token") && e.contains("1_Pooling"), "{e}");

        let dense = MODULES.replace(
            "2_Normalize\",\"type\":\"sentence_transformers.models.Normalize",
            "2_Dense\",\"type\":\"sentence_transformers.models.Dense",
        );
        write(dir.path(), "modules.json", &dense);
        let e = Recipe::load(dir.path(), 512).unwrap_err().to_string();
        assert!(e.contains("models.Dense") && e.contains("modules.json"), "{e}");
    }

    #[test]
    fn long_inputs_are_cut_to_max_len_and_keep_sep() {
        let enc = SentenceEncoder::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap();
        assert_eq!(enc.max_len(), 128);
        let long = "the miller checked the ropes every morning. ".repeat(40);
        let ids = enc.token_ids(&[long.as_str(), "Tomatoes!"]).unwrap();
        assert_eq!(ids[0].len(), 128);
        assert_eq!((ids[0][0], ids[0][127]), (2, 3)); // [CLS] ... [SEP]
        assert_eq!(ids[1].len(), 7); // no fixed padding to 128
        let e = enc.encode(&[long.as_str()]).unwrap();
        assert_eq!(e.size(), [1, 32]);
    }

    #[test]
    fn batching_and_length_sorting_do_not_change_embeddings() {
        let texts =
            ["A good summary keeps the main point.", "Tomatoes!", "", "The miller checked the ropes every morning."];
        let one = SentenceEncoder::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap().with_batch_size(1);
        let all = SentenceEncoder::load(&bert_tiny(), Kind::Float, Device::Cpu).unwrap().with_batch_size(3);
        let (a, b) = (one.encode(&texts).unwrap(), all.encode(&texts).unwrap());
        let err = (a - &b).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{err:e}");
        let norms = b.norm_scalaropt_dim(2, [-1i64], false);
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-6);
        assert_eq!(all.encode(&[]).unwrap().size(), [0, 32]);
    }
}
