//! Hot reload: a thread that swaps models in when one is announced on the control topic, or
//! when the file at `model.path` changes (with `model.watch_interval_ms`). Loading, checking and
//! warming up happen here, beside the serving model; the swap itself is one pointer write that
//! the engine workers see at their next batch. At start-up, the announced model is loaded before
//! the first record is read (`AnnouncedModel`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::ModelSettings;
use crate::control::{Change, ControlState};
use crate::inference::active::{ActiveModel, ModelSlot};
use crate::shutdown::Shutdown;
use crate::telemetry::{InternalEvent, Metrics};

pub(crate) struct Reloader {
    pub models: Arc<ModelSlot>,
    pub control: Option<Arc<ControlState>>,
    pub settings: ModelSettings,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
}

impl Reloader {
    pub(crate) fn spawn(self, stop: Shutdown) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("model-reload".into()).spawn(move || self.run(&stop))
    }

    fn run(&self, stop: &Shutdown) {
        let watch = self.settings.watch_interval;
        let path = Path::new(&self.settings.path).to_path_buf();
        let mut seen = modified(&path);
        let mut last_check = Instant::now();
        while !stop.is_requested() {
            let announced = match &self.control {
                Some(state) => state.next_model(Duration::from_millis(200)),
                None => {
                    stop.sleep(Duration::from_millis(200));
                    None
                }
            };
            if let Some(Change::Model { uri, by, .. }) = announced {
                tracing::info!(uri, by, "model announced on the control topic");
                self.runtime.block_on(swap_in(&self.models, self.control.as_deref(), &self.metrics, &uri));
                continue;
            }
            if !watch.is_zero() && last_check.elapsed() >= watch {
                last_check = Instant::now();
                let now = modified(&path);
                // Only a file that is still the one serving is watched: an announced model wins.
                if now != seen && self.models.current().source == self.settings.path {
                    seen = now;
                    tracing::info!(path = %path.display(), "model file changed");
                    self.runtime.block_on(swap_in(&self.models, self.control.as_deref(), &self.metrics, &self.settings.path));
                }
            }
        }
    }
}

/// Loads, checks and swaps in `uri`, and reports it; false when it was refused (the active model
/// keeps serving). The same bytes from the same URI are left alone: e.g. the announcement read
/// again at a restart, or a file touched without changing.
pub(crate) async fn swap_in(models: &ModelSlot, control: Option<&ControlState>, metrics: &Metrics, uri: &str) -> bool {
    // Before its first batch: its runtime thresholds are in force and its classes are labels.
    // The swap is reported here too (nothing can fail between this and the swap), so whoever
    // sees the new model serve (`GET /api/model`) also sees it in the metrics.
    let before_swap = |candidate: &ActiveModel| {
        if let Some(control) = control {
            control.model_loaded(&candidate.engine.info);
        }
        metrics.set_classes(&candidate.engine.info.classes);
        metrics.emit(InternalEvent::ModelSwapped { name: &candidate.model.name, version: &candidate.model.version, source: uri });
    };
    match models.load(uri, before_swap).await {
        Ok(Some(_)) => true,
        Ok(None) => {
            tracing::debug!(uri, "this model is already serving");
            true
        }
        Err(e) => {
            metrics.emit(InternalEvent::ModelRejected { source: uri, error: &format!("{e:#}") });
            false
        }
    }
}

/// The model announced on the control topic, loading at start-up. It is taken from the control
/// state before the reloader starts (so it is loaded once), loads while the rest of the operator
/// starts, and `wait` holds the first record back until it serves, for at most
/// `model.announced_wait_ms` from the start.
pub(crate) struct AnnouncedModel {
    uri: String,
    loading: tokio::task::JoinHandle<bool>,
    deadline: tokio::time::Instant,
}

impl AnnouncedModel {
    pub(crate) fn start(control: &Arc<ControlState>, models: Arc<ModelSlot>, metrics: Arc<Metrics>, settings: &ModelSettings) -> Option<Self> {
        let Some(Change::Model { uri, .. }) = control.next_model(Duration::ZERO) else { return None };
        tracing::info!(uri, "loading the model announced on the control topic before reading any record");
        let loading = {
            let (uri, control) = (uri.clone(), control.clone());
            tokio::spawn(async move { swap_in(&models, Some(&control), &metrics, &uri).await })
        };
        Some(Self { uri, loading, deadline: tokio::time::Instant::now() + settings.announced_wait })
    }

    /// Waits until the announced model serves, was refused, or the deadline passed (then it goes
    /// on loading and swaps in when ready).
    pub(crate) async fn wait(self) {
        let uri = self.uri;
        match tokio::time::timeout_at(self.deadline, self.loading).await {
            Ok(Ok(true)) => {}
            Ok(_) => tracing::warn!(uri, "the announced model could not be loaded; the configured model serves"),
            Err(_) => tracing::warn!(uri, "the announced model is not loaded within model.announced_wait_ms; the configured model serves until it is"),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
