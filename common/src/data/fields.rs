//! Field access with error context shared by the loaders: every failure names file, row and field.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Where a row sits in its file, for error messages: `unit` is "line", "row" or "item", `index` counts from 1.
#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub path: &'a Path,
    pub unit: &'static str,
    pub index: usize,
}

impl At<'_> {
    pub fn error(&self, field: Option<&str>, message: impl Into<String>) -> Error {
        Error::DataRow {
            path: self.path.to_path_buf(),
            unit: self.unit,
            index: self.index,
            field: field.map(str::to_owned),
            message: message.into(),
        }
    }

    pub fn required_str(&self, obj: &Map<String, Value>, field: &str) -> Result<String> {
        self.optional_str(obj, field)?.ok_or_else(|| self.error(Some(field), "required field is missing or null"))
    }

    /// A string field that may be absent or null.
    pub fn optional_str(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(Some(field), format!("expected a string, found {}", type_name(other)))),
        }
    }

    /// An id may be written as a string or an integer; both become a string.
    pub fn optional_id(&self, obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
            Some(other) => Err(self
                .error(Some(field), format!("expected a non-empty string or an integer, found {}", type_name(other)))),
        }
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses a second row with the same id: downstream, every prompt must appear exactly once.
#[derive(Default)]
pub(super) struct UniqueIds {
    first_seen: HashMap<String, usize>,
}

impl UniqueIds {
    pub fn check(&mut self, at: At<'_>, id: &str) -> Result<()> {
        if let Some(first) = self.first_seen.get(id) {
            return Err(at.error(Some("id"), format!("duplicate id `{id}` (first at {} {first})", at.unit)));
        }
        self.first_seen.insert(id.to_owned(), at.index);
        Ok(())
    }
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::DataRead { path: path.to_path_buf(), message: e.to_string() })
}

/// The JSON objects of a JSON Lines file with their 1-based line numbers; blank lines are skipped.
pub(super) fn jsonl_objects(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let bytes = read_file(path)?;
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = At { path, unit: "line", index: i + 1 };
        let line = std::str::from_utf8(line).map_err(|e| at.error(None, format!("not UTF-8: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(obj)) => rows.push((i + 1, obj)),
            Ok(other) => return Err(at.error(None, format!("expected a JSON object, found {}", type_name(&other)))),
            Err(e) => return Err(at.error(None, format!("malformed JSON: {e}"))),
        }
    }
    Ok(rows)
}
