//! Hot reload: a thread that swaps models in when one is announced on the control topic, or
//! when the file at `model.path` changes (with `model.watch_interval_ms`). Loading, checking and
//! warming up happen here, beside the serving model; the swap itself is one pointer write that
//! the engine workers see at their next batch.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::Settings;
use crate::control::{Change, ControlState};
use crate::inference::active::{fetch_model, ActiveModel, ModelSlot};
use crate::telemetry::{InternalEvent, Metrics};

pub struct Reloader {
    pub models: Arc<ModelSlot>,
    pub control: Option<Arc<ControlState>>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
}

impl Reloader {
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("model-reload".into()).spawn(move || self.run(&stop))
    }

    fn run(&self, stop: &AtomicBool) {
        let watch = self.settings.model.watch_interval;
        let path = Path::new(&self.settings.model.path).to_path_buf();
        let mut seen = modified(&path);
        let mut last_check = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let announced = match &self.control {
                Some(state) => state.next_model(Duration::from_millis(200)),
                None => {
                    std::thread::sleep(Duration::from_millis(200));
                    None
                }
            };
            if let Some(Change::Model { uri, by, .. }) = announced {
                tracing::info!(uri, by, "model announced on the control topic");
                self.load(&uri, false);
                continue;
            }
            if !watch.is_zero() && last_check.elapsed() >= watch {
                last_check = Instant::now();
                let now = modified(&path);
                // Only a file that is still the one serving is watched: an announced model wins.
                if now != seen && self.models.current().source == self.settings.model.path {
                    seen = now;
                    tracing::info!(path = %path.display(), "model file changed");
                    self.load(&self.settings.model.path, true);
                }
            }
        }
    }

    /// Loads, checks and swaps in `uri`; on failure the active model keeps serving. Unless
    /// `again` (a changed file), a URI that already serves is left alone.
    fn load(&self, uri: &str, again: bool) {
        if !again && self.models.current().source == uri {
            // E.g. the announcement read again at a restart: it is what serves already.
            tracing::debug!(uri, "announced model is already serving");
            return;
        }
        let dir = std::env::temp_dir().join("dcam-models");
        // Before its first batch: its runtime thresholds are in force and its classes are labels.
        let before_swap = |candidate: &ActiveModel| {
            if let Some(control) = &self.control {
                control.model_loaded(&candidate.engine.info);
            }
            self.metrics.set_classes(&candidate.engine.info.classes);
        };
        let result =
            self.runtime.block_on(fetch_model(uri, &self.settings, &dir)).and_then(|file| self.models.load_and_swap(&file, uri, &self.settings, before_swap));
        match result {
            Ok(active) => self.metrics.emit(InternalEvent::ModelSwapped { name: &active.model.name, version: &active.model.version, source: uri }),
            Err(e) => self.metrics.emit(InternalEvent::ModelRejected { source: uri, error: &format!("{e:#}") }),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
