//! The control plane (docs/DESIGN.md §9): runtime threshold changes and model announcements on a
//! compacted topic (`topics.control`) that every replica reads from the beginning. All replicas,
//! and every restart, end up with the same values: the latest record per key wins. Each record
//! says who changed what, when, and from which value, so the topic is also the audit log.

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

use crate::config::Settings;
use crate::delivery::record::OutRecord;
use crate::inference::model::RuntimeThresholds;
use crate::kafka;

/// One record on the control topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A class's threshold (raw score units) for one model version; `threshold: null` goes back
    /// to the model's calibration. Thresholds belong to a model version: a new model's scores
    /// are on its own scale, so it starts from its own calibration.
    Threshold { class: String, model_version: String, threshold: Option<f32>, previous: Option<f32>, by: String, at: String },
    /// Load this model (a path on the pods, or an `s3://` URI) and swap it in.
    Model { uri: String, by: String, at: String },
}

impl Change {
    /// The compaction key: one live record per class and model version, one for the model.
    pub fn key(&self) -> String {
        match self {
            Change::Threshold { class, model_version, .. } => format!("threshold/{model_version}/{class}"),
            Change::Model { .. } => "model".into(),
        }
    }

    pub fn now() -> String {
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }
}

/// What a replica has applied from the control topic.
pub struct ControlState {
    pub thresholds: Arc<RuntimeThresholds>,
    /// Highest offset applied per partition, for read-your-writes.
    applied: Mutex<BTreeMap<i32, i64>>,
    changed: Condvar,
    /// The latest model announcement, for the reloader.
    model: Mutex<Option<Change>>,
    model_changed: Condvar,
}

impl ControlState {
    fn new(thresholds: Arc<RuntimeThresholds>) -> Self {
        Self { thresholds, applied: Mutex::default(), changed: Condvar::new(), model: Mutex::default(), model_changed: Condvar::new() }
    }

    fn apply(&self, change: Change) {
        match change {
            Change::Threshold { class, model_version, threshold, by, .. } => {
                tracing::info!(class, model_version, ?threshold, by, "threshold applied");
                self.thresholds.set(&model_version, &class, threshold);
            }
            model @ Change::Model { .. } => {
                *self.model.lock().expect("control") = Some(model);
                self.model_changed.notify_all();
            }
        }
    }

    fn mark_applied(&self, partition: i32, offset: i64) {
        self.applied.lock().expect("control").insert(partition, offset);
        self.changed.notify_all();
    }

