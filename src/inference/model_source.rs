//! Where models may be read from, and reading one (docs/DESIGN.md §9). A URI from the API or the
//! control topic names a file under an allowed directory or an object under an allowed S3 prefix
//! (`model.allowed_sources`; by default the directory of `model.path`), and nothing else: the
//! decision is taken on the URI's words before anything is touched, then again on the resolved
//! path (symlinks). What is not a regular file, or is over `model.max_bytes`, is refused before it
//! is read, and a FIFO or device can never block the reader. The bytes stay in memory (no
//! temporary file to leave behind) with their SHA-256, so the model checked is the model loaded,
//! and the same bytes announced again are recognised.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{ModelSettings, ModelSource, S3Settings};

/// A model's bytes, read whole, and their SHA-256 (lower-case hex).
pub(crate) struct ModelBytes {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl ModelBytes {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { bytes, sha256 }
    }
}

/// The allowed sources, resolved once.
pub(crate) struct ModelSources {
    /// Each allowed directory as written (made absolute) and resolved (symlinks): a path must lie
    /// under one by its words, and under the resolved one once resolved itself.
    dirs: Vec<(PathBuf, PathBuf)>,
    /// `(bucket, key prefix)`; an empty prefix allows the whole bucket.
    s3: Vec<(String, String)>,
    /// `model.path`, always allowed (as written, made absolute): the rollback target.
    configured: PathBuf,
    max_bytes: u64,
    s3_settings: S3Settings,
}

/// What a URI names, once allowed.
enum Location {
    File(PathBuf),
    S3 { bucket: String, key: String },
}

impl ModelSources {
    pub(crate) fn new(model: &ModelSettings, s3_settings: &S3Settings) -> Self {
        let configured = absolute(Path::new(&model.path));
        let default_dir = [ModelSource::Dir(configured.parent().map(Path::to_path_buf).unwrap_or_default())];
        let sources = if model.allowed_sources.is_empty() { &default_dir[..] } else { &model.allowed_sources[..] };
        let mut dirs = Vec::new();
        let mut s3 = Vec::new();
        for source in sources {
            match source {
                ModelSource::Dir(dir) => {
                    let dir = absolute(dir);
                    let resolved = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                    dirs.push((dir, resolved));
                }
                ModelSource::S3 { bucket, prefix } => s3.push((bucket.clone(), prefix.clone())),
            }
        }
        Self { dirs, s3, configured, max_bytes: model.max_bytes, s3_settings: s3_settings.clone() }
    }

    /// Reads the model `uri` names (a path, `file://` or `s3://`) if it is allowed, a regular file
    /// or object, and at most `model.max_bytes`. The error says why, for the operator's log only.
    pub(crate) async fn read(&self, uri: &str) -> Result<ModelBytes> {
        match self.locate(uri)? {
            Location::File(path) => {
                let path = self.resolve(uri, &path)?;
                let max_bytes = self.max_bytes;
                tokio::task::spawn_blocking(move || read_file(&path, max_bytes)).await?
            }
            Location::S3 { bucket, key } => self.read_object(uri, &bucket, &key).await,
        }
    }

    /// Decides on the URI's words alone, so the answer for a place outside the list never
    /// depends on what exists there.
    fn locate(&self, uri: &str) -> Result<Location> {
        let outside = || anyhow::anyhow!("{uri} is outside model.allowed_sources");
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').ok_or_else(outside)?;
            // S3 keys are literal, but `..` and empty segments have no business in a model's key.
            let plain_key = !key.is_empty() && key.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
            let under = |prefix: &str| prefix.is_empty() || key.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'));
            if !plain_key || !self.s3.iter().any(|(b, prefix)| b == bucket && under(prefix)) {
                return Err(outside());
            }
            return Ok(Location::S3 { bucket: bucket.to_string(), key: key.to_string() });
        }
        let path = match uri.strip_prefix("file://") {
            Some(_) => url::Url::parse(uri).ok().and_then(|u| u.to_file_path().ok()).ok_or_else(outside)?,
            None if uri.contains("://") || uri.is_empty() => return Err(outside()),
            None => absolute(Path::new(uri)),
        };
        let inside = |dir: &Path| path.starts_with(dir);
        let allowed = path == self.configured || self.dirs.iter().any(|(dir, resolved)| inside(dir) || inside(resolved));
        if path.components().any(|c| c == Component::ParentDir) || !allowed {
            return Err(outside());
        }
        Ok(Location::File(path))
    }

    /// The real path of an allowed file, still inside the list once symlinks are followed.
    fn resolve(&self, uri: &str, path: &Path) -> Result<PathBuf> {
        let resolved = path.canonicalize().with_context(|| format!("cannot read {uri}"))?;
        let configured = self.configured.canonicalize().ok();
        if configured.as_deref() != Some(resolved.as_path()) && !self.dirs.iter().any(|(_, dir)| resolved.starts_with(dir)) {
            bail!("{uri} is outside model.allowed_sources once its links are followed ({})", resolved.display());
        }
        Ok(resolved)
    }

    /// Asks for the object's size first and reads no more than it, nor more than `max_bytes`.
    async fn read_object(&self, uri: &str, bucket: &str, key: &str) -> Result<ModelBytes> {
        use futures::StreamExt;
        use object_store::ObjectStore;
        let client = crate::store::s3_client(&self.s3_settings, bucket, Duration::from_secs(120))?;
        let path = object_store::path::Path::from(key);
        let size = client.head(&path).await.with_context(|| format!("cannot read {uri}"))?.size;
        check_size(uri, size, self.max_bytes)?;
        let options = object_store::GetOptions { range: Some(object_store::GetRange::Bounded(0..size)), ..Default::default() };
        let mut stream = client.get_opts(&path, options).await.with_context(|| format!("cannot read {uri}"))?.into_stream();
        let mut bytes = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("reading {uri}"))?;
            check_size(uri, (bytes.len() + chunk.len()) as u64, self.max_bytes)?;
            bytes.extend_from_slice(&chunk);
        }
        Ok(ModelBytes::new(bytes))
    }
}

