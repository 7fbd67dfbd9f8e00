//! The model that scores now, and hot reload: a new model is read from an allowed source
//! (`model_source`), loaded and checked against the contract (docs/DESIGN.md §1) beside the active
//! one, warmed up, then swapped in between batches; the same bytes are not loaded twice. Engine
//! workers read the active model once per batch, so every image of a batch is scored, and
//! labelled, by one model; nothing is re-read or dropped by a swap.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Context, Result};
use tokio::sync::OwnedMutexGuard;

use crate::config::{EngineSettings, ModelSettings, S3Settings, Settings};
use crate::event::ModelRef;
use crate::inference::engine::Engine;
use crate::inference::model::Scorer;
use crate::inference::model_source::{ModelBytes, ModelSources};

/// A loaded model with what scoring needs beside the sessions.
pub(crate) struct ActiveModel {
    pub engine: Arc<Engine>,
    /// Its calibration with the configured threshold overrides.
    pub scorer: Scorer,
    pub model: ModelRef,
    /// Where it was loaded from (a path, or the `s3://` URI it was fetched from).
    pub source: String,
}

impl ActiveModel {
    /// `engine` with `thresholds` (`model.thresholds`) over its calibration.
    pub(crate) fn new(engine: Arc<Engine>, thresholds: &BTreeMap<String, f32>, source: &str) -> Result<Self> {
        let scorer = Scorer::new(&engine.info, thresholds)?;
        let model = engine.info.model_ref();
        Ok(Self { engine, scorer, model, source: source.to_string() })
    }

    /// What `/readyz`, `/api/model` and logs show of it.
    pub(crate) fn describe(&self) -> serde_json::Value {
        let info = &self.engine.info;
        serde_json::json!({"name": info.name, "version": info.version, "classes": info.classes, "input_size": info.input_size, "source": self.source, "sha256": self.engine.sha256, "provider": self.engine.provider})
    }
}

/// What `POST /api/model` answers for every refusal, whatever the reason (outside the allowed
/// sources, missing, not a regular file, too big, not a valid model): a caller must not learn from
/// it which files exist on the host. The operator's log says why.
pub(crate) const REFUSED: &str = "model refused: not an allowed, readable model this operator can serve (the operator's log says why)";

/// The active model and the one before it (for rollback), and loading new ones.
pub(crate) struct ModelSlot {
    current: RwLock<Arc<ActiveModel>>,
    previous: Mutex<Option<Arc<ActiveModel>>>,
    /// One check or load at a time (the API's checks and the reloader's loads alike), so at most
    /// one candidate is resident beside the serving model and its predecessor, and two
    /// announcements never race their swaps.
    loading: Arc<tokio::sync::Mutex<()>>,
    sources: ModelSources,
    loading_settings: Arc<LoadingSettings>,
}

/// What a candidate model is built and checked with: the sections the slot reads.
struct LoadingSettings {
    engine: EngineSettings,
    /// The warm-up batch's size follows the batches the model will see.
    max_batch: usize,
    thresholds: BTreeMap<String, f32>,
}

impl ModelSlot {
    /// Serves `active`; later models come from `model.allowed_sources` (through `s3` for
    /// `s3://`) and run with `engine` at batches up to `max_batch`.
    pub(crate) fn new(active: ActiveModel, model: &ModelSettings, engine: &EngineSettings, s3: &S3Settings, max_batch: usize) -> Self {
        let loading_settings = LoadingSettings { engine: engine.clone(), max_batch, thresholds: model.thresholds.clone() };
        Self {
            current: RwLock::new(Arc::new(active)),
            previous: Mutex::new(None),
            loading: Arc::default(),
            sources: ModelSources::new(model, s3),
            loading_settings: Arc::new(loading_settings),
        }
    }

    /// The slot the operator runs: the configured model and sections of `settings`.
    pub(crate) fn configured(engine: Arc<Engine>, settings: &Settings) -> Result<Self> {
        let active = ActiveModel::new(engine, &settings.model.thresholds, &settings.model.path)?;
        Ok(Self::new(active, &settings.model, &settings.engine, &settings.s3, settings.batch.max_batch))
    }

    /// The model to score the next batch with.
    pub(crate) fn current(&self) -> Arc<ActiveModel> {
        self.current.read().expect("model slot").clone()
    }

    pub(crate) fn previous(&self) -> Option<Arc<ActiveModel>> {
        self.previous.lock().expect("model slot").clone()
    }

    /// Whether `uri` serves now with exactly the bytes whose SHA-256 is `sha256`.
    pub(crate) fn serves(&self, uri: &str, sha256: &str) -> bool {
        let active = self.current();
        active.source == uri && active.engine.sha256 == sha256
    }

    /// Checks that `uri` could be swapped in (read, contract, input size, warm-up) without
    /// swapping it; returns its SHA-256.
    pub(crate) async fn check(&self, uri: &str) -> Result<String> {
        let one_at_a_time = self.loading.clone().lock_owned().await;
        let model = self.sources.read(uri).await?;
        let sha256 = model.sha256.clone();
        if !self.serves(uri, &sha256) {
            self.candidate(model, uri, one_at_a_time).await?;
        }
        Ok(sha256)
    }

    /// Reads, checks, warms up and swaps in `uri`; `None` when these very bytes already serve
    /// from it. `before_swap` sees the candidate once it passed every check, before its first
    /// batch. On any error the active model keeps serving.
    pub(crate) async fn load(&self, uri: &str, before_swap: impl FnOnce(&ActiveModel)) -> Result<Option<Arc<ActiveModel>>> {
        let one_at_a_time = self.loading.clone().lock_owned().await;
        let model = self.sources.read(uri).await?;
        if self.serves(uri, &model.sha256) {
            return Ok(None);
        }
        let (candidate, _one_at_a_time) = self.candidate(model, uri, one_at_a_time).await?;
        before_swap(&candidate);
        let candidate = Arc::new(candidate);
        let old = std::mem::replace(&mut *self.current.write().expect("model slot"), candidate.clone());
        *self.previous.lock().expect("model slot") = Some(old);
        Ok(Some(candidate))
    }

    /// Builds and checks a candidate off the executor. The loading guard goes along and comes
    /// back, so the lock is held for as long as the candidate exists, even when the caller gave
    /// up waiting for it.
    async fn candidate(&self, model: ModelBytes, uri: &str, guard: OwnedMutexGuard<()>) -> Result<(ActiveModel, OwnedMutexGuard<()>)> {
        let (settings, active, uri) = (self.loading_settings.clone(), self.current(), uri.to_string());
        let (candidate, guard) = tokio::task::spawn_blocking(move || (validate(&model, &uri, &settings, &active), guard)).await?;
        Ok((candidate?, guard))
    }
}

/// Loads a candidate and checks it can replace `active` without restarting anything: it follows
/// the contract (checked while loading), has the same input size (the decoders resize to it)
/// and answers a warm-up batch.
fn validate(model: &ModelBytes, source: &str, settings: &LoadingSettings, active: &ActiveModel) -> Result<ActiveModel> {
    let engine = Engine::from_bytes(model, source, &settings.engine).with_context(|| format!("model {source} was rejected"))?;
    let (new, old) = (engine.info.input_size, active.engine.info.input_size);
    if new != old {
        bail!("model {source} was rejected: its input size {new} differs from the active model's {old}; a different size needs a restart");
    }
    engine.warm_up(&settings.engine, settings.max_batch).with_context(|| format!("model {source} failed its warm-up batch"))?;
    ActiveModel::new(Arc::new(engine), &settings.thresholds, source)
}
