//! `iro score`: a reward-model head's score for each `prompt` + `output` row.

use std::path::PathBuf;

use serde_json::json;

use super::jsonl::{Rows, write_rows_atomic};
use super::{Placement, Progress};
use crate::error::{Error, Result};
use crate::generate::left_pad;
use crate::model::ScalarModel;
use crate::text::Tokenizer;

#[derive(Debug, Clone)]
pub struct ScoreJob {
    pub model: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub placement: Placement,
    pub batch_size: usize,
}

pub fn run(job: &ScoreJob, progress: Progress) -> Result<usize> {
    if job.batch_size == 0 {
        return Err(Error::InvalidRequest("batch size must be at least 1".into()));
    }
    let (device, kind) = job.placement.resolve()?;
    let model = ScalarModel::load(&job.model, kind, device)?;
    let tokenizer = Tokenizer::load(&job.model)?;
    let mut rows = Rows::read(&job.input)?;
    let texts: Vec<Vec<i64>> = (0..rows.rows.len())
        .map(|i| {
            let text = format!("{}{}", rows.str_field(i, "prompt")?, rows.str_field(i, "output")?);
            tokenizer.encode(&text, true)
        })
        .collect::<Result<_>>()?;
    let pad = model.config.pad_token_id.unwrap_or(0);
    let _guard = tch::no_grad_guard();
    let total = texts.len();
    progress(0, total);
    for start in (0..total).step_by(job.batch_size) {
        let end = (start + job.batch_size).min(total);
        let batch = &texts[start..end];
        let width = batch.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let (ids, valid) = left_pad(batch, width, pad, device);
        let scores: Vec<f64> =
            Vec::try_from(model.score(&ids, &valid).to_kind(tch::Kind::Double).to_device(tch::Device::Cpu))?;
        for (i, s) in (start..end).zip(scores) {
            rows.rows[i].insert("score".into(), json!(s));
        }
        progress(end, total);
    }
    write_rows_atomic(&job.output, &rows.rows)?;
    Ok(total)
}
