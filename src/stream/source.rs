//! Source: the consumer-group member. Runs on its own thread with librdkafka's blocking API:
//! polls records into the pipeline, pauses partitions when too much is in flight, commits
//! finished offsets (or runs the transaction step), and drains before letting partitions go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::delivery::transaction::TxnError;
use crate::delivery::{Delivery, OffsetTracker, PartitionKey};
use crate::stream::pipeline::{Job, Submitter};
use crate::telemetry::{Health, Metrics, PartitionLabels};

pub struct SourceContext {
    pub delivery: Arc<Delivery>,
    /// How long a revoke or shutdown waits for in-flight work before letting go of it uncommitted;
    /// below max.poll.interval.ms so waiting never gets this member evicted.
    pub drain_timeout: Duration,
}

impl SourceContext {
    pub fn new(delivery: Arc<Delivery>, max_poll_interval: Duration) -> Self {
        Self { delivery, drain_timeout: (max_poll_interval / 2).min(Duration::from_secs(30)) }
    }

    /// Keeps the drain on revoke and shutdown to half the shutdown budget, so the commit after it
    /// still fits.
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = self.drain_timeout.min(timeout / 2);
        self
    }

    fn tracker(&self) -> &OffsetTracker {
        self.delivery.tracker()
    }
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let keys = partition_keys(tpl);
        if keys.is_empty() {
            return;
        }
        // Drain: let in-flight work of the revoked partitions finish, then commit it.
        if !self.tracker().wait_drained(Some(&keys), self.drain_timeout) {
            tracing::warn!(?keys, "revoked partitions did not drain in time; their unfinished records will be scored by the next owner");
        }
        match self.delivery.commit(consumer, Some(&keys), CommitMode::Sync) {
            Ok(()) => {}
            Err(TxnError::Aborted(e)) => {
                tracing::warn!(error = %e, "transaction aborted on revoke; the next owner re-scores")
            }
            Err(TxnError::Fatal(e)) => self.delivery.fatal().set(format!("fatal transaction error during rebalance: {e}")),
        }
        for key in &keys {
            self.delivery.release(key);
        }
        tracing::info!(?keys, "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let keys = partition_keys(tpl);
            for key in &keys {
                self.delivery.restart(key);
            }
            tracing::info!(?keys, "partitions assigned");
        }
    }
}

fn partition_keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

pub struct SourceOptions {
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub commit_interval: Duration,
    /// A partition whose oldest record waits longer than this makes `/readyz` fail.
    pub stuck_after: Duration,
}

/// Turns a record into a job and registers its offset.
pub fn job_from_message(m: &BorrowedMessage<'_>, tracker: &OffsetTracker) -> Job {
    let headers = m.headers().map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()).unwrap_or_default();
    Job {
        ticket: tracker.register(m.topic(), m.partition(), m.offset(), m.payload_len()),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: m.timestamp().to_millis(),
        consumed_at: Instant::now(),
    }
}

/// The source loop; returns when `shutdown` is set (after draining and committing) or on a
/// fatal error.
pub fn run(
    consumer: &BaseConsumer<SourceContext>,
    submit: &Submitter,
    opts: &SourceOptions,
    shutdown: &AtomicBool,
    metrics: &Metrics,
    health: &Health,
) -> Result<()> {
    let ctx = consumer.context();
    let tracker = ctx.tracker();
    let mut paused = false;
    let mut last_commit = Instant::now();
    let mut last_pause_check = Instant::now();
    let mut last_stuck_check = Instant::now();
    while !shutdown.load(Ordering::SeqCst) {
        health.beat();
        let (held, held_bytes) = ctx.delivery.held();
        metrics.in_flight.set(held as i64);
        metrics.in_flight_bytes.set(held_bytes as i64);
        let full = held >= opts.max_in_flight || held_bytes >= opts.max_in_flight_bytes;
        let half = held <= opts.max_in_flight / 2 && held_bytes <= opts.max_in_flight_bytes / 2;
        // Back-pressure with hysteresis; re-pause periodically to cover newly assigned partitions.
        if full && (!paused || last_pause_check.elapsed() > Duration::from_millis(200)) {
            if let Ok(a) = consumer.assignment() {
                let _ = consumer.pause(&a);
            }
            paused = true;
            last_pause_check = Instant::now();
        } else if paused && half {
            resume(consumer);
            paused = false;
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let job = job_from_message(&m, tracker);
                tracing::trace!(topic = m.topic(), partition = m.partition(), offset = m.offset(), "consumed");
                drop(m);
                if submit.send(job).is_err() {
                    return Err(anyhow!("pipeline stopped unexpectedly"));
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
            None => {}
        }
        if let Some(fatal) = ctx.delivery.fatal().get() {
            // Nothing is committed past the record that caused it: a restart re-reads it.
            return Err(anyhow!("{fatal}"));
        }
        if last_stuck_check.elapsed() >= Duration::from_secs(1) {
            last_stuck_check = Instant::now();
            health.set_stuck(tracker.stuck(opts.stuck_after).into_iter().map(|((t, p), waited)| format!("{t}/{p} for {}s", waited.as_secs())).collect());
        }
        if last_commit.elapsed() >= opts.commit_interval {
            last_commit = Instant::now();
            handle_commit(consumer, CommitMode::Async)?;
        }
    }
    tracing::info!(in_flight = tracker.in_flight(), "shutting down: draining in-flight work");
    if !tracker.wait_drained(None, ctx.drain_timeout) {
        tracing::warn!("in-flight work did not drain in time; it will be re-scored after restart");
    }
    handle_commit(consumer, CommitMode::Sync)?;
    consumer.unsubscribe();
    Ok(())
}

/// What a commit turn did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// The transaction aborted and the consumer went back to the committed offsets.
    Rewound,
}

