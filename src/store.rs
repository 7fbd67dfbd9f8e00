//! Blob store for heatmaps: a local directory (`file://`) or an S3-compatible bucket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use object_store::{aws::AmazonS3Builder, path::Path as ObjectPath, ObjectStore, PutPayload};

use crate::config::{HeatmapSettings, S3Settings};

#[derive(Clone)]
pub enum BlobStore {
    Dir(PathBuf),
    S3 { store: Arc<dyn ObjectStore>, bucket: String, prefix: String },
}

impl BlobStore {
    pub fn from_settings(settings: &HeatmapSettings) -> Result<Self> {
        let url = &settings.store;
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                bail!("heatmap.store file:// needs a directory path");
            }
            return Ok(Self::Dir(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("heatmap.store s3:// needs a bucket name");
            }
            let store = s3_client(&settings.s3, bucket, settings.write_timeout).context("configuring the S3 heatmap store")?;
            return Ok(Self::S3 { store: Arc::new(store), bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        bail!("heatmap.store must be file:// or s3://, got {url:?}")
    }

    /// Writes `bytes` at `key` (overwriting) and returns the blob's URI.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        match self {
            Self::Dir(root) => {
                let path = root.join(key);
                let parent = path.parent().expect("key has a file name");
                tokio::fs::create_dir_all(parent).await.with_context(|| format!("creating {}", parent.display()))?;
                // Write then rename, so a reader never sees half a PNG.
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                tokio::fs::write(&tmp, bytes).await.with_context(|| format!("writing {}", tmp.display()))?;
                tokio::fs::rename(&tmp, &path).await.with_context(|| format!("renaming to {}", path.display()))?;
                let abs = std::path::absolute(&path).unwrap_or(path);
                Ok(format!("file://{}", abs.display()))
            }
            Self::S3 { store, bucket, prefix } => {
                let full = if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") };
                store.put(&ObjectPath::from(full.as_str()), PutPayload::from(bytes)).await.map_err(|e| anyhow!("S3 put {full}: {e}"))?;
                Ok(format!("s3://{bucket}/{full}"))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Dir(p) => format!("file://{}", std::path::absolute(p).unwrap_or(p.clone()).display()),
            Self::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }
}

/// An S3 client for `bucket`, bounded at every level so a slow store never holds anything for
/// long: connect and per-request timeouts, and at most `total` of retries.
pub fn s3_client(s3: &S3Settings, bucket: &str, total: Duration) -> Result<object_store::aws::AmazonS3> {
    let client = object_store::ClientOptions::new().with_allow_http(s3.allow_http).with_connect_timeout(s3.connect_timeout).with_timeout(s3.request_timeout);
    let retry = object_store::RetryConfig { max_retries: 2, retry_timeout: total, ..Default::default() };
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_region(&s3.region).with_client_options(client).with_retry(retry);
    if let Some(endpoint) = &s3.endpoint {
        b = b.with_endpoint(endpoint);
    }
    if let Some(key_id) = &s3.access_key_id {
        b = b.with_access_key_id(key_id).with_secret_access_key(s3.secret_access_key.expose().unwrap_or_default());
    }
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dir_store_overwrites_at_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::Dir(dir.path().to_path_buf());
        let uri = store.put("v1/images/0/5.png", b"first".to_vec()).await.unwrap();
        let again = store.put("v1/images/0/5.png", b"second".to_vec()).await.unwrap();
        assert_eq!(uri, again);
        let path = dir.path().join("v1/images/0/5.png");
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(uri, format!("file://{}", path.display()));
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temp files left");
    }
}
