//! The control plane (docs/DESIGN.md §9): runtime threshold changes and model announcements on a
//! compacted topic (`topics.control`) that every replica reads from the beginning. All replicas,
//! and every restart, end up with the same values: the latest record per key wins. A record is
//! applied only when it carries a valid signature (with `control.signing_key`) and passes the same
//! checks as the API's writes; threshold records are kept only for classes of models this replica
//! loaded (or a bounded few waiting for a model not loaded yet). Each change made through the API
//! also goes to the audit topic (`topics.control_audit`), which compaction never thins out.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::{ControlSettings, KafkaSettings, TopicSettings, MIN_SIGNING_KEY_BYTES};
use crate::delivery::record::OutRecord;
use crate::inference::model::{ModelInfo, RuntimeThresholds, DEFAULT_CLASS};
use crate::kafka;
use crate::shutdown::Shutdown;
use crate::telemetry::{InternalEvent, Metrics};

/// One record on the control topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Change {
    /// A class's threshold (raw score units) for one model version; `threshold: null` goes back
    /// to the model's calibration. Thresholds belong to a model version: a new model's scores
    /// are on its own scale, so it starts from its own calibration.
    Threshold { class: String, model_version: String, threshold: Option<f32>, previous: Option<f32>, by: String, at: String },
    /// Load this model (a path on the pods, or an `s3://` URI) and swap it in.
    Model { uri: String, by: String, at: String },
}

impl Change {
    /// The compaction key: one live record per class and model version, one for the model.
    pub(crate) fn key(&self) -> String {
        match self {
            Change::Threshold { class, model_version, .. } => format!("threshold/{model_version}/{class}"),
            Change::Model { .. } => "model".into(),
        }
    }

    pub(crate) fn now() -> String {
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

/// Why a threshold change is refused: the same checks at the API and on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThresholdRefusal {
    /// Not a finite number (e.g. `1e39`, which is +inf as an `f32`).
    NotFinite,
    /// Not a class of the model (nor `_default`).
    UnknownClass,
}

/// Checks a threshold change against the model it is for (`classes`): a finite number, or `null`
/// for the model's calibration, for one of its classes or `_default`.
pub(crate) fn check_threshold(classes: &[String], class: &str, threshold: Option<f32>) -> Result<(), ThresholdRefusal> {
    if threshold.is_some_and(|t| !t.is_finite()) {
        return Err(ThresholdRefusal::NotFinite);
    }
    if class != DEFAULT_CLASS && !classes.iter().any(|c| c == class) {
        return Err(ThresholdRefusal::UnknownClass);
    }
    Ok(())
}

/// The Kafka header that carries a control record's signature: the hex HMAC-SHA256 of
/// `signed_message` under `control.signing_key`.
pub(crate) const SIGNATURE_HEADER: &str = "dcam-signature";

/// What a control record's signature covers: the record key's length (4 bytes, big-endian), the
/// key, then the value (the JSON record: every field that is applied). The length pins the
/// boundary, so no bytes can move from the key to the value.
pub(crate) fn signed_message(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(4 + key.len() + value.len());
    message.extend_from_slice(&(key.len() as u32).to_be_bytes());
    message.extend_from_slice(key);
    message.extend_from_slice(value);
    message
}

/// The key the API signs control records with and every replica checks them with.
pub(crate) struct SigningKey(ring::hmac::Key);

impl SigningKey {
    pub(crate) fn new(secret: &[u8]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// `control.signing_key`, or the content of `control.signing_key_file`; `None` when neither is set.
    pub(crate) fn from_settings(c: &ControlSettings) -> Result<Option<Self>> {
        let secret = match (&c.signing_key_file, c.signing_key.expose()) {
            (Some(path), _) => std::fs::read_to_string(path).with_context(|| format!("reading control.signing_key_file {path}"))?.trim().to_string(),
            (None, Some(inline)) => inline.to_string(),
            (None, None) => return Ok(None),
        };
        if secret.len() < MIN_SIGNING_KEY_BYTES {
            bail!("the control signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes (e.g. openssl rand -hex 32)");
        }
        Ok(Some(Self::new(secret.as_bytes())))
    }

    /// The signature header value for a record with this key and value.
    pub(crate) fn sign(&self, key: &[u8], value: &[u8]) -> String {
        ring::hmac::sign(&self.0, &signed_message(key, value)).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Compares in constant time (ring), so the time taken says nothing about the right MAC.
    fn verify(&self, key: &[u8], value: &[u8], signature_hex: &[u8]) -> bool {
        let Some(mac) = from_hex(signature_hex) else { return false };
        ring::hmac::verify(&self.0, &signed_message(key, value), &mac).is_ok()
    }
}

fn from_hex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()).collect()
}

/// Why a control record was not applied: the `reason` label of `dcam_control_records_ignored_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ignored {
    /// No signature header although a signing key is configured.
    Unsigned,
    BadSignature,
    /// Not a control record this version understands (not JSON, NaN, an unknown kind).
    Unreadable,
    /// The record key is not the one its content belongs under (it would escape compaction).
    KeyMismatch,
    /// The value fails `check_threshold` (not finite).
    InvalidValue,
    /// A class the record's model version does not have.
    UnknownClass,
    /// For a model version not loaded here, with `MAX_PENDING` such thresholds already waiting.
    UnknownVersion,
}

