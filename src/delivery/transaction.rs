//! Exactly-once delivery (docs/DESIGN.md §4, KIP-447): finished outputs wait in a buffer; each
//! commit step publishes those whose input offsets are committable, together with the offsets,
//! in one Kafka transaction. Outputs of inputs behind an unfinished one wait for a later step,
//! so a crash between steps never leaves an output without its offset or vice versa.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::delivery::offsets::{OffsetTracker, PartitionKey, Ticket};
use crate::delivery::record::{is_permanent, OutRecord};
use crate::telemetry::{KindLabels, Metrics};

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

    pub fn len(&self) -> usize {
        self.size().0
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a failed transaction must be handled.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// Aborted: rewind the consumer to the committed offsets and carry on.
    #[error("transaction aborted: {0}")]
    Aborted(String),
    /// Fenced or fatal: this instance must stop (the orchestrator restarts it).
    #[error("fatal transaction error: {0}")]
    Fatal(String),
}

pub struct Transactions {
    pub producer: FutureProducer,
    pub buffer: Arc<TxnBuffer>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

impl Transactions {
    /// Initialises the transactional producer; fences any older instance with the same id.
    pub fn new(producer: FutureProducer, tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>, timeout: Duration) -> Result<Self, TxnError> {
        producer.init_transactions(timeout).map_err(|e| TxnError::Fatal(format!("init_transactions: {e}")))?;
        Ok(Self { producer, buffer: Arc::new(TxnBuffer::new(tracker.clone())), tracker, metrics, timeout })
    }

    /// Publishes all committable outputs and their offsets in one transaction.
    /// `only` restricts the step to some partitions (used on revoke).
    pub fn commit_step<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, only: Option<&[PartitionKey]>) -> Result<usize, TxnError> {
        // Only partitions whose position advanced; a failed step is followed by a rewind,
        // which resets the tracker, so marking them here is safe.
        let positions = self.tracker.take_commits(only);
        if positions.is_empty() {
            return Ok(0);
        }
        tracing::debug!(?positions, "transaction step");
        let records = self.buffer.take_below(&positions);
        let count = records.len();
        match self.run_transaction(consumer, &records, &positions) {
            Ok(()) => {
                self.metrics.transactions.get_or_create(&KindLabels { kind: "committed".into() }).inc();
                Ok(count)
            }
            Err(e) => {
                self.metrics.transactions.get_or_create(&KindLabels { kind: "aborted".into() }).inc();
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
        let classify = |stage: &str, e: KafkaError| -> TxnError {
            let abortable = matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort()) || !is_fatal(&e);
            if abortable {
                if let Err(abort) = self.producer.abort_transaction(self.timeout) {
                    return TxnError::Fatal(format!("{stage}: {e}; abort failed: {abort}"));
                }
                TxnError::Aborted(format!("{stage}: {e}"))
            } else {
                TxnError::Fatal(format!("{stage}: {e}"))
            }
        };
        self.producer.begin_transaction().map_err(|e| TxnError::Fatal(format!("begin_transaction: {e}")))?;
        let mut deliveries = Vec::with_capacity(records.len());
        for r in records {
            let mut record = r.to_future_record();
            // Enqueue without awaiting; commit_transaction flushes and fails if any failed.
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push((r, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                        self.producer.poll(Duration::from_millis(50));
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
        let committed = self
            .producer
            .send_offsets_to_transaction(&tpl, &group, self.timeout)
            .map_err(|e| ("send_offsets_to_transaction", e))
            .and_then(|()| self.producer.commit_transaction(self.timeout).map_err(|e| ("commit_transaction", e)));
        match committed {
            Ok(()) => Ok(()),
            Err((stage, e)) => {
                self.note_refused(deliveries)?;
                Err(classify(stage, e))
            }
        }
    }

    /// After a failed transaction: remembers outputs the broker refused for good (too large, not
    /// authorised, ...), so the retry sends their stand-ins instead of failing the same way
    /// forever. A refused stand-in leaves nothing to send: that stops the instance.
    fn note_refused(&self, deliveries: Vec<(&OutRecord, rdkafka::producer::DeliveryFuture)>) -> Result<(), TxnError> {
        use futures::FutureExt;
        for (record, delivery) in deliveries {
            let Some(Ok(Err((e, _)))) = delivery.now_or_never() else {
                continue;
            };
            if !is_permanent(&e) {
                continue;
            }
            if record.is_stand_in() {
                self.producer.abort_transaction(self.timeout).ok();
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

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}
