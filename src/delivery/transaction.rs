//! Exactly-once delivery (docs/DESIGN.md §4, KIP-447): finished outputs wait in a buffer; each
//! commit step publishes those whose input offsets are committable, together with the offsets,
//! in one Kafka transaction. Outputs of inputs behind an unfinished one wait for a later step,
//! so a crash between steps never leaves an output without its offset or vice versa.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::delivery::offsets::{OffsetTracker, PartitionKey, Ticket};
use crate::delivery::record::{is_permanent, OutRecord};
use crate::telemetry::{InternalEvent, Metrics};

/// Finished outputs per partition and offset, waiting for the next transaction.
pub struct TxnBuffer {
    inner: Mutex<Buffered>,
    tracker: Arc<OffsetTracker>,
    /// Outputs a transaction was refused for good, by (topic, source input), with the error: after
    /// the abort and rewind they are produced again, and must go as their stand-in dead letter.
    refused: Mutex<HashMap<(String, Vec<u8>), String>>,
}

/// The buffered outputs, with running totals: back-pressure reads them on every source turn.
#[derive(Default)]
struct Buffered {
    by_partition: HashMap<PartitionKey, BTreeMap<i64, Vec<OutRecord>>>,
    inputs: usize,
    bytes: usize,
}

impl Buffered {
    fn forget(&mut self, removed: &BTreeMap<i64, Vec<OutRecord>>) {
        self.inputs -= removed.len();
        self.bytes -= removed.values().flatten().map(OutRecord::size).sum::<usize>();
    }
}

impl TxnBuffer {
    pub fn new(tracker: Arc<OffsetTracker>) -> Self {
        Self { inner: Mutex::default(), tracker, refused: Mutex::default() }
    }

    fn refuse(&self, record: &OutRecord, error: String) {
        if let Some(source) = record.source() {
            self.refused.lock().expect("refused").insert((record.topic.clone(), source.to_vec()), error);
        }
    }

    /// Why a transaction was refused `record` for good before, if it was (a stand-in never is
    /// replaced again).
    pub fn refusal(&self, record: &OutRecord) -> Option<String> {
        if record.is_stand_in() {
            return None;
        }
        let refused = self.refused.lock().expect("refused");
        record.source().and_then(|s| refused.get(&(record.topic.clone(), s.to_vec()))).cloned()
    }

    /// Buffers a ticket's outputs, unless its partition was revoked or rewound since it was
    /// consumed. The check runs under the buffer's lock, and revoke/rewind move the tracker to a
    /// new generation before they clear the buffer, so a late sink task (a slow heatmap) can
    /// never slip outputs of the old generation into the new one: they would be committed twice.
    pub fn push(&self, ticket: &Ticket, records: Vec<OutRecord>) -> bool {
        let mut inner = self.inner.lock().expect("txn buffer");
        if !self.tracker.is_current(ticket) {
            return false;
        }
        let bytes = records.iter().map(OutRecord::size).sum::<usize>();
        let previous = inner.by_partition.entry((ticket.topic.clone(), ticket.partition)).or_default().insert(ticket.offset, records);
        inner.inputs += 1;
        inner.bytes += bytes;
        if let Some(old) = previous {
            inner.forget(&BTreeMap::from([(ticket.offset, old)]));
        }
        true
    }

    /// Removes and returns the records of offsets below each partition's position.
    fn take_below(&self, positions: &[(PartitionKey, i64)]) -> Vec<OutRecord> {
        let mut inner = self.inner.lock().expect("txn buffer");
        let mut out = Vec::new();
        for (key, pos) in positions {
            let Some(by_offset) = inner.by_partition.get_mut(key) else {
                continue;
            };
            let rest = by_offset.split_off(pos);
            let taken = std::mem::replace(by_offset, rest);
            inner.forget(&taken);
            out.extend(taken.into_values().flatten());
        }
        out
    }

    pub fn clear(&self, key: &PartitionKey) {
        let mut inner = self.inner.lock().expect("txn buffer");
        if let Some(removed) = inner.by_partition.remove(key) {
            inner.forget(&removed);
        }
    }

    /// Buffered inputs and the bytes of their outputs.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("txn buffer");
        (inner.inputs, inner.bytes)
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.size().0 == 0
    }
}

