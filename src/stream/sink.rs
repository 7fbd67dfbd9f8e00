//! Sink: turns outcomes into score, anomaly and dead-letter records plus heatmap blobs, and
//! hands each input's records to `Delivery`, which marks the input finished once they are safe.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{HeatmapPolicy, Settings};
use crate::delivery::record::OutRecord;
use crate::delivery::Delivery;
use crate::event::{dead_letter_headers, Latency, Rejection, ScoreRecord};
use crate::inference::heatmap;
use crate::inference::model::RuntimeThresholds;
use crate::inspect::Recent;
use crate::store::BlobStore;
use crate::stream::pipeline::{Job, Outcome, OutcomeSink, Scored};
use crate::telemetry::{InternalEvent, Metrics};

/// What the sink needs to build records.
pub(crate) struct SinkSettings {
    pub scores_topic: String,
    pub anomalies_topic: Option<String>,
    pub dead_letter_topic: String,
    pub heatmap_policy: HeatmapPolicy,
    pub overlay: bool,
    /// Blob key prefix: empty for the live operator, `replay/<id>` for replays.
    pub heatmap_prefix: String,
    /// A heatmap write (retries included) that takes longer is given up: the score goes out.
    pub heatmap_write_timeout: Duration,
}

impl SinkSettings {
    /// A replay's outputs: its own scores and dead-letter topics, no anomalies topic, and
    /// heatmaps under `replay/<id>` so they never overwrite the live ones.
    pub(crate) fn for_replay(s: &Settings, scores_topic: &str, dead_letter_topic: &str, replay_id: &str) -> Self {
        Self {
            scores_topic: scores_topic.to_string(),
            anomalies_topic: None,
            dead_letter_topic: dead_letter_topic.to_string(),
            heatmap_prefix: format!("replay/{replay_id}"),
            ..Self::from_settings(s)
        }
    }

    pub(crate) fn from_settings(s: &Settings) -> Self {
        Self {
            scores_topic: s.topics.scores.clone(),
            anomalies_topic: s.topics.anomalies.clone(),
            dead_letter_topic: s.topics.dead_letter.clone(),
            heatmap_policy: s.heatmap.policy,
            overlay: s.heatmap.overlay,
            heatmap_prefix: String::new(),
            heatmap_write_timeout: s.heatmap.write_timeout,
        }
    }
}

/// What judges a score beside the model: thresholds changed at runtime, and the inspection
/// page's ring buffer.
#[derive(Clone, Default)]
pub(crate) struct Oversight {
    pub thresholds: Arc<RuntimeThresholds>,
    pub recent: Option<Arc<Recent>>,
}

struct Inner {
    settings: SinkSettings,
    oversight: Oversight,
    store: Option<BlobStore>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub(crate) struct KafkaSink {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
}

impl KafkaSink {
    pub(crate) fn new(
        settings: SinkSettings,
        oversight: Oversight,
        store: Option<BlobStore>,
        delivery: Arc<Delivery>,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self { inner: Arc::new(Inner { settings, oversight, store, delivery, metrics }), runtime }
    }
}

impl OutcomeSink for KafkaSink {
    fn accept(&self, outcome: Outcome) {
        let inner = self.inner.clone();
        self.runtime.spawn(async move {
            use futures::FutureExt;
            // A panic here would leave the input unfinished for good: stop the instance instead,
            // so nothing is committed past it and a restart scores it again.
            if let Err(panic) = std::panic::AssertUnwindSafe(inner.handle(outcome)).catch_unwind().await {
                let what = super::panic_message(panic.as_ref());
                inner.delivery.fatal().set(format!("a sink task panicked: {what}"));
            }
        });
    }
}

impl Inner {
    async fn handle(&self, outcome: Outcome) {
        let job = outcome.job().without_payload();
        if !self.delivery.tracker().is_current(&job.ticket) {
            return; // revoked or rewound: the new owner scores it again
        }
        let span = crate::telemetry::image_span(&job.headers, &job.ticket.topic, job.ticket.partition, job.ticket.offset);
        let records = match outcome {
            Outcome::Scored(scored) => self.score_records(*scored, &span).await,
            Outcome::Rejected { job, rejection } => vec![self.dead_letter(job, &rejection)],
        };
        if self.delivery.deliver(&job.ticket, records).await {
            self.metrics.end_to_end_seconds.observe(job.consumed_at.elapsed().as_secs_f64());
        }
    }

