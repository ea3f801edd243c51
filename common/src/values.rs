//! How a trained value function V_t is published and found, fenced by attempt the way rollout shards are.
//!
//! Attempt `a` of V_t's train task writes its HF folder under `iter-{t}/value/attempt-{a}/model/`, then, last,
//! `files.json` there: every file's name, size and sha256. It reports `files.json`'s key and sha256 as its
//! output. Whoever accepts the attempt (the coordinator, or the single-process driver) writes
//! `iter-{t}/value/manifest.json` naming that attempt and that sha256. A loader reads V_t only through the
//! manifest and checks every file, so a late attempt (a partitioned gang that finishes after its lease was
//! taken away) can neither overwrite the accepted model nor be mistaken for it, and a folder mixed from two
//! attempts or cut short by a crash is refused instead of loaded.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::RunLayout;
use crate::records::{in_store, is_sha256_hex};
use crate::store::{Store, sha256_hex};

/// Bump when the value manifest's meaning changes; readers refuse versions they do not know.
pub const VALUE_MANIFEST_VERSION: u32 = 1;

/// The files of one published V_t folder (`files.json`), in the order they were written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueFiles {
    pub files: Vec<ValueFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueFile {
    /// A plain file name inside the folder (no `/`).
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Which attempt of V_t's train task was accepted (`RunLayout::value_manifest(t)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueManifest {
    pub version: u32,
    pub run_id: String,
    pub iteration: u32,
    pub attempt: u32,
    /// `RunLayout::value_files(iteration, attempt)`.
    pub key: String,
    /// Of the `files.json` object at `key`.
    pub sha256: String,
}

impl ValueManifest {
    /// The manifest accepting `attempt`, whose `files.json` hashes to `sha256`.
    pub fn new(layout: &RunLayout, run_id: &str, iteration: u32, attempt: u32, sha256: &str) -> Self {
        Self {
            version: VALUE_MANIFEST_VERSION,
            run_id: run_id.to_owned(),
            iteration,
            attempt,
            key: layout.value_files(iteration, attempt),
            sha256: sha256.to_owned(),
        }
    }

    /// The accepted attempt's model folder (a key prefix).
    pub fn model_key(&self) -> String {
        self.key.strip_suffix("/files.json").unwrap_or(&self.key).to_owned()
    }

    /// Known version, the key the layout derives for this iteration and attempt, a well-formed sha256.
    pub fn validate(&self, layout: &RunLayout) -> Result<()> {
        let location = format!("`{}`", layout.value_manifest(self.iteration));
        let invalid = |message: String| Err(Error::ManifestInvalid { location: location.clone(), message });
        if self.version != VALUE_MANIFEST_VERSION {
            return invalid(format!("version {} (this build reads {VALUE_MANIFEST_VERSION})", self.version));
        }
        let want = layout.value_files(self.iteration, self.attempt);
        if self.key != want {
            return invalid(format!("attempt {} has key `{}`, expected `{want}`", self.attempt, self.key));
        }
        if !is_sha256_hex(&self.sha256) {
            return invalid(format!("`{}` is not a lower-case hex sha256", self.sha256));
        }
        Ok(())
    }
}

/// Writes `files` (name, bytes) into attempt `attempt`'s V_t folder, then `files.json` listing them. Returns
/// `files.json`'s key and sha256: what the train task reports and the manifest will name.
pub async fn write_value_folder(
    store: &Store,
    layout: &RunLayout,
    iteration: u32,
    attempt: u32,
    files: Vec<(String, Vec<u8>)>,
) -> Result<(String, String)> {
    let folder = layout.value_model(iteration, attempt);
    let mut listed = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        if name.is_empty() || name.contains('/') || name == "files.json" {
            return Err(Error::Encode {
                what: format!("V_{iteration}'s folder"),
                message: format!("bad file name `{name}`"),
            });
        }
        listed.push(ValueFile { name: name.clone(), bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) });
        store.put(&format!("{folder}/{name}"), bytes).await?;
    }
    let list = serde_json::to_vec_pretty(&ValueFiles { files: listed })
        .map_err(|e| Error::Encode { what: "files.json".into(), message: e.to_string() })?;
    let sha = sha256_hex(&list);
    let key = layout.value_files(iteration, attempt);
    store.put(&key, list).await?;
    Ok((key, sha))
}