/// How a failed transaction must be handled.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Aborted: rewind the consumer to the committed offsets and carry on.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// The transactional producer failed for good without being fenced (e.g. its sequence
    /// numbers desynchronised when the broker restarted and lost its producer state): replace it
    /// (`Transactions::renew`, which bumps the epoch), rewind, and carry on, as Kafka Streams does.
    #[error("transactional producer failed: {0}")]
    Reset(String),
    /// Fenced by another live instance with the same transactional id, or an output nothing can
    /// carry: this instance must stop (the orchestrator restarts it).
    #[error("fatal transaction error: {0}")]
    Fatal(String),
}

/// The transactional producer, with a context that counts its broker connection losses.
pub(crate) type TxnProducer = FutureProducer<TxnProducerContext>;

/// Counts the transactional producer's broker connection losses. A transaction that lived through
/// one is not trusted, even when the commit reports success: a restarted broker (noida-db here)
/// can acknowledge the commit of a transaction whose state it lost, and then neither its outputs
/// nor its offsets count, while read_committed readers that were reading stop at it for good
/// (docs/DESIGN.md §5). Only a new producer (`renew`: InitProducerId) ends it for them.
pub(crate) struct TxnProducerContext {
    /// Shared with `Transactions` (librdkafka's future producer hides its context).
    connection_losses: Arc<AtomicU64>,
}

impl ClientContext for TxnProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown)) {
            self.connection_losses.fetch_add(1, Ordering::SeqCst);
        }
        crate::kafka::log_client_error(&error, reason);
    }
}

pub(crate) struct Transactions {
    /// Replaced by `renew` after a fatal (not fenced) producer error.
    producer: RwLock<TxnProducer>,
    config: ClientConfig,
    pub buffer: Arc<TxnBuffer>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    /// Broker connection losses of every producer this instance had (`TxnProducerContext`).
    connection_losses: Arc<AtomicU64>,
}

impl Transactions {
    /// Creates and initialises the transactional producer from `config`; fences any older
    /// instance with the same id.
    pub(crate) fn new(config: ClientConfig, tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>, timeout: Duration) -> Result<Self, TxnError> {
        let connection_losses = Arc::new(AtomicU64::new(0));
        let producer = init_producer(&config, timeout, &connection_losses).map_err(|e| TxnError::Fatal(e.to_string()))?;
        let buffer = Arc::new(TxnBuffer::new(tracker.clone()));
        Ok(Self { producer: RwLock::new(producer), config, buffer, tracker, metrics, timeout, connection_losses })
    }

    /// The producer in use now.
    pub(crate) fn producer(&self) -> TxnProducer {
        self.producer.read().expect("producer").clone()
    }

    /// Replaces a producer that failed for good with a new one under the same transactional id:
    /// `init_transactions` aborts whatever the old one left open and bumps the epoch, so the old
    /// one can never commit. Err(Reset) while the broker is unreachable (call again later);
    /// Err(Fatal) when another live instance has taken the id.
    pub(crate) fn renew(&self) -> Result<(), TxnError> {
        let producer = init_producer(&self.config, self.timeout, &self.connection_losses).map_err(|e| match e {
            e if is_fenced(&e, None) => TxnError::Fatal(format!("init_transactions: {e}")),
            e => TxnError::Reset(format!("init_transactions: {e}")),
        })?;
        *self.producer.write().expect("producer") = producer;
        self.metrics.emit(InternalEvent::ProducerRenewed);
        Ok(())
    }

