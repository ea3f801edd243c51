//! Value-training checkpoints on a remote store. With a local-folder store the trainer writes its checkpoints
//! inside the store already; with S3 it writes them to the work dir, and rank 0 copies each finished checkpoint
//! to `iter-{t}/value/train/checkpoint-*/` so that a gang restarted on other machines resumes from it: before
//! training, every rank fetches the newest complete one it does not have.

use std::path::Path;

use super::Pipeline;
use crate::error::{Error, Result};

/// Written last: a checkpoint folder in the store is complete when it has this file.
const MARKER: &str = "train_state.json";

impl Pipeline {
    fn remote_train_prefix(&self, t: u32) -> Option<String> {
        let key = format!("{}/train", self.layout.value_dir(t));
        self.store.local_path(&key).is_none().then_some(key)
    }

    /// Uploads a checkpoint folder the trainer just finished (remote stores only).
    pub(super) fn upload_checkpoint(&self, t: u32, dir: &Path) -> Result<()> {
        let (Some(prefix), Some(name)) = (self.remote_train_prefix(t), dir.file_name()) else { return Ok(()) };
        let name = name.to_string_lossy();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(Error::io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        // The marker goes last, so a reader never sees a checkpoint with missing files.
        files.sort_by_key(|p| p.file_name().is_some_and(|n| n == MARKER));
        for path in files {
            let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
            let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.block_on(self.store.put(&format!("{prefix}/{name}/{file}"), bytes))?;
        }
        tracing::info!(checkpoint = %name, store = %self.store.describe(&prefix), "checkpoint uploaded");
        Ok(())
    }

    /// Fetches the newest complete checkpoint of V_t's training from a remote store into `out_dir`, unless
    /// `out_dir` has it already.
    pub(super) fn download_latest_checkpoint(&self, t: u32, out_dir: &Path) -> Result<()> {
        let Some(prefix) = self.remote_train_prefix(t) else { return Ok(()) };
        let keys = self.block_on(self.store.list(&prefix))?;
        let newest = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}/"))?.strip_suffix(&format!("/{MARKER}")))
            .filter(|name| name.starts_with("checkpoint-"))
            .max()
            .map(str::to_owned);
        let Some(name) = newest else { return Ok(()) };
        let local = out_dir.join(&name);
        if local.join(MARKER).exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&local).map_err(Error::io(&local))?;
        let wanted = format!("{prefix}/{name}/");
        for key in keys.iter().filter(|k| k.starts_with(&wanted)) {
            let file = &key[wanted.len()..];
            let bytes = self.block_on(self.store.get(key))?;
            let path = local.join(file);
            std::fs::write(&path, &bytes).map_err(Error::io(&path))?;
        }
        tracing::info!(checkpoint = %name, "resuming from a checkpoint fetched from the store");
        Ok(())
    }
}