/// Writes the manifest accepting `manifest.attempt`, after checking it and that its `files.json` is in the
/// store with the sha256 the task reported. Idempotent.
pub async fn write_value_manifest(store: &Store, layout: &RunLayout, manifest: &ValueManifest) -> Result<()> {
    manifest.validate(layout)?;
    read_value_files(store, manifest).await?;
    store.put_json(&layout.value_manifest(manifest.iteration), manifest).await
}

/// V_t's manifest, or None while no attempt has been accepted.
pub async fn read_value_manifest(store: &Store, layout: &RunLayout, iteration: u32) -> Result<Option<ValueManifest>> {
    let key = layout.value_manifest(iteration);
    let Some(bytes) = store.get_if_exists(&key).await? else { return Ok(None) };
    let manifest: ValueManifest = store.decode_json(&key, &bytes)?;
    if manifest.iteration != iteration {
        return Err(Error::ManifestInvalid {
            location: store.describe(&key),
            message: format!("describes iteration {}, not {iteration}", manifest.iteration),
        });
    }
    manifest.validate(layout).map_err(|e| in_store(e, store, &key))?;
    Ok(Some(manifest))
}

/// The accepted attempt's file list, checked against the manifest's sha256.
pub async fn read_value_files(store: &Store, manifest: &ValueManifest) -> Result<ValueFiles> {
    let bytes = store.get_verified(&manifest.key, &manifest.sha256).await?;
    let files: ValueFiles = store.decode_json(&manifest.key, &bytes)?;
    for f in &files.files {
        if f.name.is_empty() || f.name.contains('/') || !is_sha256_hex(&f.sha256) {
            return Err(Error::ManifestInvalid {
                location: store.describe(&manifest.key),
                message: format!("bad entry `{}` (sha256 `{}`)", f.name, f.sha256),
            });
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> (Store, RunLayout) {
        (Store::in_memory(), RunLayout::new("r").unwrap())
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn an_accepted_attempt_is_found_and_a_late_one_does_not_replace_it() {
        let (store, layout) = run();
        block(async {
            let (key2, sha2) =
                write_value_folder(&store, &layout, 1, 2, vec![("model.safetensors".into(), b"two".to_vec())])
                    .await
                    .unwrap();
            assert_eq!(key2, "runs/r/iter-1/value/attempt-2/model/files.json");
            let accepted = ValueManifest::new(&layout, "r", 1, 2, &sha2);
            write_value_manifest(&store, &layout, &accepted).await.unwrap();
            // A late attempt 1 writes its own folder only.
            write_value_folder(&store, &layout, 1, 1, vec![("model.safetensors".into(), b"one".to_vec())])
                .await
                .unwrap();
            let found = read_value_manifest(&store, &layout, 1).await.unwrap().unwrap();
            assert_eq!(found, accepted);
            let files = read_value_files(&store, &found).await.unwrap();
            assert_eq!(files.files[0].sha256, sha256_hex(b"two"));
            assert_eq!(found.model_key(), "runs/r/iter-1/value/attempt-2/model");
            assert!(read_value_manifest(&store, &layout, 2).await.unwrap().is_none());
        });
    }

    #[test]
    fn a_manifest_whose_files_do_not_hash_as_reported_is_refused() {
        let (store, layout) = run();
        block(async {
            let (_, sha) =
                write_value_folder(&store, &layout, 1, 1, vec![("config.json".into(), b"{}".to_vec())]).await.unwrap();
            // The reported sha256 of another attempt's list: refused when written.
            let wrong = ValueManifest::new(&layout, "r", 1, 1, &sha256_hex(b"other"));
            let err = write_value_manifest(&store, &layout, &wrong).await.unwrap_err();
            assert_eq!(err.kind(), "checksum_mismatch", "{err}");
            // files.json replaced after acceptance: refused when read.
            write_value_manifest(&store, &layout, &ValueManifest::new(&layout, "r", 1, 1, &sha)).await.unwrap();
            store.put("runs/r/iter-1/value/attempt-1/model/files.json", b"{\"files\":[]}".to_vec()).await.unwrap();
            let m = read_value_manifest(&store, &layout, 1).await.unwrap().unwrap();
            let err = read_value_files(&store, &m).await.unwrap_err();
            assert!(err.to_string().contains("attempt-1/model/files.json"), "{err}");
            // A manifest naming a key that is not its attempt's.
            let mut odd = ValueManifest::new(&layout, "r", 1, 1, &sha);
            odd.key = "runs/r/iter-1/value/attempt-2/model/files.json".into();
            let err = odd.validate(&layout).unwrap_err();
            assert!(err.to_string().contains("expected `runs/r/iter-1/value/attempt-1/model/files.json`"), "{err}");
        });
    }
}