    /// Publishes all committable outputs and their offsets in one transaction.
    /// `only` restricts the step to some partitions (used on revoke).
    pub(crate) fn commit_step<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, only: Option<&[PartitionKey]>) -> Result<usize, TxnError> {
        // Only partitions whose position advanced; a failed step is followed by a rewind,
        // which resets the tracker, so marking them here is safe.
        let positions = self.tracker.commits_due(only);
        if positions.is_empty() {
            return Ok(0);
        }
        tracing::debug!(?positions, "transaction step");
        let records = self.buffer.take_below(&positions);
        let count = records.len();
        match self.run_transaction(consumer, &records, &positions) {
            Ok(()) => {
                self.tracker.mark_committed(&positions);
                self.metrics.emit(InternalEvent::TransactionCommitted { records: count });
                Ok(count)
            }
            Err(e) => {
                self.metrics.emit(InternalEvent::TransactionAborted);
                Err(e)
            }
        }
    }

    fn run_transaction<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        records: &[OutRecord],
        positions: &[(PartitionKey, i64)],
    ) -> Result<(), TxnError> {
        let producer = self.producer();
        let losses_before = self.connection_losses.load(Ordering::SeqCst);
        // Fenced: stop. Abortable and the abort works: rewind. Anything else left the producer
        // unusable: replace it, then rewind.
        let classify = |stage: &str, e: KafkaError| -> TxnError {
            if is_fenced(&e, Some(&producer)) {
                return TxnError::Fatal(format!("{stage}: {e} (fenced: another instance uses this transactional id)"));
            }
            let abortable = matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort()) || !is_fatal(&e);
            if !abortable {
                return TxnError::Reset(format!("{stage}: {e}"));
            }
            match producer.abort_transaction(self.timeout) {
                Ok(()) => TxnError::Aborted(format!("{stage}: {e}")),
                Err(abort) if is_fenced(&abort, Some(&producer)) => TxnError::Fatal(format!("{stage}: {e}; abort: {abort} (fenced)")),
                Err(abort) => TxnError::Reset(format!("{stage}: {e}; abort failed: {abort}")),
            }
        };
        producer.begin_transaction().map_err(|e| classify("begin_transaction", e))?;
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let mut record = r.to_future_record();
            // Enqueue without awaiting; commit_transaction flushes and fails if any failed.
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((r, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                        producer.poll(Duration::from_millis(50));
                        record = back;
                    }
                    Err((e, _)) => {
                        if is_permanent(&e) {
                            self.buffer.refuse(r, e.to_string());
                        }
                        return Err(classify("produce", e));
                    }
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), pos) in positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*pos)).map_err(|e| TxnError::Fatal(format!("offsets: {e}")))?;
        }
        // Group metadata is re-read every time: it changes with each rebalance (KIP-447).
        let group = consumer.group_metadata().ok_or_else(|| TxnError::Fatal("consumer has no group metadata".into()))?;
        let committed = producer
            .send_offsets_to_transaction(&tpl, &group, self.timeout)
            .map_err(|e| ("send_offsets_to_transaction", e))
            .and_then(|()| producer.commit_transaction(self.timeout).map_err(|e| ("commit_transaction", e)));
        match committed {
            Ok(()) => {
                // Serve callbacks still queued, so a connection loss during the transaction is counted.
                producer.poll(Duration::ZERO);
                if self.connection_losses.load(Ordering::SeqCst) != losses_before {
                    return Err(TxnError::Reset(
                        "the broker connection dropped during the transaction, so its commit is not trusted (a restarted broker can acknowledge one it lost)"
                            .into(),
                    ));
                }
                Ok(())
            }
            Err((stage, e)) => {
                self.note_refused(&producer, deliveries)?;
                Err(classify(stage, e))
            }
        }
    }

    /// After a failed transaction: remembers outputs the broker refused for good (too large, not
    /// authorised, ...), so the retry sends their stand-ins instead of failing the same way
    /// forever. A refused stand-in leaves nothing to send: that stops the instance.
    fn note_refused(&self, producer: &TxnProducer, deliveries: Vec<(&OutRecord, rdkafka::producer::DeliveryFuture)>) -> Result<(), TxnError> {
        use futures::FutureExt;
        for (record, delivery) in deliveries {
            let Some(Ok(Err((e, _)))) = delivery.now_or_never() else {
                continue;
            };
            if !is_permanent(&e) {
                continue;
            }
            if record.is_stand_in() {
                producer.abort_transaction(self.timeout).ok();
                return Err(TxnError::Fatal(format!(
                    "the broker refused even the {} byte dead letter to {}: {e}; check its max.message.bytes and ACLs",
                    record.size(),
                    record.topic
                )));
            }
            tracing::error!(topic = %record.topic, bytes = record.size(), error = %e, "the broker refused an output for good; its stand-in dead letter goes in the retry");
            self.buffer.refuse(record, e.to_string());
        }
        Ok(())
    }
}

/// A transactional producer ready for its first transaction.
fn init_producer(config: &ClientConfig, timeout: Duration, connection_losses: &Arc<AtomicU64>) -> Result<TxnProducer, KafkaError> {
    let producer: TxnProducer = config.create_with_context(TxnProducerContext { connection_losses: connection_losses.clone() })?;
    producer.init_transactions(timeout)?;
    Ok(producer)
}

/// Whether `e` (or the producer's fatal error behind it) says another instance took over this
/// transactional id: the one case where carrying on would break exactly-once.
fn is_fenced(e: &KafkaError, producer: Option<&TxnProducer>) -> bool {
    let fenced = |code: RDKafkaErrorCode| matches!(code, RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced);
    e.rdkafka_error_code().is_some_and(fenced) || producer.and_then(|p| p.client().fatal_error()).is_some_and(|(code, _)| fenced(code))
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}
