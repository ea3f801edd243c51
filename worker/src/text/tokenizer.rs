//! A checkpoint's `tokenizer.json`, through the `tokenizers` crate, plus the special ids generation needs.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer { path, message: "file not found".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer { path: path.clone(), message: e.to_string() })?;
        Ok(Self { inner, path })
    }

    /// Token ids of `text`. `add_special` adds what the tokenizer's post-processor adds (e.g. Llama-3's
    /// `<|begin_of_text|>`); chat-templated text already carries its special tokens, so it passes false.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| self.err(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn encode_batch(&self, texts: &[String], add_special: bool) -> Result<Vec<Vec<i64>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), add_special)
            .map_err(|e| self.err(format!("cannot encode: {e}")))?;
        Ok(encs.iter().map(|e| e.get_ids().iter().map(|&i| i as i64).collect()).collect())
    }

    /// Text of `ids`; special tokens (EOS, chat markers) are dropped when `skip_special`.
    pub fn decode(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special).map_err(|e| self.err(format!("cannot decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: String) -> Error {
        Error::Tokenizer { path: self.path.clone(), message }
    }
}