    fn dead_letter(&self, job: Job, rejection: &Rejection) -> OutRecord {
        self.metrics.emit(InternalEvent::DeadLettered {
            kind: rejection.kind.as_str(),
            error: &rejection.message,
            class: crate::event::header_str(&job.headers, crate::event::HEADER_CLASS),
            source: &job.ticket.to_string(),
        });
        let source = job.source();
        OutRecord {
            topic: self.settings.dead_letter_topic.clone(),
            key: job.key,
            payload: job.value,
            headers: dead_letter_headers(&job.headers, rejection, &source),
        }
    }

    async fn score_records(&self, scored: Scored, span: &tracing::Span) -> Vec<OutRecord> {
        let Scored { job, model, event, input, raw_score, map, inference_ms } = scored;
        let class = event.class.as_deref();
        let runtime = self.oversight.thresholds.get(&model.model.version, model.scorer.class_key(class));
        let verdict = model.scorer.judge_with(class, raw_score, runtime);
        let wants_heatmap = self.settings.heatmap_policy.wants(verdict.is_anomaly) && self.store.is_some();
        let thumbnail_px = self.oversight.recent.as_ref().filter(|r| r.wants_thumbnail(verdict.is_anomaly)).map(|r| r.thumbnail_px());
        // Rendering is CPU work: off the async executor, both images in one go.
        let (png, thumbnail) = if wants_heatmap || thumbnail_px.is_some() {
            let (overlay, calibration, size) = (self.settings.overlay, verdict.calibration, input.size);
            tokio::task::spawn_blocking(move || {
                let png = wants_heatmap.then(|| heatmap::render_png(&map, size, &calibration, overlay.then_some(input.rgb.as_slice())));
                (png, thumbnail_px.map(|px| heatmap::thumbnail_jpeg(&map, size, &calibration, &input.rgb, px)))
            })
            .await
            .expect("heatmap render")
        } else {
            (None, None)
        };
        let mut heatmap_uri = None;
        if let (Some(png), Some(store)) = (png, &self.store) {
            let key = heatmap::key(&self.settings.heatmap_prefix, &model.model.version, &job.ticket.topic, job.ticket.partition, job.ticket.offset);
            let timeout = self.settings.heatmap_write_timeout;
            // Best effort: the score still goes out, with `heatmap_uri: null`. Transient S3 errors
            // are retried by the object_store client (`store::s3_client`) within the timeout; a
            // failed local write (disk full, permissions) does not heal in milliseconds.
            let written = match tokio::time::timeout(timeout, store.put(&key, png)).await {
                Ok(Ok(uri)) => Ok(uri),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err(format!("timed out after {timeout:?} (heatmap.write_timeout_ms)")),
            };
            self.metrics.emit(InternalEvent::HeatmapStored { key: &key, failure: written.as_ref().err().map(String::as_str) });
            heatmap_uri = written.ok();
        }
        let queue_ms = job.timestamp.map_or(0.0, |ts| {
            let consumed_wall = chrono::Utc::now().timestamp_millis() as f64 - job.consumed_at.elapsed().as_secs_f64() * 1000.0;
            (consumed_wall - ts as f64).max(0.0)
        });
        let record = ScoreRecord {
            schema_version: crate::event::SCORE_SCHEMA_VERSION,
            image_id: event.image_id.clone(),
            class: event.class.clone(),
            score: verdict.score,
            raw_score,
            threshold: verdict.threshold,
            threshold_source: verdict.threshold_source,
            is_anomaly: verdict.is_anomaly,
            heatmap_uri,
            model: model.model.clone(),
            source: job.source(),
            scored_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            latency_ms: Latency { queue: queue_ms, inference: inference_ms, total: job.consumed_at.elapsed().as_secs_f64() * 1000.0 },
            attributes: event.attributes.clone(),
        };
        self.metrics.emit(InternalEvent::Scored { anomaly: verdict.is_anomaly, class, source: &job.ticket.to_string() });
        if let Some(recent) = &self.oversight.recent {
            recent.push(&record, thumbnail, &model.engine.info.classes);
        }
        let payload = serde_json::to_vec(&record).expect("score record serialises");
        let mut headers: Vec<(String, Vec<u8>)> =
            crate::telemetry::output_trace_headers(span, &job.headers).into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        headers.push((crate::event::HEADER_SOURCE.into(), job.ticket.to_string().into_bytes()));
        let score = OutRecord { topic: self.settings.scores_topic.clone(), key: Some(event.image_id.clone().into_bytes()), payload: Some(payload), headers };
        let mut out = vec![score.clone()];
        if let (true, Some(topic)) = (verdict.is_anomaly, &self.settings.anomalies_topic) {
            out.push(OutRecord { topic: topic.clone(), ..score });
        }
        out
    }
}