/// Reads a regular file of at most `max_bytes`. Its type and size are checked before it is
/// opened, and it is opened without blocking (a FIFO would otherwise wait for a writer) and
/// checked again, since what was opened may not be what was looked at.
pub(crate) fn read_file(path: &Path, max_bytes: u64) -> Result<ModelBytes> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.display().to_string();
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            bail!("{name} is not a regular file");
        }
        check_size(&name, meta.len(), max_bytes)
    };
    check(&std::fs::metadata(path).with_context(|| format!("cannot read {name}"))?)?;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).with_context(|| format!("cannot open {name}"))?;
    let meta = file.metadata().with_context(|| format!("cannot read {name}"))?;
    check(&meta)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    check_size(&name, bytes.len() as u64, max_bytes)?;
    Ok(ModelBytes::new(bytes))
}

fn check_size(name: &str, size: u64, max_bytes: u64) -> Result<()> {
    if size == 0 {
        bail!("{name} is empty");
    }
    if size > max_bytes {
        bail!("{name} is {size} bytes, over model.max_bytes = {max_bytes}");
    }
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn sources(dir: &Path, allowed: &str) -> ModelSources {
        let env = [
            ("DCAM__MODEL__PATH".to_string(), dir.join("models/dcam.onnx").display().to_string()),
            ("DCAM__MODEL__ALLOWED_SOURCES".to_string(), allowed.to_string()),
            ("DCAM__MODEL__MAX_BYTES".to_string(), (1u64 << 20).to_string()),
        ];
        let settings = Settings::load_with_env(None, env.into_iter().filter(|(_, v)| !v.is_empty())).unwrap();
        ModelSources::new(&settings.model, &settings.s3)
    }

    #[test]
    fn only_allowed_places_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display();
        let by_default = sources(dir.path(), "");
        assert!(by_default.locate(&format!("{root}/models/v2.onnx")).is_ok(), "the configured model's directory");
        assert!(by_default.locate(&format!("file://{root}/models/v2.onnx")).is_ok());
        for refused in [
            "/etc/passwd".to_string(),
            "file:///etc/passwd".to_string(),
            format!("{root}/models/../secret.onnx"),
            format!("{root}/models-elsewhere/v2.onnx"),
            format!("file://other-host{root}/models/v2.onnx"),
            "https://example.com/m.onnx".to_string(),
            "s3://bucket/models/v2.onnx".to_string(),
            String::new(),
        ] {
            let err = by_default.locate(&refused).err().unwrap_or_else(|| panic!("{refused} was allowed"));
            assert!(err.to_string().contains("outside model.allowed_sources"), "{refused}: {err}");
        }
        let listed = sources(dir.path(), "s3://bucket/models,/srv/elsewhere");
        assert!(listed.locate("s3://bucket/models/v2.onnx").is_ok());
        assert!(listed.locate(&format!("{root}/models/dcam.onnx")).is_ok(), "model.path itself stays allowed");
        assert!(listed.locate("/srv/elsewhere/v2.onnx").is_ok());
        for refused in
            ["s3://bucket/models-other/v2.onnx", "s3://bucket/models/../x.onnx", "s3://bucket/models//x.onnx", "s3://other/models/v2.onnx", "s3://bucket"]
        {
            assert!(listed.locate(refused).is_err(), "{refused} was allowed");
        }
        assert!(listed.locate(&format!("{root}/models/v2.onnx")).is_err(), "an explicit list replaces the default directory");
    }

    #[test]
    fn only_regular_files_within_the_size_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.onnx");
        std::fs::write(&file, b"model bytes").unwrap();
        let read = read_file(&file, 1024).unwrap();
        assert_eq!(read.bytes, b"model bytes");
        assert_eq!(read.sha256, "9cb7487000bc86ac36ce83c4acfabe8878552be99572a6770f65ab1d048a5c48", "sha256sum of the same bytes");
        let err = format!("{:#}", read_file(&file, 4).err().unwrap());
        assert!(err.contains("over model.max_bytes"), "{err}");
        let fifo = dir.path().join("fifo.onnx");
        let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let err = format!("{:#}", read_file(&fifo, 1024).err().unwrap());
        assert!(err.contains("not a regular file"), "{err}");
        assert!(format!("{:#}", read_file(dir.path(), 1024).err().unwrap()).contains("not a regular file"));
    }
}
