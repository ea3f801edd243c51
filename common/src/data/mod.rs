//! Prompt data in the formats the paper uses: TL;DR records (JSON Lines or the HF dataset's parquet export),
//! AlpacaEval's JSON array, and plain JSON Lines prompt files; plus the seeded split that gives every
//! iteration a fresh, disjoint slice of prompts. A malformed row is an error naming the file, the row and the field.

mod alpaca;
mod fields;
mod plain;
mod split;
mod tldr;

use std::path::Path;

pub use alpaca::load_alpaca_eval;
pub use plain::load_prompts_jsonl;
pub use split::{SplitMix64, iteration_slice, shuffled_order};
pub use tldr::{load_tldr, load_tldr_jsonl, load_tldr_parquet};

use crate::config::DataFormat;
use crate::error::Result;

/// One prompt with its reference answer, if the data has one. The prompt keeps the source's own fields so that
/// the task's one prompt formatter (in the worker) decides how the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Unique within the file: the record's `id`, or its position (from 0) when the format has none.
    pub id: String,
    pub prompt: Prompt,
    /// The human TL;DR summary, AlpacaEval's GPT-4 output, or a plain file's `reference` field.
    pub reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A Reddit post of the TL;DR dataset.
    Tldr { subreddit: String, title: String, post: String },
    /// An AlpacaEval instruction; `dataset` is its subset (`helpful_base`, `koala`, ...).
    Instruction { instruction: String, dataset: Option<String> },
    /// A plain prompt, with the row's other fields kept as they were.
    Plain { prompt: String, extra: serde_json::Map<String, serde_json::Value> },
}

/// Loads `path` in the config's data format. TL;DR files ending in `.parquet` are read as parquet.
pub fn load(format: DataFormat, path: &Path) -> Result<Vec<Example>> {
    match format {
        DataFormat::Jsonl => load_prompts_jsonl(path),
        DataFormat::Tldr => load_tldr(path),
        DataFormat::AlpacaEval => load_alpaca_eval(path),
    }
}