impl Ignored {
    fn reason(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::BadSignature => "bad_signature",
            Self::Unreadable => "unreadable",
            Self::KeyMismatch => "key_mismatch",
            Self::InvalidValue => "invalid_value",
            Self::UnknownClass => "unknown_class",
            Self::UnknownVersion => "unknown_version",
        }
    }
}

/// Threshold records for model versions this replica has not loaded may wait for that model (one
/// announced just before, or one a rollback may bring back) up to this many; more are ignored.
const MAX_PENDING: usize = 256;

/// What threshold records are checked against: the models this replica loaded (version →
/// classes), and the records waiting for a model it has not loaded yet. Together with the
/// class check this bounds the runtime thresholds by real classes, whatever is on the topic.
#[derive(Default)]
struct Catalogue {
    models: BTreeMap<String, Vec<String>>,
    /// (model version, class) → (threshold, the record's offset for the count if it is dropped).
    pending: BTreeMap<(String, String), (f32, i64)>,
}

/// What a replica has applied from the control topic.
pub(crate) struct ControlState {
    pub thresholds: Arc<RuntimeThresholds>,
    metrics: Arc<Metrics>,
    catalogue: Mutex<Catalogue>,
    /// Highest offset applied per partition, for read-your-writes.
    applied: Mutex<BTreeMap<i32, i64>>,
    changed: Condvar,
    /// The latest model announcement, for the reloader.
    model: Mutex<Option<Change>>,
    model_changed: Condvar,
}

impl ControlState {
    fn new(thresholds: Arc<RuntimeThresholds>, metrics: Arc<Metrics>, model: &ModelInfo) -> Self {
        let state = Self {
            thresholds,
            metrics,
            catalogue: Mutex::default(),
            applied: Mutex::default(),
            changed: Condvar::new(),
            model: Mutex::default(),
            model_changed: Condvar::new(),
        };
        state.model_loaded(model);
        state
    }

    /// Called once a model is loaded, before it serves: its thresholds waiting in the catalogue
    /// are applied (those for classes it lacks are dropped and counted).
    pub(crate) fn model_loaded(&self, model: &ModelInfo) {
        let mut catalogue = self.catalogue.lock().expect("control");
        catalogue.models.insert(model.version.clone(), model.classes.clone());
        let waiting: Vec<_> = catalogue.pending.keys().filter(|(version, _)| *version == model.version).cloned().collect();
        for key in waiting {
            let (threshold, offset) = catalogue.pending.remove(&key).expect("listed");
            let (version, class) = key;
            match check_threshold(&model.classes, &class, Some(threshold)) {
                Ok(()) => self.thresholds.set(&version, &class, Some(threshold)),
                Err(_) => self.ignore(Ignored::UnknownClass, offset, &format!("model {version} has no class {class:?}")),
            }
        }
    }

