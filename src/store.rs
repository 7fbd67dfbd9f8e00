//! Blob store for heatmaps: a local directory (`file://`) or an S3-compatible bucket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use object_store::{aws::AmazonS3Builder, path::Path as ObjectPath, ObjectStore, PutPayload};
use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::{HeatmapSettings, S3Settings};

#[derive(Clone)]
pub(crate) enum BlobStore {
    Dir(PathBuf),
    S3 { store: Arc<dyn ObjectStore>, bucket: String, prefix: String },
}

impl BlobStore {
    pub(crate) fn new(settings: &HeatmapSettings, s3: &S3Settings) -> Result<Self> {
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
            let store = s3_client(s3, bucket, settings.write_timeout).context("configuring the S3 heatmap store")?;
            return Ok(Self::S3 { store: Arc::new(store), bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        bail!("heatmap.store must be file:// or s3://, got {url:?}")
    }

    /// Writes `bytes` at `key` (overwriting) and returns the blob's URI (percent-encoded, see `uri`).
    pub(crate) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
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
                Ok(uri("file://", std::os::unix::ffi::OsStrExt::as_bytes(abs.as_os_str())))
            }
            Self::S3 { store, bucket, prefix } => {
                let full = if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") };
                // The object key as object_store writes it (it encodes a few characters itself).
                let path = ObjectPath::from(full.as_str());
                store.put(&path, PutPayload::from(bytes)).await.map_err(|e| anyhow!("S3 put {full}: {e}"))?;
                Ok(uri(&format!("s3://{bucket}/"), path.as_ref().as_bytes()))
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Dir(p) => format!("file://{}", std::path::absolute(p).unwrap_or(p.clone()).display()),
            Self::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}"),
        }
    }
}

/// What a URI path segment keeps as it is: RFC 3986's unreserved characters. Anything else (a
/// space, `#`, `%`, non-ASCII bytes) is percent-encoded, so a heatmap URI is valid whatever the
/// store root, and percent-decoding its path gives back the file's path or the object's key.
const KEPT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `base` (`file://`, `s3://bucket/`) then `path` with each `/`-separated segment percent-encoded.
fn uri(base: &str, path: &[u8]) -> String {
    let segments: Vec<String> = path.split(|b| *b == b'/').map(|segment| percent_encode(segment, KEPT).to_string()).collect();
    format!("{base}{}", segments.join("/"))
}

/// An S3 client for `bucket`, bounded at every level so a slow store never holds anything for
/// long: connect and per-request timeouts, and at most `total` of retries.
pub(crate) fn s3_client(s3: &S3Settings, bucket: &str, total: Duration) -> Result<object_store::aws::AmazonS3> {
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

    #[test]
    fn s3_uris_encode_the_key_and_decode_back_to_it() {
        let key = "line 7#a/100%/v1/images/0/5.png";
        let u = url::Url::parse(&uri("s3://inspection/", key.as_bytes())).unwrap();
        assert_eq!((u.scheme(), u.host_str(), u.fragment()), ("s3", Some("inspection"), None));
        assert_eq!(percent_encoding::percent_decode_str(u.path()).decode_utf8().unwrap(), format!("/{key}"));
        assert_eq!(uri("s3://b/", b"v1/images/0/5.png"), "s3://b/v1/images/0/5.png", "a plain key stays readable");
    }

    /// A store root with a space, `#`, `%` or `?` still gives a valid URI (a `#` would otherwise
    /// start a fragment) that decodes back to the file written.
    #[tokio::test]
    async fn dir_store_uris_are_percent_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("heat maps #1 100% ?x");
        let store = BlobStore::Dir(root.clone());
        let uri = store.put("v1/images/0/5.png", b"png".to_vec()).await.unwrap();
        assert!(!uri.contains([' ', '#', '?']), "{uri}");
        let parsed = url::Url::parse(&uri).unwrap();
        assert_eq!(parsed.to_file_path().unwrap(), root.join("v1/images/0/5.png"), "{uri}");
    }
}
