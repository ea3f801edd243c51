//! Plain JSON Lines prompt files: a required `prompt` string, an optional `id` (string or integer; the row's
//! position from 0 otherwise) and `reference`; every other field is kept in `extra`.

use std::path::Path;

use super::fields::{At, UniqueIds, jsonl_objects};
use super::{Example, Prompt};
use crate::error::Result;

pub fn load_prompts_jsonl(path: &Path) -> Result<Vec<Example>> {
    let mut ids = UniqueIds::default();
    let mut examples = Vec::new();
    for (line, mut obj) in jsonl_objects(path)? {
        let at = At { path, unit: "line", index: line };
        let prompt = at.required_str(&obj, "prompt")?;
        let id = at.optional_id(&obj, "id")?.unwrap_or_else(|| examples.len().to_string());
        ids.check(at, &id)?;
        let reference = at.optional_str(&obj, "reference")?;
        for known in ["prompt", "id", "reference"] {
            obj.remove(known);
        }
        examples.push(Example { id, prompt: Prompt::Plain { prompt, extra: obj }, reference });
    }
    Ok(examples)
}