    fn ignore(&self, why: Ignored, offset: i64, detail: &str) {
        self.metrics.emit(InternalEvent::ControlRecordIgnored { reason: why.reason(), offset, detail });
    }

    fn apply(&self, change: Change, offset: i64) -> Result<(), (Ignored, String)> {
        match change {
            Change::Threshold { class, model_version, threshold, by, .. } => {
                let mut catalogue = self.catalogue.lock().expect("control");
                let Some(classes) = catalogue.models.get(&model_version) else {
                    let key = (model_version, class);
                    match threshold {
                        None => {
                            catalogue.pending.remove(&key);
                        }
                        Some(t) if !t.is_finite() => return Err((Ignored::InvalidValue, format!("threshold {t} is not a finite number"))),
                        Some(_) if catalogue.pending.len() >= MAX_PENDING && !catalogue.pending.contains_key(&key) => {
                            return Err((Ignored::UnknownVersion, format!("model version {:?} is not loaded here", key.0)));
                        }
                        Some(t) => {
                            tracing::info!(class = key.1, model_version = key.0, threshold = t, by, "threshold kept until its model is loaded");
                            catalogue.pending.insert(key, (t, offset));
                        }
                    }
                    return Ok(());
                };
                match check_threshold(classes, &class, threshold) {
                    Ok(()) => {
                        tracing::info!(class, model_version, ?threshold, by, "threshold applied");
                        self.thresholds.set(&model_version, &class, threshold);
                        Ok(())
                    }
                    Err(ThresholdRefusal::NotFinite) => Err((Ignored::InvalidValue, format!("threshold {threshold:?} is not a finite number"))),
                    Err(ThresholdRefusal::UnknownClass) => Err((Ignored::UnknownClass, format!("model {model_version} has no class {class:?}"))),
                }
            }
            model @ Change::Model { .. } => {
                *self.model.lock().expect("control") = Some(model);
                self.model_changed.notify_all();
                Ok(())
            }
        }
    }

    fn mark_applied(&self, partition: i32, offset: i64) {
        self.applied.lock().expect("control").insert(partition, offset);
        self.changed.notify_all();
    }

    /// Waits until this replica has applied the record at `partition`/`offset`.
    pub(crate) fn wait_applied(&self, partition: i32, offset: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut applied = self.applied.lock().expect("control");
        while applied.get(&partition).is_none_or(|o| *o < offset) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            applied = self.changed.wait_timeout(applied, left).expect("control").0;
        }
        true
    }

    /// Takes the model announcement not yet handled, waiting up to `timeout` for one.
    pub(crate) fn next_model(&self, timeout: Duration) -> Option<Change> {
        let mut model = self.model.lock().expect("control");
        if model.is_none() {
            model = self.model_changed.wait_timeout(model, timeout).expect("control").0;
        }
        model.take()
    }
}

/// What the reader thread is told from outside: stop (with the run, or when `Control` is
/// dropped), or look for new records now.
struct ReaderSignals {
    stop: Shutdown,
    wake: AtomicBool,
}