/// One commit turn; an aborted transaction leads to a rewind, a fatal one to an error.
pub fn handle_commit(consumer: &BaseConsumer<SourceContext>, mode: CommitMode) -> Result<CommitOutcome> {
    match consumer.context().delivery.commit(consumer, None, mode) {
        Ok(()) => Ok(CommitOutcome::Committed),
        Err(TxnError::Aborted(e)) => {
            tracing::warn!(error = %e, "transaction aborted; rewinding to the last committed offsets");
            rewind(consumer)?;
            Ok(CommitOutcome::Rewound)
        }
        Err(TxnError::Fatal(e)) => Err(anyhow!("{e}")),
    }
}

/// After an aborted transaction: seek every assigned partition back to its committed offset
/// and forget in-flight work, so everything after the last commit is scored again.
pub fn rewind(consumer: &BaseConsumer<SourceContext>) -> Result<()> {
    let ctx = consumer.context();
    let assignment = consumer.assignment().map_err(|e| anyhow!("assignment: {e}"))?;
    let committed = consumer.committed_offsets(assignment, Duration::from_secs(10)).map_err(|e| anyhow!("committed offsets: {e}"))?;
    for e in committed.elements() {
        let (topic, partition) = (e.topic().to_string(), e.partition());
        // Back to the committed offset; a group that has never committed goes back to where
        // this assignment started reading (which auto.offset.reset chose), not to the
        // beginning of the topic. Nothing read yet: nothing to go back over.
        let target = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => ctx.tracker().first_offset(&topic, partition),
        };
        ctx.delivery.restart(&(topic.clone(), partition));
        let Some(target) = target else { continue };
        if let Err(err) = consumer.seek(&topic, partition, Offset::Offset(target), Duration::from_secs(10)) {
            return Err(anyhow!("seek {topic}/{partition} to {target}: {err}"));
        }
    }
    drop(committed);
    Ok(())
}

/// Resumes every assigned partition at the record after the last one taken in. Pausing drops
/// librdkafka's prefetched records; seeking makes the restart point explicit.
fn resume(consumer: &BaseConsumer<SourceContext>) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    if let Err(e) = consumer.resume(&assignment) {
        tracing::warn!(error = %e, "resume failed");
    }
    for ((topic, partition), next) in consumer.context().tracker().next_offsets() {
        if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(next), Duration::from_secs(5)) {
            tracing::warn!(%topic, partition, error = %e, "seek after resume failed");
        }
    }
}

/// Reports consumer lag (high watermark − committable position) every few seconds from its own
/// thread and client, so the broker round trips never stall the source loop.
pub fn spawn_lag_reporter(
    config: rdkafka::ClientConfig,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let client: BaseConsumer = config.create().map_err(|e| anyhow!("lag reporter client: {e}"))?;
    Ok(std::thread::Builder::new().name("lag".into()).spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let mut total = 0;
            for ((topic, partition), pos) in tracker.positions(None) {
                if let Ok((_, high)) = client.fetch_watermarks(&topic, partition, Duration::from_secs(2)) {
                    let lag = (high - pos).max(0);
                    total += lag;
                    metrics.consumer_lag.get_or_create(&PartitionLabels { topic, partition }).set(lag);
                }
            }
            metrics.total_lag.store(total, Ordering::Relaxed);
            for _ in 0..50 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })?)
}
