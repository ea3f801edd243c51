//! JSON Lines rows as ordered maps, read with file:line errors and written atomically.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub type Row = Map<String, Value>;

/// The rows of one file, each with the line it came from (blank lines are skipped).
pub struct Rows {
    pub path: PathBuf,
    pub rows: Vec<Row>,
    lines: Vec<usize>,
}

impl Rows {
    /// Reads every non-blank line as a JSON object.
    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(Error::io(path))?;
        let (mut rows, mut lines) = (Vec::new(), Vec::new());
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(Error::io(path))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: Value =
                serde_json::from_str(&line).map_err(|e| data_err(path, i + 1, format!("malformed JSON: {e}")))?;
            match value {
                Value::Object(m) => rows.push(m),
                _ => return Err(data_err(path, i + 1, "a row must be a JSON object".into())),
            }
            lines.push(i + 1);
        }
        Ok(Self { path: path.to_owned(), rows, lines })
    }

    /// The string field `field` of row `i`; an absent or non-string field is an error naming file and line.
    pub fn str_field(&self, i: usize, field: &str) -> Result<&str> {
        match self.rows[i].get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => {
                Err(data_err(&self.path, self.lines[i], format!("field `{field}` must be a string, got {other}")))
            }
            None => Err(data_err(&self.path, self.lines[i], format!("missing field `{field}`"))),
        }
    }

    /// An error about row `i`, naming file and line.
    pub fn row_error(&self, i: usize, message: String) -> Error {
        data_err(&self.path, self.lines[i], message)
    }
}

/// Writes rows to `path` through a temporary sibling and a rename.
pub fn write_rows_atomic(path: &Path, rows: &[Row]) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.partial", path.display()));
    {
        let file = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
        let mut w = BufWriter::new(file);
        for row in rows {
            serde_json::to_writer(&mut w, row).map_err(|e| Error::Io { path: tmp.clone(), source: e.into() })?;
            w.write_all(b"\n").map_err(Error::io(&tmp))?;
        }
        w.into_inner()
            .map_err(|e| Error::Io { path: tmp.clone(), source: e.into_error() })?
            .sync_all()
            .map_err(Error::io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

fn data_err(path: &Path, line: usize, message: String) -> Error {
    Error::Data { path: path.to_owned(), line, message }
}
