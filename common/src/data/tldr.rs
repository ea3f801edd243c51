//! TL;DR records (`id, subreddit, title, post, summary`): JSON Lines, or the parquet the HF dataset exports.
//! Extra columns (the HF export carries tokenised copies) are ignored; `summary` may be absent for prompt-only files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::fields::{At, UniqueIds, jsonl_objects};
use super::{Example, Prompt};
use crate::error::{Error, Result};

const COLUMNS: [&str; 5] = ["id", "subreddit", "title", "post", "summary"];

/// Parquet when the file name ends in `.parquet`, JSON Lines otherwise.
pub fn load_tldr(path: &Path) -> Result<Vec<Example>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        load_tldr_parquet(path)
    } else {
        load_tldr_jsonl(path)
    }
}

pub fn load_tldr_jsonl(path: &Path) -> Result<Vec<Example>> {
    let mut ids = UniqueIds::default();
    let mut examples = Vec::new();
    for (line, obj) in jsonl_objects(path)? {
        let at = At { path, unit: "line", index: line };
        let id =
            at.optional_id(&obj, "id")?.ok_or_else(|| at.error(Some("id"), "required field is missing or null"))?;
        ids.check(at, &id)?;
        examples.push(Example {
            id,
            prompt: Prompt::Tldr {
                subreddit: at.required_str(&obj, "subreddit")?,
                title: at.required_str(&obj, "title")?,
                post: at.required_str(&obj, "post")?,
            },
            reference: at.optional_str(&obj, "summary")?,
        });
    }
    Ok(examples)
}

pub fn load_tldr_parquet(path: &Path) -> Result<Vec<Example>> {
    let read_err = |message: String| Error::DataRead { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| read_err(format!("not a readable parquet file: {e}")))?;

    // Decode only our columns: the HF export also carries large token-id columns.
    let schema = reader.metadata().file_metadata().schema();
    let wanted: Vec<Arc<Type>> = schema.get_fields().iter().filter(|f| COLUMNS.contains(&f.name())).cloned().collect();
    for required in ["id", "subreddit", "title", "post"] {
        if !wanted.iter().any(|f| f.name() == required) {
            return Err(Error::DataRow {
                path: path.to_path_buf(),
                unit: "row",
                index: 0,
                field: Some(required.to_owned()),
                message: "the parquet schema has no such column".into(),
            });
        }
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(wanted)
        .build()
        .map_err(|e| read_err(format!("cannot project columns: {e}")))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| read_err(format!("cannot read rows: {e}")))?;

    let mut ids = UniqueIds::default();
    let mut examples = Vec::new();
    for (i, row) in rows.enumerate() {
        let at = At { path, unit: "row", index: i + 1 };
        let row = row.map_err(|e| at.error(None, format!("cannot decode: {e}")))?;
        let fields: HashMap<&str, &Field> = row.get_column_iter().map(|(n, f)| (n.as_str(), f)).collect();
        let text = |name: &str| -> Result<Option<String>> {
            match fields.get(name) {
                None | Some(Field::Null) => Ok(None),
                Some(Field::Str(s)) => Ok(Some(s.clone())),
                Some(other) => Err(at.error(Some(name), format!("expected a string, found {other:?}"))),
            }
        };
        let required = |name: &str| text(name)?.ok_or_else(|| at.error(Some(name), "required field is null"));
        let id = match fields.get("id") {
            Some(Field::Str(s)) if !s.is_empty() => s.clone(),
            Some(Field::Int(n)) => n.to_string(),
            Some(Field::Long(n)) => n.to_string(),
            Some(Field::UInt(n)) => n.to_string(),
            Some(Field::ULong(n)) => n.to_string(),
            other => {
                return Err(at.error(Some("id"), format!("expected a non-empty string or an integer, found {other:?}")));
            }
        };
        ids.check(at, &id)?;
        examples.push(Example {
            id,
            prompt: Prompt::Tldr {
                subreddit: required("subreddit")?,
                title: required("title")?,
                post: required("post")?,
            },
            reference: text("summary")?,
        });
    }
    Ok(examples)
}
