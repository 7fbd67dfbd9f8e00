//! What `/healthz` and `/readyz` answer: readiness, the source loop's heartbeat, stuck
//! partitions and stalls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What `/readyz` reports, and the heartbeat behind `/healthz`.
#[derive(Default)]
pub(crate) struct Health {
    pub ready: AtomicBool,
    pub details: Mutex<serde_json::Value>,
    pub started: std::sync::OnceLock<Instant>,
    /// Milliseconds since `started` of the source loop's last turn; 0 = not running yet.
    heartbeat_ms: std::sync::atomic::AtomicU64,
    /// Partitions whose oldest record has waited too long (`pipeline.stuck_after_ms`).
    stuck: Mutex<Vec<String>>,
    /// Lag with no input finished for longer than `pipeline.stuck_after_ms`: why, if so.
    stalled: Mutex<Option<String>>,
}

/// A source loop silent for longer than this is stuck: `/healthz` fails so the pod restarts.
pub(crate) const HEARTBEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

impl Health {
    pub(crate) fn new() -> Arc<Self> {
        let h = Self::default();
        let _ = h.started.set(Instant::now());
        Arc::new(h)
    }

    pub(crate) fn set_ready(&self, ready: bool, details: serde_json::Value) {
        *self.details.lock().expect("health") = details;
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Ready: started, no partition stuck and not stalled.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.stuck.lock().expect("health").is_empty() && self.stalled.lock().expect("health").is_none()
    }

    pub(crate) fn set_stalled(&self, why: Option<String>) {
        let mut stalled = self.stalled.lock().expect("health");
        match (&*stalled, &why) {
            (None, Some(why)) => tracing::warn!(%why, "stalled: not ready until inputs finish again"),
            (Some(_), None) => tracing::info!("progress again: ready"),
            _ => {}
        }
        *stalled = why;
    }

    pub(crate) fn set_stuck(&self, partitions: Vec<String>) {
        let mut stuck = self.stuck.lock().expect("health");
        if partitions.len() > stuck.len() {
            tracing::warn!(?partitions, "partitions stuck: not ready until they move");
        }
        *stuck = partitions;
    }

    /// `/readyz`: whether ready, and the details with the stuck partitions.
    pub(crate) fn report(&self) -> (bool, serde_json::Value) {
        let ready = self.is_ready();
        let mut body = self.details.lock().expect("health").clone();
        if let serde_json::Value::Object(ref mut o) = body {
            o.insert("ready".into(), ready.into());
            o.insert("stuck_partitions".into(), self.stuck.lock().expect("health").clone().into());
            o.insert("stalled".into(), self.stalled.lock().expect("health").clone().into());
        } else {
            body = serde_json::json!({ "ready": ready });
        }
        (ready, body)
    }

    /// Called by the source loop on every turn.
    pub(crate) fn beat(&self) {
        let ms = self.started.get().map_or(0, |s| s.elapsed().as_millis() as u64).max(1);
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// Alive unless the source loop has started and then stopped turning.
    pub(crate) fn is_alive(&self) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        let now = self.started.get().map_or(0, |s| s.elapsed().as_millis() as u64);
        last == 0 || now.saturating_sub(last) < HEARTBEAT_TIMEOUT.as_millis() as u64
    }
}
