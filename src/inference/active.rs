//! The model that scores now, and hot reload: a new model is loaded and checked against the
//! contract (docs/DESIGN.md §1) beside the active one, warmed up, then swapped in between
//! batches. Engine workers read the active model once per batch, so every image of a batch is
//! scored, and labelled, by one model; nothing is re-read or dropped by a swap.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Context, Result};

use crate::config::Settings;
use crate::event::ModelRef;
use crate::inference::engine::Engine;
use crate::inference::model::Scorer;

/// A loaded model with what scoring needs beside the sessions.
pub struct ActiveModel {
    pub engine: Arc<Engine>,
    /// Its calibration with the configured threshold overrides.
    pub scorer: Scorer,
    pub model: ModelRef,
    /// Where it was loaded from (a path, or the `s3://` URI it was fetched from).
    pub source: String,
}

impl ActiveModel {
    pub fn new(engine: Arc<Engine>, settings: &Settings, source: &str) -> Result<Self> {
        let scorer = Scorer::new(&engine.info, &settings.model.thresholds)?;
        let model = ModelRef { name: engine.info.name.clone(), version: engine.info.version.clone() };
        Ok(Self { engine, scorer, model, source: source.to_string() })
    }

    /// What `/readyz`, `/api/model` and logs show of it.
    pub fn describe(&self) -> serde_json::Value {
        let info = &self.engine.info;
        serde_json::json!({"name": info.name, "version": info.version, "classes": info.classes, "input_size": info.input_size, "source": self.source, "provider": self.engine.provider})
    }
}

/// The active model and the one before it (for rollback).
pub struct ModelSlot {
    current: RwLock<Arc<ActiveModel>>,
    previous: Mutex<Option<Arc<ActiveModel>>>,
    /// Serialises loads, so two announcements never race their swaps.
    loading: Mutex<()>,
}

impl ModelSlot {
    pub fn new(active: ActiveModel) -> Self {
        Self { current: RwLock::new(Arc::new(active)), previous: Mutex::new(None), loading: Mutex::new(()) }
    }

    /// The model to score the next batch with.
    pub fn current(&self) -> Arc<ActiveModel> {
        self.current.read().expect("model slot").clone()
    }

    pub fn previous(&self) -> Option<Arc<ActiveModel>> {
        self.previous.lock().expect("model slot").clone()
    }

    /// Loads `source` (a file path; `s3://` URIs are fetched first by the caller), checks it
    /// against the contract and the running pipeline, warms it up and swaps it in; `before_swap`
    /// sees it once it passed every check, before its first batch. On any error the active model
    /// keeps serving. Blocking: call off the executor.
    pub fn load_and_swap(&self, file: &Path, source: &str, settings: &Settings, before_swap: impl FnOnce(&ActiveModel)) -> Result<Arc<ActiveModel>> {
        let _one_at_a_time = self.loading.lock().expect("model slot");
        let candidate = validate(file, source, settings, &self.current())?;
        before_swap(&candidate);
        let candidate = Arc::new(candidate);
        let old = std::mem::replace(&mut *self.current.write().expect("model slot"), candidate.clone());
        *self.previous.lock().expect("model slot") = Some(old);
        Ok(candidate)
    }
}

/// Loads a candidate and checks it can replace `active` without restarting anything: it follows
/// the contract (checked while loading), has the same input size (the decoders resize to it)
/// and answers a warm-up batch.
pub fn validate(file: &Path, source: &str, settings: &Settings, active: &ActiveModel) -> Result<ActiveModel> {
    let engine = Engine::load(file, &settings.engine).with_context(|| format!("model {source} was rejected"))?;
    let (new, old) = (engine.info.input_size, active.engine.info.input_size);
    if new != old {
        bail!("model {source} was rejected: its input size {new} differs from the active model's {old}; a different size needs a restart");
    }
    engine
        .warm_up(settings.batch.max_batch.min(8), settings.engine.warmup_batches.max(1))
        .with_context(|| format!("model {source} failed its warm-up batch"))?;
    ActiveModel::new(Arc::new(engine), settings, source)
}

/// A model URI from the API or the control topic as a local file: a path as it is, an `s3://`
/// object downloaded into `dir` (with the heatmap store's S3 settings).
pub async fn fetch_model(uri: &str, settings: &Settings, dir: &Path) -> Result<PathBuf> {
    let Some(rest) = uri.strip_prefix("s3://") else {
        return Ok(PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri)));
    };
    let (bucket, key) = rest.split_once('/').with_context(|| format!("{uri} names no object"))?;
    let client = crate::store::s3_client(&settings.heatmap.s3, bucket, std::time::Duration::from_secs(120))?;
    use object_store::ObjectStore;
    let bytes = client.get(&object_store::path::Path::from(key)).await.with_context(|| format!("fetching {uri}"))?.bytes().await?;
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("model-{}.onnx", rand::random::<u64>()));
    std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}
