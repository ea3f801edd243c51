//! AlpacaEval's JSON: an array of `{instruction, output, generator, dataset}`, where `output` is the
//! reference answer (GPT-4's, in `alpaca_eval_gpt4_baseline.json`). Rows have no id: the id is the position.

use std::path::Path;

use serde_json::Value;

use super::fields::{At, read_file, type_name};
use super::{Example, Prompt};
use crate::error::Result;

pub fn load_alpaca_eval(path: &Path) -> Result<Vec<Example>> {
    let bytes = read_file(path)?;
    let items = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Array(items)) => items,
        Ok(other) => {
            let at = At { path, unit: "item", index: 0 };
            return Err(at.error(None, format!("expected a JSON array of objects, found {}", type_name(&other))));
        }
        Err(e) => {
            let at = At { path, unit: "line", index: e.line() };
            return Err(at.error(None, format!("malformed JSON: {e}")));
        }
    };
    let mut examples = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = At { path, unit: "item", index: i + 1 };
        let Value::Object(obj) = item else {
            return Err(at.error(None, format!("expected a JSON object, found {}", type_name(&item))));
        };
        examples.push(Example {
            id: i.to_string(),
            prompt: Prompt::Instruction {
                instruction: at.required_str(&obj, "instruction")?,
                dataset: at.optional_str(&obj, "dataset")?,
            },
            reference: at.optional_str(&obj, "output")?,
        });
    }
    Ok(examples)
}
