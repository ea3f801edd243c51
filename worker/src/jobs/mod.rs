//! File-to-file jobs behind the CLI (`iro generate`, `iro score`, `iro guide`): JSON Lines in, the same rows with
//! new fields out. Output is written to a temporary file and renamed, so a killed job leaves no half file.

pub mod bench;
pub mod dpo;
pub mod generate;
pub mod guide;
pub mod jsonl;
pub mod score;

/// Where a model runs and in which precision, from the CLI's `--device` / `--dtype` strings.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: String,
    pub dtype: String,
}

impl Placement {
    pub fn resolve(&self) -> crate::Result<(tch::Device, tch::Kind)> {
        let device = crate::device::parse_device(&self.device)?;
        Ok((device, crate::device::parse_dtype(&self.dtype, device)?))
    }
}

/// Progress callback: (rows done, rows total).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize);
