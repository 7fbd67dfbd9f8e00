//! Delivery: from an input's finished outputs to its committed offset (docs/DESIGN.md §4).
//!
//! One `Delivery` per operator holds both ends: the sink hands it each input's outputs
//! (`deliver`), the source asks it to commit (`commit`) and to let go of partitions
//! (`release`). Behind it, at-least-once publishes each record until acknowledged and commits
//! plain offsets (`direct`); exactly-once buffers the outputs and commits them with their
//! offsets in one transaction (`transaction`). `offsets` decides what is committable.

mod direct;
pub(crate) mod offsets;
pub(crate) mod record;
pub(crate) mod transaction;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

pub(crate) use direct::DirectProducer;
pub(crate) use offsets::{Fatal, OffsetTracker, PartitionKey, Ticket};
use record::OutRecord;
use transaction::{Transactions, TxnError};

use crate::config::{DeliveryMode, DeliverySettings, KafkaSettings};
use crate::kafka;
use crate::telemetry::{InternalEvent, Metrics};

/// The consumer's `group.instance.id`, if it has one. Static membership (KIP-345): a restarted
/// pod with the same identity takes its old place in the group at once instead of waiting for
/// the dead member to be evicted. Only with a configured identity, or in exactly-once mode,
/// where the transactional id makes it unique: two members sharing one would fence each other.
pub(crate) fn static_member_id(kafka: &KafkaSettings, delivery: &DeliverySettings) -> Option<String> {
    let wanted = delivery.mode == DeliveryMode::ExactlyOnce || delivery.instance_id.is_some();
    (kafka.static_membership && wanted).then(|| delivery.instance_id())
}

pub struct Delivery {
    mode: Mode,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    fatal: Arc<Fatal>,
    /// Where a refused output's stand-in goes.
    dead_letter_topic: String,
    /// Exactly-once: the transactional producer failed for good and must be replaced before the
    /// next transaction (`renew`).
    renewal_due: AtomicBool,
    /// Exactly-once: the consumer must go back to the committed offsets before it reads on (after
    /// a renewal, or an abort whose rewind could not reach the broker).
    rewind_due: AtomicBool,
}

enum Mode {
    AtLeastOnce(Arc<DirectProducer>),
    ExactlyOnce(Arc<Transactions>),
}

impl Delivery {
    /// The delivery `delivery.mode` asks for, publishing through `connection`, refused outputs'
    /// stand-ins to `dead_letter_topic`. Blocking in exactly-once mode (`init_transactions` fences
    /// older instances): call it off the executor.
    pub fn build(
        delivery: &DeliverySettings,
        connection: &KafkaSettings,
        dead_letter_topic: &str,
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        fatal: Arc<Fatal>,
    ) -> Result<Self> {
        match delivery.mode {
            DeliveryMode::AtLeastOnce => Self::at_least_once(connection, dead_letter_topic, tracker, metrics, fatal),
            DeliveryMode::ExactlyOnce => {
                let id = kafka::transactional_id(connection, delivery);
                let timeout = delivery.transaction_timeout;
                let config = kafka::producer_config(connection, Some((&id, timeout)));
                let tx =
                    Transactions::new(config, tracker.clone(), metrics.clone(), timeout).map_err(|e| anyhow!("creating the transactional producer: {e}"))?;
                tracing::info!(transactional_id = %id, "exactly-once delivery: transactional producer ready");
                let dead_letter_topic = dead_letter_topic.to_string();
                Ok(Self {
                    mode: Mode::ExactlyOnce(Arc::new(tx)),
                    tracker,
                    metrics,
                    fatal,
                    dead_letter_topic,
                    renewal_due: AtomicBool::new(false),
                    rewind_due: AtomicBool::new(false),
                })
            }
        }
    }

    /// At-least-once publishing whatever the configured mode (replays never commit).
    pub fn at_least_once(
        connection: &KafkaSettings,
        dead_letter_topic: &str,
        tracker: Arc<OffsetTracker>,
        metrics: Arc<Metrics>,
        fatal: Arc<Fatal>,
    ) -> Result<Self> {
        let producer = DirectProducer::new(kafka::producer_config(connection, None)).context("creating the producer")?;
        Ok(Self {
            mode: Mode::AtLeastOnce(Arc::new(producer)),
            tracker,
            metrics,
            fatal,
            dead_letter_topic: dead_letter_topic.to_string(),
            renewal_due: AtomicBool::new(false),
            rewind_due: AtomicBool::new(false),
        })
    }

    pub fn tracker(&self) -> &Arc<OffsetTracker> {
        &self.tracker
    }

    pub fn fatal(&self) -> &Arc<Fatal> {
        &self.fatal
    }

