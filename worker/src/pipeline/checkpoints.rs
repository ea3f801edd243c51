//! Value-training checkpoints across attempts of V_t's train task. Each attempt trains in its own folder
//! (`iter-{t}/value/attempt-{a}/train/`): inside a local-folder store, or in the work dir with rank 0 copying
//! each finished checkpoint to the remote store, so that a gang restarted on other machines resumes from it.
//! Before training, an attempt takes the newest complete checkpoint of any earlier attempt into its own
//! folder. It only reads those: an earlier attempt may still be running (partitioned, its lease gone), and
//! whatever it writes stays in its own folder. Its complete checkpoints are safe to resume from, since
//! training is deterministic given the accepted rollouts, the seed and the step.

use std::path::{Path, PathBuf};

use super::Pipeline;
use crate::error::{Error, Result};
use crate::train::checkpoint;

/// Written last: a checkpoint folder in the store is complete when it has this file.
const MARKER: &str = "train_state.json";
const PREFIX: &str = "checkpoint-";

/// Where an earlier attempt's newest complete checkpoint is.
enum Found {
    /// A folder on this machine (a local store).
    Local(PathBuf),
    /// A key prefix in a remote store, with the keys of its files.
    Remote { name: String, keys: Vec<String> },
}

/// A name that stays inside the folder it is joined to: not empty, `.` or `..`, no separator.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

impl Pipeline {
    fn remote_train_prefix(&self, t: u32, attempt: u32) -> Option<String> {
        let key = self.layout.value_checkpoints(t, attempt);
        self.store.local_path(&key).is_none().then_some(key)
    }

    /// Uploads a checkpoint folder attempt `attempt` just finished (remote stores only): all of it, or with
    /// `only` just that file (a sharded gang's rank r > 0 uploads its own shard; rank 0 the rest).
    pub(super) fn upload_checkpoint(&self, t: u32, attempt: u32, dir: &Path, only: Option<&str>) -> Result<()> {
        let (Some(prefix), Some(name)) = (self.remote_train_prefix(t, attempt), dir.file_name()) else {
            return Ok(());
        };
        let name = name.to_string_lossy();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(Error::io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| only.is_none_or(|o| p.file_name().is_some_and(|n| n == o)))
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

    /// Makes `out_dir` (attempt `attempt`'s training folder) hold the newest complete checkpoint of this or any
    /// earlier attempt of V_t, so the trainer resumes from it. Does nothing when none has one. The ranks of a
    /// gang on a local store share `out_dir`: each fills its own hidden folder and the first rename wins.
    pub(super) fn resume_checkpoint(&self, t: u32, attempt: u32, rank: u32, out_dir: &Path) -> Result<()> {
        let own = checkpoint::latest(out_dir).and_then(|p| step_of(&p.file_name()?.to_string_lossy()));
        let mut best: Option<(usize, u32, Found)> = None;
        for earlier in 1..attempt {
            if let Some((step, found)) = self.newest_checkpoint(t, earlier)?
                && best.as_ref().is_none_or(|(s, _, _)| step > *s)
            {
                best = Some((step, earlier, found));
            }
        }
        let Some((step, from, found)) = best else { return Ok(()) };
        if own.is_some_and(|s| s >= step) {
            return Ok(());
        }
        // The copy keeps the trainer's own folder name (zero-padded), which `checkpoint::latest` orders by.
        let name = match &found {
            Found::Local(dir) => dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            Found::Remote { name, .. } => name.clone(),
        };
        let local = out_dir.join(&name);
        // Filled under a hidden name and renamed: `checkpoint::latest` never sees half a copy.
        let part = out_dir.join(format!(".{name}.rank-{rank}.part"));
        if part.exists() {
            std::fs::remove_dir_all(&part).map_err(Error::io(&part))?;
        }
        std::fs::create_dir_all(&part).map_err(Error::io(&part))?;
        match found {
            Found::Local(dir) => {
                for entry in std::fs::read_dir(&dir).map_err(Error::io(&dir))? {
                    let src = entry.map_err(Error::io(&dir))?.path();
                    let Some(file) = src.file_name() else { continue };
                    let dst = part.join(file);
                    // A hard link costs nothing for a 7B model's optimizer state; another filesystem gets a copy.
                    if std::fs::hard_link(&src, &dst).is_err() {
                        std::fs::copy(&src, &dst).map_err(Error::io(&dst))?;
                    }
                }
            }
            Found::Remote { keys, .. } => {
                for key in keys {
                    let file = key.rsplit('/').next().unwrap_or_default();
                    // A bucket key is not trusted to name a file inside the work dir (review A14).
                    if !is_plain_file_name(file) {
                        return Err(Error::InvalidRequest(format!(
                            "checkpoint object `{key}` in the store does not end in a plain file name"
                        )));
                    }
                    let bytes = self.block_on(self.store.get(&key))?;
                    let path = part.join(file);
                    std::fs::write(&path, &bytes).map_err(Error::io(&path))?;
                }
                tracing::debug!(checkpoint = %name, "fetched from the store");
            }
        }
        if let Err(e) = std::fs::rename(&part, &local) {
            if !local.join(MARKER).exists() {
                return Err(Error::io(&local)(e));
            }
            // Another rank brought the same checkpoint in first.
            std::fs::remove_dir_all(&part).map_err(Error::io(&part))?;
            return Ok(());
        }
        tracing::info!(t, attempt, from_attempt = from, step, "resuming from an earlier attempt's checkpoint");
        Ok(())
    }

    /// The newest complete checkpoint attempt `attempt` of V_t left, and its step.
    fn newest_checkpoint(&self, t: u32, attempt: u32) -> Result<Option<(usize, Found)>> {
        let key = self.layout.value_checkpoints(t, attempt);
        if let Some(dir) = self.store.local_path(&key) {
            return Ok(checkpoint::latest(&dir)
                .and_then(|p| Some((step_of(&p.file_name()?.to_string_lossy())?, Found::Local(p)))));
        }
        let keys = self.block_on(self.store.list(&key))?;
        // Steps compare as numbers: `checkpoint-10` is newer than `checkpoint-9`.
        let newest = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&format!("{key}/"))?.strip_suffix(&format!("/{MARKER}")))
            .filter_map(|name| Some((step_of(name)?, name.to_owned())))
            .filter(|(_, name)| shards_complete(&keys, &format!("{key}/{name}/")))
            .max_by_key(|(step, _)| *step);
        Ok(newest.map(|(step, name)| {
            let wanted = format!("{key}/{name}/");
            let files = keys.iter().filter(|k| k.starts_with(&wanted)).cloned().collect();
            (step, Found::Remote { name, keys: files })
        }))
    }
}

