//! The Prometheus registry: every metric the operator exports, and the internal events that
//! move them together with their log lines.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Things that happen inside the operator that users count and read about. Each is one
/// `Metrics::emit` call, which writes its log line and moves its counters together, so the two
/// never disagree.
#[derive(Debug, Clone, Copy)]
pub enum InternalEvent<'a> {
    /// A runtime change (threshold, model) was published through the API.
    ControlChange { kind: &'a str },
    /// A control-topic record was not applied (`reason`: unsigned, bad_signature, ...).
    ControlRecordIgnored { reason: &'a str, offset: i64, detail: &'a str },
    /// A model was swapped in (hot reload).
    ModelSwapped { name: &'a str, version: &'a str, source: &'a str },
    /// A model was refused (contract, input size, warm-up); the active one keeps serving.
    ModelRejected { source: &'a str, error: &'a str },
    /// An input was scored (`source` = `topic/partition/offset`).
    Scored { anomaly: bool, class: Option<&'a str>, source: &'a str },
    /// A new transactional producer replaced one that failed for good.
    ProducerRenewed,
    /// An exactly-once transaction committed `records` outputs with their offsets.
    TransactionCommitted { records: usize },
    /// An exactly-once transaction aborted (the caller rewinds and logs what follows).
    TransactionAborted,
    /// A publish failed for a reason that may pass and is tried again.
    PublishRetried { topic: &'a str, reason: &'a str, error: &'a str },
    /// A heatmap was stored (`uri`) or not (`failure`: why; the score goes out without it).
    HeatmapStored { key: &'a str, failure: Option<&'a str> },
    /// An input went to the dead-letter topic.
    DeadLettered { kind: &'a str, error: &'a str, class: Option<&'a str>, source: &'a str },
    /// The broker refused an output for good; its stand-in dead letter goes instead.
    OutputRefused { topic: &'a str, bytes: usize, error: &'a str },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishRetryLabels {
    /// A configured output topic.
    pub topic: String,
    /// librdkafka's error code name.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThresholdLabels {
    /// A model class (or `default`).
    pub class: String,
    /// `model`, `config` or `runtime`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// Plain totals for summaries (replay, demo); the labelled families are for Prometheus.
#[derive(Default, Debug)]
pub struct Totals {
    pub scored: std::sync::atomic::AtomicU64,
    pub anomalies: std::sync::atomic::AtomicU64,
    pub dead_letters: std::sync::atomic::AtomicU64,
}

pub(crate) const CLASS_NONE: &str = "_none";
pub(crate) const CLASS_OTHER: &str = "_other";

/// Every metric the operator exports.
pub struct Metrics {
    pub totals: Totals,
    /// Class label values allowed on `images`: the classes of the model in force. Label values
    /// never come from input as such (docs/DESIGN.md §8: prometheus-client does not escape them,
    /// and every new value would be a new series).
    classes: std::sync::RwLock<std::collections::BTreeSet<String>>,
    pub registry: Mutex<Registry>,
    pub images: Family<OutcomeLabels, Counter>,
    pub dead_letters: Family<KindLabels, Counter>,
    pub batch_size: Histogram,
    pub batches: Counter,
    pub batched_images: Counter,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub in_flight_bytes: Gauge,
    pub publish_retries: Family<PublishRetryLabels, Counter>,
    pub inference_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    pub partitions_paused: Gauge,
    pub caught_up_pauses: Counter,
    pub seconds_since_progress: Gauge,
    /// 1 while `/readyz` would answer 200; set at each scrape.
    pub ready: Gauge,
    /// The raw-score threshold in force per class, with where it comes from; set at each scrape.
    pub threshold: Family<ThresholdLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub provider: Family<ProviderLabels, Gauge>,
    pub transactions: Family<KindLabels, Counter>,
    pub heatmaps: Family<KindLabels, Counter>,
    pub model_info: Family<ModelLabels, Gauge>,
    pub model_reloads: Family<KindLabels, Counter>,
    pub control_changes: Family<KindLabels, Counter>,
    pub control_records_ignored: Family<ReasonLabels, Counter>,
    /// Sum of `consumer_lag` over partitions, for the live page.
    pub total_lag: std::sync::atomic::AtomicI64,
    dead_letter_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    known_models: Mutex<Vec<ModelLabels>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub version: String,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            totals: Totals::default(),
            classes: std::sync::RwLock::default(),
            registry: Mutex::new(Registry::with_prefix("dcam")),
            images: Family::default(),
            dead_letters: Family::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            batches: Counter::default(),
            batched_images: Counter::default(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            in_flight_bytes: Gauge::default(),
            publish_retries: Family::default(),
            inference_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            end_to_end_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            consumer_lag: Family::default(),
            partitions_paused: Gauge::default(),
            caught_up_pauses: Counter::default(),
            seconds_since_progress: Gauge::default(),
            ready: Gauge::default(),
            threshold: Family::default(),
            provider: Family::default(),
            transactions: Family::default(),
            heatmaps: Family::default(),
            model_info: Family::default(),
            model_reloads: Family::default(),
            control_changes: Family::default(),
            control_records_ignored: Family::default(),
            total_lag: Default::default(),
            dead_letter_kinds: Mutex::default(),
            known_models: Mutex::default(),
        };
        {
            let mut r = m.registry.lock().expect("fresh");
            r.register("model_info", "The model serving now (1) and the ones before it (0)", m.model_info.clone());
            r.register("model_reloads", "Model hot reloads by result (swapped, rejected)", m.model_reloads.clone());
            r.register("control_changes", "Runtime changes published through the API, by kind (threshold, model)", m.control_changes.clone());
            r.register(
                "control_records_ignored",
                "Control-topic records not applied, by reason (unsigned, bad_signature, unreadable, key_mismatch, invalid_value, unknown_class, unknown_version)",
                m.control_records_ignored.clone(),
            );
            r.register("images", "Input events by outcome (normal, anomaly, dead_letter) and class", m.images.clone());
            r.register("dead_letters", "Dead-lettered inputs by error kind", m.dead_letters.clone());
            r.register("batch_size", "Images per model run", m.batch_size.clone());
            r.register("batches", "Model runs", m.batches.clone());
            r.register("batched_images", "Images run through the model (batched_images / batches = average batch size)", m.batched_images.clone());
            r.register("queue_depth", "Decoded images waiting for a batch", m.queue_depth.clone());
            r.register("in_flight", "Consumed events not yet committed (back-pressure pauses at pipeline.max_in_flight)", m.in_flight.clone());
            r.register(
                "in_flight_bytes",
                "Payload bytes of consumed events not yet committed (pauses at pipeline.max_in_flight_bytes)",
                m.in_flight_bytes.clone(),
            );
            r.register("publish_retries", "Output records re-sent after a transient broker error, by topic and error", m.publish_retries.clone());
            r.register("inference_seconds", "Model run time per batch", m.inference_seconds.clone());
            r.register("end_to_end_seconds", "From consume to all outputs acknowledged", m.end_to_end_seconds.clone());
            r.register(
                "consumer_lag",
                "High watermark minus the committable position, for every assigned partition (the group's committed offset where nothing was read yet)",
                m.consumer_lag.clone(),
            );
            r.register("ready", "1 while /readyz answers 200 (started, no partition stuck, not stalled)", m.ready.clone());
            r.register("threshold", "Raw-score threshold in force per class, by source (model, config, runtime)", m.threshold.clone());
            r.register(
                "partitions_paused",
                "Assigned partitions paused by back-pressure, recovery, or while caught up with work to score",
                m.partitions_paused.clone(),
            );
            r.register(
                "caught_up_pauses",
                "Times fetching stopped because every assigned partition was read to its end while the pipeline had more than its refill mark to score",
                m.caught_up_pauses.clone(),
            );
            r.register(
                "seconds_since_progress",
                "Seconds with consumer lag and no input finished (0 while inputs finish or nothing lags); /readyz fails past pipeline.stuck_after_ms",
                m.seconds_since_progress.clone(),
            );
            r.register("execution_provider", "1 for the ONNX Runtime execution provider in use", m.provider.clone());
            r.register("transactions", "Kafka transactions by result (committed, aborted)", m.transactions.clone());
            r.register("heatmaps", "Heatmap writes by result (written, failed: the score went out without one)", m.heatmaps.clone());
        }
        Arc::new(m)
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().expect("registry")).expect("encode metrics");
        out
    }

    /// Marks `name`/`version` as the model serving now, and every other one as not.
    pub fn set_model(&self, name: &str, version: &str) {
        let current = ModelLabels { name: name.into(), version: version.into() };
        let known: Vec<ModelLabels> = self.known_models.lock().expect("metrics").clone();
        for m in known.iter().filter(|m| **m != current) {
            self.model_info.get_or_create(m).set(0);
        }
        self.model_info.get_or_create(&current).set(1);
        let mut known = self.known_models.lock().expect("metrics");
        if !known.contains(&current) {
            known.push(current);
        }
    }

    /// Dead letters so far by kind.
    pub fn dead_letter_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.dead_letter_kinds.lock().expect("metrics").clone()
    }

    /// Sets the classes that may appear as label values: the model in force's (again at each swap).
    pub fn set_classes(&self, classes: &[String]) {
        *self.classes.write().expect("metrics") = classes.iter().cloned().collect();
    }

    /// The label value for an input's class: a model class, `_none` without one, `_other` else.
    pub fn class_label(&self, class: Option<&str>) -> String {
        match class {
            None => CLASS_NONE.into(),
            Some(c) if self.classes.read().expect("metrics").contains(c) => c.into(),
            Some(_) => CLASS_OTHER.into(),
        }
    }

    /// Records what happened to one input: its log line and its counters, in one call.
    pub fn emit(&self, event: InternalEvent<'_>) {
        match event {
            InternalEvent::Scored { anomaly, class, source } => {
                tracing::debug!(source, anomaly, "scored");
                let outcome = if anomaly { "anomaly" } else { "normal" };
                self.totals.scored.fetch_add(1, Ordering::Relaxed);
                if anomaly {
                    self.totals.anomalies.fetch_add(1, Ordering::Relaxed);
                }
                self.images.get_or_create(&OutcomeLabels { outcome: outcome.into(), class: self.class_label(class) }).inc();
            }
            InternalEvent::DeadLettered { kind, error, class, source } => {
                tracing::warn!(source, kind, error, "dead-lettering input");
                self.totals.dead_letters.fetch_add(1, Ordering::Relaxed);
                *self.dead_letter_kinds.lock().expect("metrics").entry(kind.to_string()).or_default() += 1;
                self.dead_letters.get_or_create(&KindLabels { kind: kind.into() }).inc();
                self.images.get_or_create(&OutcomeLabels { outcome: "dead_letter".into(), class: self.class_label(class) }).inc();
            }
            InternalEvent::ControlChange { kind } => {
                self.control_changes.get_or_create(&KindLabels { kind: kind.into() }).inc();
            }
            InternalEvent::ControlRecordIgnored { reason, offset, detail } => {
                // Logged once per reason: whoever floods the topic does not flood the logs too.
                if self.control_records_ignored.get_or_create(&ReasonLabels { reason: reason.into() }).inc() == 0 {
                    tracing::warn!(
                        reason,
                        offset,
                        detail,
                        "ignoring a control record; further ones for this reason are only counted (dcam_control_records_ignored_total)"
                    );
                }
            }
            InternalEvent::ModelSwapped { name, version, source } => {
                tracing::info!(name, version, source, "model swapped in");
                self.model_reloads.get_or_create(&KindLabels { kind: "swapped".into() }).inc();
                self.set_model(name, version);
            }
            InternalEvent::ModelRejected { source, error } => {
                tracing::error!(source, error, "model rejected; the active model keeps serving");
                self.model_reloads.get_or_create(&KindLabels { kind: "rejected".into() }).inc();
            }
            InternalEvent::ProducerRenewed => {
                tracing::warn!("a new transactional producer took over; uncommitted work is read again from the committed offsets");
                self.transactions.get_or_create(&KindLabels { kind: "producer_renewed".into() }).inc();
            }
            InternalEvent::TransactionCommitted { records } => {
                tracing::debug!(records, "transaction committed");
                self.transactions.get_or_create(&KindLabels { kind: "committed".into() }).inc();
            }
            InternalEvent::TransactionAborted => {
                self.transactions.get_or_create(&KindLabels { kind: "aborted".into() }).inc();
            }
            InternalEvent::PublishRetried { topic, reason, error } => {
                tracing::warn!(topic, reason, error, "publish failed, retrying");
                self.publish_retries.get_or_create(&PublishRetryLabels { topic: topic.into(), reason: reason.into() }).inc();
            }
            InternalEvent::HeatmapStored { key, failure } => {
                if let Some(error) = failure {
                    tracing::error!(key, error, "heatmap not stored; publishing the score without it");
                }
                let kind = if failure.is_none() { "written" } else { "failed" };
                self.heatmaps.get_or_create(&KindLabels { kind: kind.into() }).inc();
            }
            InternalEvent::OutputRefused { topic, bytes, error } => {
                tracing::error!(topic, bytes, error, "the broker refused an output for good; publishing a truncated dead letter instead");
                self.dead_letters.get_or_create(&KindLabels { kind: crate::event::TOO_LARGE_OUTPUT.into() }).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_labels_come_only_from_the_model() {
        let m = Metrics::new();
        m.set_classes(&["bottle".to_string()]);
        m.emit(InternalEvent::Scored { anomaly: false, class: Some("bottle"), source: "in/0/0" });
        m.emit(InternalEvent::DeadLettered { kind: "decode", error: "bad", class: Some("x\"} 1\ndcam_injected_total 42\n#"), source: "in/0/1" });
        m.emit(InternalEvent::Scored { anomaly: false, class: None, source: "in/0/2" });
        let text = m.encode();
        assert!(!text.contains("injected"), "{text}");
        assert!(text.contains(r#"dcam_images_total{outcome="dead_letter",class="_other"} 1"#), "{text}");
        assert!(text.contains(r#"dcam_images_total{outcome="normal",class="bottle"} 1"#), "{text}");
        assert!(text.contains(r#"dcam_images_total{outcome="normal",class="_none"} 1"#), "{text}");
        // One event moves the per-kind counter and the totals together.
        assert!(text.contains(r#"dcam_dead_letters_total{kind="decode"} 1"#), "{text}");
        assert_eq!((m.totals.scored.load(Ordering::Relaxed), m.totals.dead_letters.load(Ordering::Relaxed)), (2, 1));
    }

    #[test]
    fn class_labels_follow_the_model_in_force() {
        let m = Metrics::new();
        m.set_classes(&["bottle".to_string()]);
        m.emit(InternalEvent::Scored { anomaly: false, class: Some("screw"), source: "in/0/0" });
        // A model with a new class is swapped in.
        m.set_classes(&["bottle".to_string(), "screw".to_string()]);
        m.emit(InternalEvent::Scored { anomaly: false, class: Some("screw"), source: "in/0/1" });
        m.emit(InternalEvent::Scored { anomaly: false, class: Some("tile"), source: "in/0/2" });
        let text = m.encode();
        assert!(text.contains(r#"dcam_images_total{outcome="normal",class="screw"} 1"#), "{text}");
        assert!(text.contains(r#"dcam_images_total{outcome="normal",class="_other"} 2"#), "{text}");
    }
}
