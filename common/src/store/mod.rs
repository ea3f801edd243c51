//! Object storage behind one small type: a local folder by default, or `s3://bucket/prefix` for S3 and
//! S3-compatible servers. Keys are the ones `layout::RunLayout` derives; every error names the key and the store.
//!
//! The local folder writes each object to a staging file and renames it into place (object_store's
//! `LocalFileSystem` does this for every `put`), so a reader never sees half an object; with
//! [`StoreOptions::fsync`] the rename is also durable before `put` returns.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lower-case hex sha256 of `bytes`: the checksum manifests record and readers verify.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, read in 1 MiB pieces (a 7B model's weights never sit in memory whole).
pub fn file_sha256_hex(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// How a store connects and retries. The defaults suit a real run; tests shorten them to fail fast.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Retries of a failed request (S3 only). object_store retries connection errors, timeouts and 5xx.
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt (S3 only).
    pub retry_timeout: Duration,
    /// First backoff between retries; it doubles up to 15 s (S3 only).
    pub initial_backoff: Duration,
    pub connect_timeout: Duration,
    /// Whole-request timeout (S3 only).
    pub request_timeout: Duration,
    /// Extra S3 settings by object_store's key names (`aws_endpoint`, `aws_access_key_id`, `aws_allow_http`,
    /// ...), applied after the environment so they win over it.
    pub s3_config: Vec<(String, String)>,
    /// Local folder: fsync each object and its directory before `put` returns.
    pub fsync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            initial_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
            s3_config: Vec::new(),
            fsync: true,
        }
    }
}

/// A handle on one object store. Cheap to clone; share it across tasks.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// How the store is named in errors and logs: the folder, `s3://bucket/prefix`, or `memory://`.
    url: String,
    /// The folder of a local store: tools that need real files (checkpoints libtorch reads and writes) use
    /// it directly instead of copying through the store.
    local_root: Option<std::path::PathBuf>,
}