/// Whether the checkpoint folder under `folder` (a key prefix ending in `/`) has every shard file it names: the
/// ranks of a sharded gang upload their shards themselves, so rank 0's marker can land before another rank's
/// shard. An unsharded folder (no shard files) is complete.
fn shards_complete(keys: &[String], folder: &str) -> bool {
    let shards: Vec<(usize, usize)> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(folder))
        .filter_map(|f| f.strip_prefix("shard-")?.strip_suffix(".safetensors"))
        .filter_map(|f| {
            let (rank, world) = f.split_once("-of-")?;
            Some((rank.parse().ok()?, world.parse().ok()?))
        })
        .collect();
    let Some(&(_, world)) = shards.first() else { return true };
    (0..world).all(|r| shards.contains(&(r, world)))
}

#[cfg(test)]
mod tests {
    use super::{is_plain_file_name, shards_complete};

    #[test]
    fn a_sharded_checkpoint_is_complete_only_with_every_ranks_shard() {
        let keys = |files: &[&str]| files.iter().map(|f| format!("p/checkpoint-00000004/{f}")).collect::<Vec<_>>();
        let folder = "p/checkpoint-00000004/";
        assert!(shards_complete(&keys(&["model.safetensors", "train_state.json"]), folder));
        let two = ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors", "train_state.json"];
        assert!(shards_complete(&keys(&two), folder));
        assert!(!shards_complete(&keys(&two[..1]), folder));
        assert!(!shards_complete(&keys(&["shard-00001-of-00002.safetensors"]), folder));
    }

    #[test]
    fn checkpoint_file_names_from_the_store_cannot_escape_the_work_dir() {
        assert!(is_plain_file_name("model.safetensors") && is_plain_file_name("train_state.json"));
        for bad in ["", ".", "..", "a/b", "a\\b"] {
            assert!(!is_plain_file_name(bad), "{bad:?}");
        }
    }
}