/// A replica's control-plane client: the reader thread and the publisher.
pub(crate) struct Control {
    pub topic: String,
    /// Where each change made through the API is appended too (`topics.control_audit`).
    audit_topic: Option<String>,
    pub state: Arc<ControlState>,
    signing_key: Option<Arc<SigningKey>>,
    /// A producer is made for each publish: changes are rare, and an idle rust-rdkafka producer's
    /// polling thread costs about 1 % of a core (each 100 ms poll ends in zero-timeout polls).
    producer_config: rdkafka::ClientConfig,
    signals: Arc<ReaderSignals>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Control {
    /// Creates the topics if they are missing (control compacted, audit not), reads the control
    /// topic to the end (so the first image is already judged with the current values), then
    /// follows it on a thread of its own. Threshold records are checked against `model` (the one
    /// serving) and the models loaded later (`ControlState::model_loaded`).
    pub(crate) async fn start(
        settings: &ControlSettings,
        connection: &KafkaSettings,
        topics: &TopicSettings,
        thresholds: Arc<RuntimeThresholds>,
        metrics: Arc<Metrics>,
        model: &ModelInfo,
        shutdown: &Shutdown,
    ) -> Result<Self> {
        let topic = topics.control.as_deref().context("topics.control is empty: runtime control is off")?;
        let signing_key = SigningKey::from_settings(settings)?.map(Arc::new);
        if signing_key.is_none() {
            tracing::warn!(
                topic,
                "control.signing_key is not set: every record on the control topic is applied, whoever produced it; set a signing key (docs/DESIGN.md §9)"
            );
        }
        ensure_topic(connection, topic, "compact").await?;
        if let Some(audit) = &topics.control_audit {
            ensure_topic(connection, audit, "delete").await?;
        }
        let state = Arc::new(ControlState::new(thresholds, metrics, model));
        let signals = Arc::new(ReaderSignals { stop: shutdown.child(), wake: AtomicBool::new(false) });
        let consumer: BaseConsumer = kafka::consumer_config(connection, &format!("{}-control-{}", connection.group_id, rand::random::<u32>()))
            .set("isolation.level", "read_uncommitted")
            // A change should reach every replica well within a second.
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("creating the control-topic reader")?;
        let name = topic.to_string();
        let (consumer, ends) = tokio::task::spawn_blocking(move || assign_from_beginning(&consumer, &name).map(|ends| (consumer, ends))).await??;
        let (caught_up_tx, caught_up_rx) = std::sync::mpsc::channel();
        let reader = {
            let (state, signals, topic, key) = (state.clone(), signals.clone(), topic.to_string(), signing_key.clone());
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || read_loop(&consumer, &topic, &state, key.as_deref(), &signals, ends, caught_up_tx))?
        };
        // The first images wait for the current values, but a slow broker does not hold the
        // operator forever: past the wait it starts with what it has, and catches up live.
        let wait = settings.catch_up_timeout;
        if tokio::task::spawn_blocking(move || caught_up_rx.recv_timeout(wait)).await?.is_err() {
            tracing::warn!(topic, ?wait, "control topic not read to the end in time; starting with the values read so far");
        }
        let producer_config = kafka::producer_config(connection, None);
        Ok(Self {
            topic: topic.to_string(),
            audit_topic: topics.control_audit.clone(),
            state,
            signing_key,
            producer_config,
            signals,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Publishes a change (signed, when there is a key) and waits until this replica has applied
    /// it (read-your-writes). The audit record goes first: no change is applied without one.
    pub(crate) async fn publish(&self, change: &Change) -> Result<()> {
        let key = change.key().into_bytes();
        let payload = serde_json::to_vec(change).expect("control record serialises");
        let headers = self.signing_key.iter().map(|k| (SIGNATURE_HEADER.to_string(), k.sign(&key, &payload).into_bytes())).collect();
        let record = OutRecord { topic: self.topic.clone(), key: Some(key), payload: Some(payload), headers };
        let producer: FutureProducer = self.producer_config.create().context("creating the control-topic producer")?;
        if let Some(audit) = &self.audit_topic {
            let audit_record = OutRecord { topic: audit.clone(), ..record.clone() };
            producer
                .send(audit_record.to_future_record(), Duration::from_secs(10))
                .await
                .map_err(|(e, _)| anyhow!("publishing to the audit topic {audit}: {e}"))?;
        }
        let rdkafka::producer::future_producer::Delivery { partition, offset, .. } =
            producer.send(record.to_future_record(), Duration::from_secs(10)).await.map_err(|(e, _)| anyhow!("publishing to {}: {e}", self.topic))?;
        self.signals.wake.store(true, Ordering::SeqCst);
        let state = self.state.clone();
        let applied = tokio::task::spawn_blocking(move || state.wait_applied(partition, offset, Duration::from_secs(10))).await?;
        if !applied {
            bail!("the change was published to {} but not read back within 10 s", self.topic);
        }
        Ok(())
    }

    pub(crate) fn stop(&self) {
        self.signals.stop.request();
        if let Some(reader) = self.reader.lock().expect("control").take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Assigns every partition of `topic` from the beginning; returns the end offset now of each one
/// that holds records.
fn assign_from_beginning(consumer: &BaseConsumer, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(15)).context("control topic metadata")?;
    let partitions: Vec<i32> = md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    if partitions.is_empty() {
        bail!("control topic {topic} has no partitions");
    }
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl).context("assigning the control topic")?;
    grown_partitions(consumer, topic, &BTreeMap::new(), Duration::from_secs(15)).context("control topic watermarks")
}

/// How often a caught-up reader asks the broker whether the control topic grew. In between, its
/// partitions are paused, so no fetch loop runs: a broker that answers an empty fetch at once
/// (noida-db) would otherwise keep one spinning for as long as the operator runs, for a topic
/// that changes a few times a day. A replica's own changes are read at once (`Control::publish`).
const GROWTH_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Reads records until every partition reaches its end in `ends`, then pauses and checks the end
/// offsets every `GROWTH_CHECK_INTERVAL` (or when woken), resuming only to read what was added.
fn read_loop(
    consumer: &BaseConsumer,
    topic: &str,
    state: &ControlState,
    key: Option<&SigningKey>,
    signals: &ReaderSignals,
    mut ends: BTreeMap<i32, i64>,
    caught_up: std::sync::mpsc::Sender<()>,
) {
    let mut reported = false;
    let mut paused = false;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_check = Instant::now();
    while !signals.stop.is_requested() {
        if ends.is_empty() {
            if !reported {
                reported = true;
                let _ = caught_up.send(());
            }
            if !paused {
                paused = set_paused(consumer, true);
            }
            // Serves librdkafka's events (errors, logs) without fetching; a record fetched just
            // before the pause may still come out.
            if let Some(result) = consumer.poll(Duration::ZERO) {
                handle_record(result, state, key, &mut next, &mut ends);
            }
            if last_check.elapsed() < GROWTH_CHECK_INTERVAL && !signals.wake.swap(false, Ordering::SeqCst) {
                signals.stop.sleep(Duration::from_millis(20));
                continue;
            }
            last_check = Instant::now();
            match grown_partitions(consumer, topic, &next, Duration::from_secs(5)) {
                Ok(grown) => ends = grown,
                Err(e) => tracing::debug!(error = %e, "control topic end offsets"),
            }
            if !ends.is_empty() && paused {
                paused = !set_paused(consumer, false);
            }
            continue;
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            next.extend(kafka::take_reached_ends(consumer, &mut ends));
            continue;
        };
        handle_record(result, state, key, &mut next, &mut ends);
    }
}

/// Applies one record read from the control topic, or counts why not, and moves the read
/// position past it.
fn handle_record(
    result: KafkaResult<BorrowedMessage<'_>>,
    state: &ControlState,
    key: Option<&SigningKey>,
    next: &mut BTreeMap<i32, i64>,
    ends: &mut BTreeMap<i32, i64>,
) {
    let m = match result {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "control topic read error");
            return;
        }
    };
    // A tombstone (`None`) has nothing to apply.
    let applied = read_change(&m, key).and_then(|change| change.map_or(Ok(()), |change| state.apply(change, m.offset())));
    if let Err((why, detail)) = applied {
        state.ignore(why, m.offset(), &detail);
    }
    state.mark_applied(m.partition(), m.offset());
    next.insert(m.partition(), m.offset() + 1);
    if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
        ends.remove(&m.partition());
    }
}

