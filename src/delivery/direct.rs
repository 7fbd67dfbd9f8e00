//! At-least-once publishing: a record is retried until the broker acknowledges it; one the
//! broker refuses for good is replaced by its stand-in dead letter; a producer librdkafka
//! declares dead is replaced.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use crate::delivery::record::{is_permanent, OutRecord};
use crate::telemetry::{InternalEvent, Metrics};

/// The at-least-once producer. librdkafka declares an idempotent producer dead on a fatal error
/// (e.g. an out-of-order sequence after a broker restart lost its producer state); it is then
/// replaced and the unacknowledged records go again on the new one (duplicates are allowed in
/// this mode, loss is not).
pub(crate) struct DirectProducer {
    config: rdkafka::ClientConfig,
    /// (generation, producer): a replacement happens once per dead producer.
    current: std::sync::RwLock<(u64, FutureProducer)>,
}

impl DirectProducer {
    pub(crate) fn new(config: rdkafka::ClientConfig) -> rdkafka::error::KafkaResult<Self> {
        let producer = config.create()?;
        Ok(Self { config, current: std::sync::RwLock::new((0, producer)) })
    }

    pub(crate) fn get(&self) -> (u64, FutureProducer) {
        self.current.read().expect("producer").clone()
    }

    /// Replaces producer `generation` unless another task already has.
    fn renew(&self, generation: u64) {
        let mut current = self.current.write().expect("producer");
        if current.0 != generation {
            return;
        }
        match self.config.create() {
            Ok(p) => {
                tracing::warn!(generation, "the producer failed fatally; a new one takes over");
                *current = (generation + 1, p);
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new producer; retrying"),
        }
    }

    pub(crate) fn flush(&self, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
        use rdkafka::producer::Producer;
        self.get().1.flush(timeout)
    }
}

/// Publishes `record`; if the broker refuses it for good (too large, not authorised, no such
/// topic), publishes a small dead letter in its place. Ok(false) when `wanted` turned false
/// before it was acknowledged (the input went to another member). Err only when the dead letter
/// is refused too: then the instance must stop (docs/DESIGN.md §4).
pub(super) async fn publish_or_dead_letter(
    producer: &DirectProducer,
    record: &OutRecord,
    dead_letter_topic: &str,
    metrics: &Metrics,
    wanted: &(dyn Fn() -> bool + Sync),
) -> Result<bool, String> {
    let refused = match publish_while_wanted(producer, record, metrics, wanted).await {
        Ok(acked) => return Ok(acked),
        Err(refused) => refused,
    };
    let stand_in = record.stand_in(&refused, dead_letter_topic);
    metrics.emit(InternalEvent::OutputRefused { topic: &record.topic, bytes: record.size(), error: &refused.to_string() });
    publish_while_wanted(producer, &stand_in, metrics, wanted).await.map_err(|e| {
        format!(
            "cannot publish a {} byte record to {} ({refused}), nor its {} byte dead letter to {} ({e}); check the topics' max.message.bytes and ACLs",
            record.size(),
            record.topic,
            stand_in.size(),
            stand_in.topic
        )
    })
}

/// At-least-once publishing: an input is never marked finished before its outputs are acked.
/// Transient errors are retried with capped backoff for as long as `wanted` holds (Ok(false)
/// once the input is no longer this member's to deliver); a permanent one comes back as Err.
async fn publish_while_wanted(
    producer: &DirectProducer,
    record: &OutRecord,
    metrics: &Metrics,
    wanted: &(dyn Fn() -> bool + Sync),
) -> Result<bool, KafkaError> {
    let mut delay = Duration::from_millis(200);
    loop {
        if !wanted() {
            return Ok(false);
        }
        let (generation, current) = producer.get();
        match current.send(record.to_future_record(), Duration::from_secs(30)).await {
            Ok(_) => return Ok(true),
            Err((e, _)) if is_permanent(&e) => return Err(e),
            Err((e, _)) => {
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Fatal) {
                    producer.renew(generation);
                }
                let reason = e.rdkafka_error_code().map_or_else(|| "other".to_string(), |c| format!("{c:?}"));
                metrics.emit(InternalEvent::PublishRetried { topic: &record.topic, reason: &reason, error: &e.to_string() });
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