    /// Takes an input's outputs; true once the input counts as finished (its outputs
    /// acknowledged, or buffered for its transaction). False when the input's partition was
    /// revoked or rewound meanwhile (the new owner scores it again), or when a fatal error
    /// leaves it unfinished on purpose so nothing is committed past it.
    pub async fn deliver(&self, ticket: &Ticket, records: Vec<OutRecord>) -> bool {
        match &self.mode {
            Mode::AtLeastOnce(producer) => {
                // Retried until acknowledged, but only while the input still belongs to this
                // member: after a revoke the next owner scores it, and retrying on through a
                // broker outage would pile up work outside pipeline.max_in_flight.
                let wanted = || self.tracker.is_current(ticket);
                for r in &records {
                    match direct::publish_or_dead_letter(producer, r, &self.dead_letter_topic, &self.metrics, &wanted).await {
                        Ok(true) => {}
                        Ok(false) => return false,
                        Err(e) => {
                            self.fatal.set(e);
                            return false;
                        }
                    }
                }
            }
            Mode::ExactlyOnce(tx) => {
                // An output a transaction was refused for good goes as its stand-in this time.
                let records = records
                    .into_iter()
                    .map(|r| match tx.buffer.refusal(&r) {
                        Some(error) => {
                            self.metrics.emit(InternalEvent::OutputRefused { topic: &r.topic, bytes: r.size(), error: &error });
                            r.stand_in(&error, &self.dead_letter_topic)
                        }
                        None => r,
                    })
                    .collect();
                if !tx.buffer.push(ticket, records) {
                    return false;
                }
            }
        }
        self.tracker.complete(ticket)
    }

    /// Commits what is finished for `only` (or every partition): plain offsets in at-least-once
    /// mode, a transaction with the buffered outputs in exactly-once mode.
    pub fn commit<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, only: Option<&[PartitionKey]>, mode: CommitMode) -> Result<(), TxnError> {
        if let Mode::ExactlyOnce(tx) = &self.mode {
            let result = tx.commit_step(consumer, only).map(|_| ());
            if let Err(TxnError::Reset(_)) = &result {
                self.renewal_due.store(true, Ordering::SeqCst);
                self.require_rewind();
            }
            return result;
        }
        let commits = self.tracker.commits_due(only);
        if commits.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), pos) in &commits {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*pos));
        }
        // Positions count as committed only once the broker says so: here for a synchronous
        // commit, in the consumer's commit callback for an asynchronous one. Until then they stay
        // due, so a commit lost to a coordinator restart is sent again.
        match consumer.commit(&tpl, mode) {
            Ok(()) if matches!(mode, CommitMode::Sync) => self.tracker.mark_committed(&commits),
            Ok(()) => {}
            // Not fatal in at-least-once: the positions stay due and go again next turn.
            Err(e) => tracing::warn!(error = %e, "offset commit failed; retrying on the next turn"),
        }
        Ok(())
    }

    /// Records waiting for their outputs to be committed: unfinished ones, plus (exactly-once)
    /// finished ones whose outputs wait in the transaction buffer behind an unfinished one.
    pub fn held(&self) -> (usize, usize) {
        let (mut count, mut bytes) = (self.tracker.in_flight(), self.tracker.in_flight_bytes());
        if let Mode::ExactlyOnce(tx) = &self.mode {
            let (n, b) = tx.buffer.size();
            count += n;
            bytes += b;
        }
        (count, bytes)
    }

    /// Starts `key` afresh: work read before is stale and its buffered outputs are dropped.
    /// After an assignment or a rewind.
    pub fn restart(&self, key: &PartitionKey) {
        self.tracker.assign(&key.0, key.1);
        self.drop_buffered(key);
    }

    /// Lets go of a revoked partition: its unfinished work and buffered outputs are forgotten.
    pub fn release(&self, key: &PartitionKey) {
        self.tracker.forget(&key.0, key.1);
        self.drop_buffered(key);
    }

    fn drop_buffered(&self, key: &PartitionKey) {
        if let Mode::ExactlyOnce(tx) = &self.mode {
            tx.buffer.clear(key);
        }
    }

    /// Whether the source must recover (`renew`, then rewind and `rewound`) before it reads on.
    pub fn recovery_due(&self) -> bool {
        self.renewal_due.load(Ordering::SeqCst) || self.rewind_due.load(Ordering::SeqCst)
    }

    /// The consumer must go back to the committed offsets before it reads on.
    pub fn require_rewind(&self) {
        self.rewind_due.store(true, Ordering::SeqCst);
    }

    /// The consumer went back to the committed offsets.
    pub fn rewound(&self) {
        self.rewind_due.store(false, Ordering::SeqCst);
    }

    /// Replaces a transactional producer that failed for good (see `TxnError::Reset`). Err(Reset)
    /// while the broker cannot be reached: try again later. Nothing to do in at-least-once mode,
    /// whose producer replaces itself.
    pub fn renew(&self) -> Result<(), TxnError> {
        if let Mode::ExactlyOnce(tx) = &self.mode {
            if self.renewal_due.load(Ordering::SeqCst) {
                tx.renew()?;
                self.renewal_due.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Waits for everything handed to the producer to be sent.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        use rdkafka::producer::Producer;
        match &self.mode {
            Mode::AtLeastOnce(p) => p.flush(timeout),
            Mode::ExactlyOnce(tx) => tx.producer().flush(timeout),
        }
        .map_err(|e| anyhow!("flushing the producer: {e}"))
    }
}