/// The change a record carries, once its signature (with a key), content and key check out.
fn read_change(m: &BorrowedMessage<'_>, key: Option<&SigningKey>) -> Result<Option<Change>, (Ignored, String)> {
    use rdkafka::message::Headers;
    let Some(payload) = m.payload() else { return Ok(None) };
    let record_key = m.key().unwrap_or_default();
    if let Some(key) = key {
        let signature = m.headers().and_then(|h| h.iter().find(|h| h.key == SIGNATURE_HEADER).and_then(|h| h.value));
        let Some(signature) = signature else {
            return Err((Ignored::Unsigned, format!("no {SIGNATURE_HEADER} header")));
        };
        if !key.verify(record_key, payload, signature) {
            return Err((Ignored::BadSignature, "the signature does not match control.signing_key".into()));
        }
    }
    let change: Change = serde_json::from_slice(payload).map_err(|e| (Ignored::Unreadable, e.to_string()))?;
    if change.key().as_bytes() != record_key {
        return Err((Ignored::KeyMismatch, format!("a {} record under key {:?}", change.key(), String::from_utf8_lossy(record_key))));
    }
    Ok(Some(change))
}

/// Pauses (or resumes) every assigned partition; true when it worked.
fn set_paused(consumer: &BaseConsumer, pause: bool) -> bool {
    let Ok(assignment) = consumer.assignment() else { return false };
    let done = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    done.is_ok()
}

