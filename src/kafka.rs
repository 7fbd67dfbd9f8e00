//! librdkafka client configuration shared by the consumer, the producers and the tools.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::config::{DeliverySettings, KafkaSettings, OffsetReset};

/// Connection and security settings, then the free-form pass-through (applied last, so it wins).
pub(crate) fn base_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers).set("client.id", &k.client_id);
    apply_auth(k, &mut c);
    c
}

/// The security settings every client gets (operator, tools, replay, bench, demo): one place.
pub(crate) fn apply_auth(k: &KafkaSettings, c: &mut ClientConfig) {
    c.set("security.protocol", k.security_protocol.as_librdkafka());
    let optional = [
        ("sasl.mechanisms", k.sasl_mechanism.as_deref()),
        ("sasl.username", k.sasl_username.as_deref()),
        ("sasl.password", k.sasl_password.expose()),
        ("ssl.ca.location", k.ssl_ca_location.as_deref()),
        ("ssl.certificate.location", k.ssl_certificate_location.as_deref()),
        ("ssl.key.location", k.ssl_key_location.as_deref()),
        ("ssl.key.password", k.ssl_key_password.expose()),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            c.set(key, v);
        }
    }
}

/// Creates `topic` (one partition, `configs`) unless it exists; true when this call created it.
/// The broker's default replication first (KIP-464); brokers without it get a single replica.
pub(crate) async fn ensure_topic(k: &KafkaSettings, topic: &str, configs: &[(&str, &str)]) -> Result<bool> {
    // An existing topic needs no admin call (some brokers, like librdkafka's in-process one used by
    // the demo, do not answer CreateTopics). A consumer's metadata request never auto-creates.
    let probe: BaseConsumer = base_config(k).create().context("creating a metadata client")?;
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
        return Ok(false);
    }
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = base_config(k).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut last_error = None;
    for replication in [-1, 1] {
        let mut new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication));
        for (key, value) in configs {
            new = new.set(key, value);
        }
        match admin.create_topics(&[new], &options).await.with_context(|| format!("creating the topic {topic}"))?.remove(0) {
            Ok(_) => return Ok(true),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => return Ok(false),
            Err((_, e)) => last_error = Some(e),
        }
    }
    bail!("cannot create the topic {topic}: {}", last_error.map_or_else(String::new, |e| e.to_string()))
}

fn apply_extra(mut c: ClientConfig, k: &KafkaSettings) -> ClientConfig {
    for (key, value) in &k.extra {
        c.set(key, value);
    }
    c
}

/// Consumer in the operator's group with manual offset handling.
pub fn consumer_config(k: &KafkaSettings, group_id: &str) -> ClientConfig {
    let mut c = base_config(k);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match k.auto_offset_reset {
                OffsetReset::Earliest => "earliest",
                OffsetReset::Latest => "latest",
            },
        )
        .set("session.timeout.ms", k.session_timeout.as_millis().to_string())
        .set("partition.assignment.strategy", k.rebalance_protocol.assignment_strategy())
        // Skip records of aborted upstream transactions.
        .set("isolation.level", "read_committed")
        // Bound librdkafka's prefetch: pausing is our back-pressure, not its buffers.
        .set("queued.max.messages.kbytes", "32768")
        .set("fetch.message.max.bytes", "16777216")
        .set("max.poll.interval.ms", k.max_poll_interval.as_millis().to_string());
    apply_extra(c, k)
}

/// Idempotent producer; transactional when `transaction` (id, timeout) is given.
pub(crate) fn producer_config(k: &KafkaSettings, transaction: Option<(&str, Duration)>) -> ClientConfig {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "5").set("message.max.bytes", "20971520").set("message.timeout.ms", "120000");
    if let Some((id, timeout)) = transaction {
        // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
        let txn = timeout.as_millis() as u64;
        c.set("transactional.id", id).set("transaction.timeout.ms", txn.to_string()).set("message.timeout.ms", txn.min(120_000).to_string());
    }
    apply_extra(c, k)
}

/// The transactional id of an instance: stable across restarts of the same pod (KIP-447 fencing).
pub(crate) fn transactional_id(k: &KafkaSettings, d: &DeliverySettings) -> String {
    format!("{}-{}", k.group_id, d.instance_id())
}

/// Removes from `ends` the partitions whose read position has reached their end offset although
/// no record came (a compacted gap, or a committed position already at the end); returns each with
/// that position.
pub(crate) fn take_reached_ends(consumer: &rdkafka::consumer::BaseConsumer, ends: &mut std::collections::BTreeMap<i32, i64>) -> Vec<(i32, i64)> {
    use rdkafka::consumer::Consumer;
    let mut reached = Vec::new();
    for e in consumer.position().map(|p| p.elements().iter().map(|e| (e.partition(), e.offset())).collect::<Vec<_>>()).unwrap_or_default() {
        if let (p, rdkafka::Offset::Offset(at)) = e {
            if ends.get(&p).is_some_and(|end| at >= *end) {
                ends.remove(&p);
                reached.push((p, at));
            }
        }
    }
    reached
}

/// Logs a client-wide librdkafka error as rust-rdkafka's default context does; for contexts that
/// look at some errors first.
pub(crate) fn log_client_error(error: &rdkafka::error::KafkaError, reason: &str) {
    tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
}