    /// Waits until this replica has applied the record at `partition`/`offset`.
    pub fn wait_applied(&self, partition: i32, offset: i64, timeout: Duration) -> bool {
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
    pub fn next_model(&self, timeout: Duration) -> Option<Change> {
        let mut model = self.model.lock().expect("control");
        if model.is_none() {
            model = self.model_changed.wait_timeout(model, timeout).expect("control").0;
        }
        model.take()
    }
}

/// What the reader thread is told from outside: stop, or look for new records now.
#[derive(Default)]
struct ReaderSignals {
    stop: AtomicBool,
    wake: AtomicBool,
}

/// A replica's control-plane client: the reader thread and the publisher.
pub struct Control {
    pub topic: String,
    pub state: Arc<ControlState>,
    /// A producer is made for each publish: changes are rare, and an idle rust-rdkafka producer's
    /// polling thread costs about 1 % of a core (each 100 ms poll ends in zero-timeout polls).
    producer_config: rdkafka::ClientConfig,
    signals: Arc<ReaderSignals>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Control {
    /// Creates the topic if it is missing (compacted), reads it to the end (so the first image
    /// is already judged with the current values), then follows it on a thread of its own.
    pub async fn start(settings: &Settings, topic: &str, thresholds: Arc<RuntimeThresholds>) -> Result<Self> {
        ensure_compacted_topic(settings, topic).await?;
        let state = Arc::new(ControlState::new(thresholds));
        let signals = Arc::new(ReaderSignals::default());
        let consumer: BaseConsumer = kafka::consumer_config(settings, &format!("{}-control-{}", settings.kafka.group_id, rand::random::<u32>()))
            .set("isolation.level", "read_uncommitted")
            // A change should reach every replica well within a second.
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("creating the control-topic reader")?;
        let name = topic.to_string();
        let (consumer, ends) = tokio::task::spawn_blocking(move || assign_from_beginning(&consumer, &name).map(|ends| (consumer, ends))).await??;
        let (caught_up_tx, caught_up_rx) = std::sync::mpsc::channel();
        let reader = {
            let (state, signals, topic) = (state.clone(), signals.clone(), topic.to_string());
            std::thread::Builder::new().name("control".into()).spawn(move || read_loop(&consumer, &topic, &state, &signals, ends, caught_up_tx))?
        };
        // The first images wait for the current values, but a slow broker does not hold the
        // operator forever: past the wait it starts with what it has, and catches up live.
        let wait = settings.kafka.session_timeout.max(Duration::from_secs(10));
        if tokio::task::spawn_blocking(move || caught_up_rx.recv_timeout(wait)).await?.is_err() {
            tracing::warn!(topic, ?wait, "control topic not read to the end in time; starting with the values read so far");
        }
        let producer_config = kafka::producer_config(settings, None);
        Ok(Self { topic: topic.to_string(), state, producer_config, signals, reader: Mutex::new(Some(reader)) })
    }

    /// Publishes a change and waits until this replica has applied it (read-your-writes).
    pub async fn publish(&self, change: &Change) -> Result<()> {
        let payload = serde_json::to_vec(change).expect("control record serialises");
        let record = OutRecord { topic: self.topic.clone(), key: Some(change.key().into_bytes()), payload: Some(payload), headers: vec![] };
        let producer: FutureProducer = self.producer_config.create().context("creating the control-topic producer")?;
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

    pub fn stop(&self) {
        self.signals.stop.store(true, Ordering::SeqCst);
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
    signals: &ReaderSignals,
    mut ends: BTreeMap<i32, i64>,
    caught_up: std::sync::mpsc::Sender<()>,
) {
    let mut reported = false;
    let mut paused = false;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_check = Instant::now();
    while !signals.stop.load(Ordering::SeqCst) {
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
                handle_record(result, state, &mut next, &mut ends);
            }
            if last_check.elapsed() < GROWTH_CHECK_INTERVAL && !signals.wake.swap(false, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
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
        handle_record(result, state, &mut next, &mut ends);
    }
}

/// Applies one record read from the control topic and moves the read position past it.
fn handle_record(result: KafkaResult<BorrowedMessage<'_>>, state: &ControlState, next: &mut BTreeMap<i32, i64>, ends: &mut BTreeMap<i32, i64>) {
    let m = match result {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "control topic read error");
            return;
        }
    };
    match m.payload().map(serde_json::from_slice::<Change>) {
        Some(Ok(change)) => state.apply(change),
        // A tombstone or a record this version does not understand: nothing to apply.
        None => {}
        Some(Err(e)) => tracing::warn!(offset = m.offset(), error = %e, "ignoring an unreadable control record"),
    }
    state.mark_applied(m.partition(), m.offset());
    next.insert(m.partition(), m.offset() + 1);
    if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
        ends.remove(&m.partition());
    }
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

/// Creates `topic` with `cleanup.policy=compact` unless it exists.
async fn ensure_compacted_topic(settings: &Settings, topic: &str) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    // An existing topic needs no admin call (some brokers, like librdkafka's in-process one used by
    // the demo, do not answer CreateTopics). A consumer's metadata request never auto-creates.
    let probe: BaseConsumer = kafka::base_config(&settings.kafka).create().context("creating a metadata client")?;
    let name = topic.to_string();
    let exists = tokio::task::spawn_blocking(move || {
        probe
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .ok()
            .and_then(|md| md.topics().first().map(|t| t.error().is_none() && !t.partitions().is_empty()))
    })
    .await?
    .unwrap_or(false);
    if exists {
        return Ok(());
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka::base_config(&settings.kafka).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // The broker's default replication first (KIP-464); brokers without it get a single replica.
    let mut last_error = None;
    for replication in [-1, 1] {
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication)).set("cleanup.policy", "compact");
        match admin.create_topics(&[new], &options).await.context("creating the control topic")?.remove(0) {
            Ok(_) => {
                tracing::info!(topic, replication, "created the compacted control topic");
                return Ok(());
            }
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(()),
            Err((_, e)) => last_error = Some(e),
        }
    }
    bail!(
        "cannot create the control topic {topic}: {} (create it with cleanup.policy=compact, or set topics.control = \"\" to turn runtime control off)",
        last_error.map_or_else(String::new, |e| e.to_string())
    )
}