/// The partitions whose end offset is past the next offset to read, with that end.
fn grown_partitions(consumer: &BaseConsumer, topic: &str, next: &BTreeMap<i32, i64>, timeout: Duration) -> Result<BTreeMap<i32, i64>> {
    let mut grown = BTreeMap::new();
    for e in consumer.assignment()?.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        if high > next.get(&e.partition()).copied().unwrap_or(low).max(low) {
            grown.insert(e.partition(), high);
        }
    }
    Ok(grown)
}

/// Creates `topic` with `cleanup.policy` (`compact` for the control topic, `delete` for its audit
/// topic) unless it exists.
async fn ensure_topic(connection: &KafkaSettings, topic: &str, cleanup_policy: &str) -> Result<()> {
    match kafka::ensure_topic(connection, topic, &[("cleanup.policy", cleanup_policy)]).await {
        Ok(created) => {
            if created {
                tracing::info!(topic, cleanup_policy, "created a control-plane topic");
            }
            Ok(())
        }
        Err(e) => Err(e.context(format!("create it with cleanup.policy={cleanup_policy}, or set topics.control = \"\" to turn runtime control off"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(version: &str, classes: &[&str]) -> ModelInfo {
        ModelInfo {
            name: "dcam".into(),
            version: version.into(),
            backbone: String::new(),
            input_size: 64,
            classes: classes.iter().map(|c| c.to_string()).collect(),
            calibration: BTreeMap::new(),
            train_config: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
        }
    }

    fn threshold(version: &str, class: &str, threshold: Option<f32>) -> Change {
        Change::Threshold { class: class.into(), model_version: version.into(), threshold, previous: None, by: "t".into(), at: Change::now() }
    }

    fn ignored(metrics: &Metrics, reason: &str) -> u64 {
        metrics.control_records_ignored.get_or_create(&crate::telemetry::ReasonLabels { reason: reason.into() }).get()
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_documented_message() {
        // Computed independently: python3 -c "import hmac, hashlib, struct; ..." (docs/DESIGN.md §9).
        let value = br#"{"kind":"model","uri":"models/dcam.onnx","by":"alice","at":"2026-01-01T00:00:00.000Z"}"#;
        let key = SigningKey::new(b"0123456789abcdef0123456789abcdef");
        let signature = key.sign(b"model", value);
        assert_eq!(signature, "05bfba423baf3daaba467a47ce0e2ff1f82bbcfc389e02c27719b7d6c17d104e");
        assert!(key.verify(b"model", value, signature.as_bytes()));
        assert!(!key.verify(b"mode", &[b"l".as_slice(), value].concat(), signature.as_bytes()), "bytes cannot move from key to value");
        assert!(!SigningKey::new(b"another key, also thirty-two bytes").verify(b"model", value, signature.as_bytes()));
        assert!(!key.verify(b"model", value, b"zz"));
    }

    #[test]
    fn records_are_held_to_the_classes_of_loaded_models_and_bounded() {
        let metrics = Metrics::new();
        let state = ControlState::new(Arc::default(), metrics.clone(), &model("1", &["bottle"]));
        assert_eq!(state.apply(threshold("1", "bottle", Some(2.5)), 0), Ok(()));
        assert_eq!(state.thresholds.get("1", "bottle"), Some(2.5));
        assert_eq!(state.apply(threshold("1", DEFAULT_CLASS, Some(1.0)), 1), Ok(()));
        for (i, class) in ["screw", "x\"} 1", "bottle2"].iter().enumerate() {
            assert_eq!(state.apply(threshold("1", class, Some(1.0)), 2 + i as i64).unwrap_err().0, Ignored::UnknownClass);
        }
        assert_eq!(state.apply(threshold("1", "bottle", Some(f32::INFINITY)), 9).unwrap_err().0, Ignored::InvalidValue);
        assert_eq!(state.thresholds.len(), 2, "unknown classes do not grow the map");
        assert_eq!(state.thresholds.get("1", "bottle"), Some(2.5), "an invalid value leaves the one in force");

        // A version not loaded here waits, bounded, and is checked once its model loads.
        assert_eq!(state.apply(threshold("2", "screw", Some(7.0)), 10), Ok(()));
        assert_eq!(state.apply(threshold("2", "nonsense", Some(7.0)), 11), Ok(()));
        let refused: Vec<_> = (0..MAX_PENDING).filter_map(|i| state.apply(threshold(&format!("junk-{i}"), "c", Some(1.0)), 100 + i as i64).err()).collect();
        assert_eq!(state.catalogue.lock().unwrap().pending.len(), MAX_PENDING);
        assert_eq!(refused.iter().map(|r| r.0).collect::<Vec<_>>(), [Ignored::UnknownVersion; 2]);
        assert_eq!(state.thresholds.get("2", "screw"), None, "not in force before its model is");
        state.model_loaded(&model("2", &["bottle", "screw"]));
        assert_eq!(state.thresholds.get("2", "screw"), Some(7.0));
        assert_eq!(state.thresholds.get("2", "nonsense"), None);
        assert_eq!(ignored(&metrics, "unknown_class"), 1, "the one waiting for a class its model lacks");
        assert_eq!(state.thresholds.len(), 3);
    }

    #[test]
    fn shared_checks_refuse_what_the_api_refuses() {
        let classes = vec!["bottle".to_string()];
        let inf: f32 = serde_json::from_str("1e39").unwrap();
        assert_eq!(check_threshold(&classes, "bottle", Some(inf)), Err(ThresholdRefusal::NotFinite));
        assert_eq!(check_threshold(&classes, "bottle", Some(f32::NAN)), Err(ThresholdRefusal::NotFinite));
        assert_eq!(check_threshold(&classes, "tile", Some(1.0)), Err(ThresholdRefusal::UnknownClass));
        assert_eq!(check_threshold(&classes, "bottle", None), Ok(()));
        assert_eq!(check_threshold(&classes, DEFAULT_CLASS, Some(1e6)), Ok(()));
    }
}