impl Store {
    /// Opens `url` with the default [`StoreOptions`]: a local folder path (created if missing), `file:///abs/path`,
    /// or `s3://bucket[/prefix]` with credentials, region and endpoint from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP server).
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &StoreOptions::default())
    }

    pub fn open_with(url: &str, options: &StoreOptions) -> Result<Self> {
        let open_err = |message: String| Error::StoreOpen { url: url.to_owned(), message };
        if url.trim().is_empty() {
            return Err(open_err("empty store URL".into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::open_s3(url, rest, options);
        }
        let folder = match url.split_once("://") {
            None => url,
            Some(("file", path)) => path,
            Some((scheme, _)) => {
                return Err(open_err(format!("unsupported scheme `{scheme}://`: use a local folder path or s3://")));
            }
        };
        std::fs::create_dir_all(folder).map_err(|e| open_err(format!("cannot create folder: {e}")))?;
        let canonical = std::fs::canonicalize(folder).map_err(|e| open_err(format!("cannot resolve folder: {e}")))?;
        let local = LocalFileSystem::new_with_prefix(&canonical)
            .map_err(|e| open_err(e.to_string()))?
            .with_automatic_cleanup(true)
            .with_fsync(options.fsync);
        Ok(Self { inner: Arc::new(local), url: canonical.display().to_string(), local_root: Some(canonical) })
    }

    fn open_s3(url: &str, rest: &str, options: &StoreOptions) -> Result<Self> {
        let open_err = |message: String| Error::StoreOpen { url: url.to_owned(), message };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(open_err("missing bucket name: expected s3://bucket[/prefix]".into()));
        }
        let prefix = prefix.trim_matches('/');
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        // Timeouts go through `with_config` so they merge with client settings the environment gave
        // (AWS_ALLOW_HTTP); `with_client_options` would replace those.
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig { init_backoff: options.initial_backoff, ..BackoffConfig::default() },
                max_retries: options.max_retries,
                retry_timeout: options.retry_timeout,
            })
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), ms(options.connect_timeout))
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), ms(options.request_timeout));
        for (key, value) in &options.s3_config {
            let parsed: AmazonS3ConfigKey =
                key.to_ascii_lowercase().parse().map_err(|_| open_err(format!("unknown S3 setting `{key}`")))?;
            builder = builder.with_config(parsed, value);
        }
        let s3 = builder.build().map_err(|e| open_err(e.to_string()))?;
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            let prefix = Path::parse(prefix).map_err(|e| open_err(format!("invalid prefix `{prefix}`: {e}")))?;
            Arc::new(PrefixStore::new(s3, prefix))
        };
        let url = if prefix.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{prefix}") };
        Ok(Self { inner, url, local_root: None })
    }

    /// A store that lives in memory: for tests and for the single-process demo's scratch data.
    pub fn in_memory() -> Self {
        Self { inner: Arc::new(InMemory::new()), url: "memory://".into(), local_root: None }
    }

    /// The file path of `key` when the store is a local folder.
    pub fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key))
    }

    /// The store's name as errors and logs show it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes `bytes` at `key`, replacing any object there. Readers see the old object or the new one, never a mix.
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let path = self.path(key)?;
        self.inner.put(&path, PutPayload::from(bytes.into())).await.map_err(|e| self.error("put", key, e))?;
        Ok(())
    }

    /// The object at `key`; [`Error::ObjectMissing`] when there is none.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        let result = self.inner.get(&path).await.map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("get", key, e))
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get_if_exists(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::ObjectMissing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    /// The size in bytes of the object at `key` (a HEAD request, the object is not read);
    /// [`Error::ObjectMissing`] when there is none.
    pub async fn size(&self, key: &str) -> Result<u64> {
        let path = self.path(key)?;
        let meta = self.inner.head(&path).await.map_err(|e| self.error("head", key, e))?;
        Ok(meta.size)
    }

    /// Every key under `prefix`, sorted. The prefix matches whole path segments: `runs/a` lists
    /// `runs/a/x` but not `runs/ab/x`. An empty prefix lists the whole store.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let trimmed = prefix.trim_end_matches('/');
        let path = if trimmed.is_empty() { None } else { Some(self.path(trimmed)?) };
        let metas: Vec<_> =
            self.inner.list(path.as_ref()).try_collect().await.map_err(|e| self.error("list", prefix, e))?;
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        Ok(keys)
    }

    /// Removes `key`. Deleting a missing key succeeds, as it does on S3.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Writes `value` as pretty-printed JSON (manifests and summaries are read by people too).
    pub async fn put_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::Encode { what: format!("`{key}` for store {}", self.url), message: e.to_string() })?;
        bytes.push(b'\n');
        self.put(key, bytes).await
    }

    /// Reads the JSON object at `key`; [`Error::MalformedJson`] names the key and the line when it does not parse.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.decode_json(key, &self.get(key).await?)
    }

    /// Decodes `bytes`, read from `key`, as JSON; [`Error::MalformedJson`] names the key and the line.
    pub fn decode_json<T: DeserializeOwned>(&self, key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| Error::MalformedJson {
            location: self.describe(key),
            line: Some(e.line()),
            message: e.to_string(),
        })
    }

    /// The object at `key`, which must hash to `sha256` (what a manifest recorded for it);
    /// [`Error::ChecksumMismatch`] when it does not: corrupted or overwritten.
    pub async fn get_verified(&self, key: &str, sha256: &str) -> Result<Bytes> {
        let bytes = self.get(key).await?;
        let actual = sha256_hex(&bytes);
        if actual != sha256 {
            return Err(Error::ChecksumMismatch {
                url: self.url.clone(),
                key: key.to_owned(),
                expected: sha256.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// `key` as errors name it: `` `runs/x/manifest.json` in store s3://bucket/prefix ``.
    pub fn describe(&self, key: &str) -> String {
        format!("`{key}` in store {}", self.url)
    }

    /// Keys are relative, `/`-separated, without empty, `.` or `..` segments: exactly what `RunLayout` builds.
    fn path(&self, key: &str) -> Result<Path> {
        let invalid = |message: String| Error::InvalidId { what: "object key", value: key.to_owned(), message };
        if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
            return Err(invalid("must be a non-empty relative path not ending in '/'".into()));
        }
        if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(invalid("must not contain empty, '.' or '..' segments".into()));
        }
        Path::parse(key).map_err(|e| invalid(e.to_string()))
    }

    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        let message = error_chain(&e);
        if let object_store::Error::NotFound { .. } = e {
            // S3 answers 404 for a missing bucket too; that is a broken store, not a missing object.
            if message.contains("NoSuchBucket") {
                let message = format!("the bucket does not exist: {message}");
                return Error::StoreIo { url: self.url.clone(), op, key: key.to_owned(), message };
            }
            return Error::ObjectMissing { url: self.url.clone(), key: key.to_owned() };
        }
        if is_connection_failure(&e) {
            Error::StoreUnreachable { url: self.url.clone(), op, key: key.to_owned(), message }
        } else {
            Error::StoreIo { url: self.url.clone(), op, key: key.to_owned(), message }
        }
    }
}

/// True when some cause in the chain is an HTTP connect failure or timeout: the server never answered.
fn is_connection_failure(e: &object_store::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(http) = c.downcast_ref::<HttpError>()
            && matches!(http.kind(), HttpErrorKind::Connect | HttpErrorKind::Timeout)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The error and its causes on one line, without repeating a cause the outer message already includes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_matches_the_standard_test_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn unsafe_keys_are_refused_before_touching_the_store() {
        let store = Store::in_memory();
        for key in ["", "/abs", "a//b", "a/../b", "./a", "dir/"] {
            assert_eq!(store.path(key).unwrap_err().kind(), "invalid_id", "{key:?}");
        }
        assert!(store.path("runs/x/iter-1/rollout/shard-00000.attempt-0.jsonl").is_ok());
    }

    #[test]
    fn bad_store_urls_are_clear_errors() {
        for url in ["", "gs://bucket/x", "s3://", "s3:///prefix"] {
            let err = Store::open(url).unwrap_err();
            assert_eq!(err.kind(), "store_open", "{url:?}: {err}");
        }
    }
}
