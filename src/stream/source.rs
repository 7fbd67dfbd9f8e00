//! Source: the consumer-group member. Runs on its own thread with librdkafka's blocking API:
//! polls records into the pipeline, pauses partitions when too much is in flight, commits
//! finished offsets (or runs the transaction step), and drains before letting partitions go.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::delivery::transaction::TxnError;
use crate::delivery::{Delivery, OffsetTracker, PartitionKey};
use crate::shutdown::Shutdown;
use crate::stream::pipeline::{Job, Submitter};
use crate::telemetry::{Health, Metrics, PartitionLabels};

pub struct SourceContext {
    pub delivery: Arc<Delivery>,
    /// How long a revoke or shutdown waits for in-flight work before letting go of it uncommitted;
    /// below max.poll.interval.ms so waiting never gets this member evicted.
    pub drain_timeout: Duration,
    /// The partitions this member owns now, kept by the rebalance callbacks: the lag reporter
    /// covers every one of them, including those nothing was read from yet.
    pub assignment: Arc<Mutex<BTreeSet<PartitionKey>>>,
}

impl SourceContext {
    pub fn new(delivery: Arc<Delivery>, max_poll_interval: Duration) -> Self {
        Self { delivery, drain_timeout: (max_poll_interval / 2).min(Duration::from_secs(30)), assignment: Arc::default() }
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

impl ClientContext for SourceContext {
    /// With `enable.partition.eof` (the fetch gate), librdkafka also reports reaching a partition's
    /// end as a client-wide error event at times (after a pause, resume or seek, seen with the mock
    /// cluster); that is the normal state of a caught-up consumer, not an error. Such an event names
    /// no partition, so the gate only learns ends from the consumer's own queue.
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!(reason, "reached the end of a partition");
            return;
        }
        crate::kafka::log_client_error(&error, reason);
    }
}

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
            // Delivery marked the producer for renewal; the source loop recovers after this.
            Err(TxnError::Reset(e)) => {
                tracing::warn!(error = %e, "transactional producer failed on revoke; the next owner re-scores")
            }
            Err(TxnError::Fatal(e)) => self.delivery.fatal().set(format!("fatal transaction error during rebalance: {e}")),
        }
        let mut assignment = self.assignment.lock().expect("assignment");
        for key in &keys {
            self.delivery.release(key);
            assignment.remove(key);
        }
        tracing::info!(?keys, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let keys = partition_keys(tpl);
                for key in &keys {
                    self.delivery.restart(key);
                }
                // librdkafka keeps a partition's pause flag on the partition object it reuses for
                // a new assignment, so a partition paused by back-pressure before the rebalance
                // would come back paused, and with nothing in flight nothing would ever resume
                // it. Start every new partition running; the source loop pauses it again within
                // a turn if in-flight work is still full.
                if !keys.is_empty() {
                    if let Err(e) = consumer.resume(tpl) {
                        tracing::warn!(error = %e, "resuming newly assigned partitions failed");
                    }
                }
                self.assignment.lock().expect("assignment").extend(keys.iter().cloned());
                tracing::info!(?keys, "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    /// Asynchronous commits count only once the broker confirms them (`Delivery::commit`).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.tracker().mark_committed(&offsets_in(offsets));
            }
            Err(e) => tracing::warn!(error = %e, "offset commit failed; the positions stay due and go again"),
        }
    }
}

fn partition_keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

pub(crate) struct SourceOptions {
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub commit_interval: Duration,
    /// A partition whose oldest record waits longer than this makes `/readyz` fail; so does lag
    /// with no input finished for this long.
    pub stuck_after: Duration,
    /// Lag with no input finished for this long ends the source with an error, so the process
    /// exits and the orchestrator restarts it; zero = never.
    pub restart_stalled_after: Duration,
    /// Once every assigned partition has been read to its end with more than twice this many
    /// inputs unfinished, fetching stops until no more than this many are (`FetchGate`).
    pub refill_below: usize,
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
pub(crate) fn run(
    consumer: &BaseConsumer<SourceContext>,
    submit: &Submitter,
    opts: &SourceOptions,
    shutdown: &Shutdown,
    metrics: &Metrics,
    health: &Health,
) -> Result<()> {
    let ctx = consumer.context();
    let tracker = ctx.tracker();
    let gate = FetchGate { max_in_flight: opts.max_in_flight, max_in_flight_bytes: opts.max_in_flight_bytes, refill_below: opts.refill_below };
    let mut ends = PartitionEnds::default();
    let mut paused = false;
    let mut last_commit = Instant::now();
    let mut last_pause_check = Instant::now();
    let mut last_stuck_check = Instant::now();
    let mut progress = ProgressWatch::new(Instant::now());
    while !shutdown.is_requested() {
        health.beat();
        if ctx.delivery.recovery_due() {
            recover(consumer, shutdown, health)?;
            ends.clear();
            paused = true; // recover paused everything; the gate resumes it
        }
        let (held, held_bytes) = ctx.delivery.held();
        metrics.in_flight.set(held as i64);
        metrics.in_flight_bytes.set(held_bytes as i64);
        let (owned, caught_up) = {
            let assignment = ctx.assignment.lock().expect("assignment");
            (assignment.len(), ends.all_reached(&assignment))
        };
        let stop = gate.stop_fetching(paused, held, held_bytes, tracker.in_flight(), caught_up);
        // Re-pause periodically to cover newly assigned partitions.
        if stop.is_some() && (!paused || last_pause_check.elapsed() > Duration::from_millis(200)) {
            if !paused && stop == Some(StopReason::CaughtUp) {
                metrics.caught_up_pauses.inc();
            }
            pause_all(consumer);
            paused = true;
            last_pause_check = Instant::now();
        } else if paused && stop.is_none() {
            resume(consumer);
            // Whether a partition grew while paused is known only from what the fetch brings.
            ends.clear();
            paused = false;
        }
        metrics.partitions_paused.set(if paused { owned as i64 } else { 0 });
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                ends.record_read(m.partition());
                let job = job_from_message(&m, tracker);
                tracing::trace!(topic = m.topic(), partition = m.partition(), offset = m.offset(), "consumed");
                drop(m);
                if submit.send(job).is_err() {
                    return Err(anyhow!("pipeline stopped unexpectedly"));
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => ends.reached(partition),
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
            let lag = metrics.total_lag.load(Ordering::Relaxed);
            let since = progress.observe(tracker.completed(), lag, Instant::now());
            metrics.seconds_since_progress.set(since.as_secs() as i64);
            health.set_stalled((since > opts.stuck_after).then(|| format!("lag {lag} and no input finished for {}s", since.as_secs())));
            if !opts.restart_stalled_after.is_zero() && since > opts.restart_stalled_after {
                return Err(anyhow!(
                    "stalled: lag {lag} and no input finished for {}s (pipeline.restart_stalled_after_ms); exiting so the orchestrator restarts this instance",
                    since.as_secs()
                ));
            }
        }
        if last_commit.elapsed() >= opts.commit_interval {
            last_commit = Instant::now();
            if handle_commit(consumer, CommitMode::Async)? != CommitOutcome::Committed {
                ends.clear(); // rewound (or about to be): read again from the committed offsets
            }
        }
    }
    tracing::info!(in_flight = tracker.in_flight(), "shutting down: draining in-flight work");
    if !tracker.wait_drained(None, ctx.drain_timeout) {
        tracing::warn!("in-flight work did not drain in time; it will be re-scored after restart");
    }
    if handle_commit(consumer, CommitMode::Sync)? != CommitOutcome::Committed {
        // Nothing is lost: the group's offsets stay at the last commit, so the next owner re-reads these.
        tracing::warn!("the last transaction did not commit at shutdown; its inputs are scored again after restart");
    }
    consumer.unsubscribe();
    Ok(())
}

/// Why the source stops fetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Back-pressure: `max_in_flight` or `max_in_flight_bytes` reached; fetching starts again at
    /// half of both.
    Full,
    /// Every assigned partition has been read to its end and the pipeline has more than twice
    /// `refill_below` inputs to score (then until it is down to `refill_below`). Fetching now
    /// would only ask for records that do not exist yet; a broker that answers an empty fetch at
    /// once (noida-db) turns that into a loop taking CPU from scoring, on both sides. New records
    /// wait in the topic instead of in the pipeline's queue, behind the same work: fetching resumes
    /// with enough left to score to cover a fetch round trip, so the engines never wait for it.
    CaughtUp,
}

/// When the source fetches: the back-pressure limits, and the refill mark below which it must be
/// fetching even when caught up.
#[derive(Debug, Clone, Copy)]
struct FetchGate {
    max_in_flight: usize,
    max_in_flight_bytes: usize,
    refill_below: usize,
}

impl FetchGate {
    /// Whether to be paused, given whether it is now: `held` counts (and weighs) records until
    /// their outputs are committed, `unfinished` only those still to be scored.
    fn stop_fetching(&self, paused: bool, held: usize, held_bytes: usize, unfinished: usize, caught_up: bool) -> Option<StopReason> {
        let full = held >= self.max_in_flight || held_bytes >= self.max_in_flight_bytes;
        let half = held <= self.max_in_flight / 2 && held_bytes <= self.max_in_flight_bytes / 2;
        // Caught up, it stops only with a real backlog (twice the mark) and, once stopped, stays
        // stopped down to the mark: a stream that keeps the pipeline near its mark never pauses.
        let backlog = if paused { self.refill_below } else { 2 * self.refill_below };
        if full || (paused && !half) {
            Some(StopReason::Full)
        } else if caught_up && unfinished > backlog {
            Some(StopReason::CaughtUp)
        } else {
            None
        }
    }
}

/// The partitions read to their end (librdkafka's partition-EOF event) with nothing read from
/// them since. The event names the partition number only, so a number stands for that partition
/// of every input topic: with several topics a partition may count as read to its end early,
/// which at worst pauses fetching while the pipeline still has `refill_below` inputs to score.
#[derive(Debug, Default)]
struct PartitionEnds {
    reached: BTreeSet<i32>,
}

impl PartitionEnds {
    fn reached(&mut self, partition: i32) {
        self.reached.insert(partition);
    }

    fn record_read(&mut self, partition: i32) {
        self.reached.remove(&partition);
    }

    fn clear(&mut self) {
        self.reached.clear();
    }

    /// True when this member owns partitions and every one has been read to its end.
    fn all_reached(&self, assignment: &BTreeSet<PartitionKey>) -> bool {
        !assignment.is_empty() && assignment.iter().all(|(_, partition)| self.reached.contains(partition))
    }
}

/// How long the input has been lagging with nothing finishing: the clock runs only while there
/// is lag and the count of finished inputs stands still, so an idle operator is never "stalled".
#[derive(Debug)]
struct ProgressWatch {
    completed: u64,
    since: Instant,
}

impl ProgressWatch {
    fn new(now: Instant) -> Self {
        Self { completed: 0, since: now }
    }

    /// Takes the finished-input count and the lag now; returns the time without progress.
    fn observe(&mut self, completed: u64, lag: i64, now: Instant) -> Duration {
        if completed != self.completed || lag <= 0 {
            self.completed = completed;
            self.since = now;
        }
        now.duration_since(self.since)
    }
}

/// What a commit turn did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// The transaction aborted and the consumer went back to the committed offsets.
    Rewound,
    /// The transactional producer must be replaced, or the rewind could not reach the broker:
    /// the source loop recovers (`recover`) before it reads on.
    Recovering,
}

/// One commit turn; an aborted transaction leads to a rewind, a producer that failed for good to
/// its renewal, and only a fenced or unsendable one to an error.
pub fn handle_commit(consumer: &BaseConsumer<SourceContext>, mode: CommitMode) -> Result<CommitOutcome> {
    let delivery = &consumer.context().delivery;
    match delivery.commit(consumer, None, mode) {
        Ok(()) => Ok(CommitOutcome::Committed),
        Err(TxnError::Aborted(e)) => {
            tracing::warn!(error = %e, "transaction aborted; rewinding to the last committed offsets");
            match rewind(consumer) {
                Ok(()) => Ok(CommitOutcome::Rewound),
                Err(e) => {
                    tracing::warn!(error = %e, "rewind failed; retrying until the broker answers");
                    delivery.require_rewind();
                    Ok(CommitOutcome::Recovering)
                }
            }
        }
        Err(TxnError::Reset(e)) => {
            tracing::warn!(error = %e, "the transactional producer failed; replacing it, then rewinding");
            Ok(CommitOutcome::Recovering)
        }
        Err(TxnError::Fatal(e)) => Err(anyhow!("{e}")),
    }
}

/// After the transactional producer failed for good (a broker restart lost its state) or a
/// rewind could not reach the broker: every partition is paused and the loop keeps polling, so
/// this member stays in its group; once the broker answers, a new producer takes over and the
/// consumer goes back to the committed offsets. Err only when another instance fenced this one.
fn recover(consumer: &BaseConsumer<SourceContext>, shutdown: &Shutdown, health: &Health) -> Result<()> {
    let delivery = &consumer.context().delivery;
    pause_all(consumer);
    let mut delay = Duration::from_millis(200);
    let mut wait = |what: &str, error: &dyn std::fmt::Display| {
        tracing::warn!(%error, "{what} failed; retrying in {delay:?}");
        let until = Instant::now() + delay;
        while Instant::now() < until && !shutdown.is_requested() {
            health.beat();
            // Records polled here are dropped on purpose: the rewind below reads them again.
            let _ = consumer.poll(Duration::from_millis(50));
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    };
    while !shutdown.is_requested() {
        match delivery.renew() {
            Ok(()) => break,
            Err(TxnError::Fatal(e)) => return Err(anyhow!("{e}")),
            Err(e) => wait("replacing the transactional producer", &e),
        }
    }
    while !shutdown.is_requested() {
        match rewind(consumer) {
            Ok(()) => {
                delivery.rewound();
                tracing::info!("recovered: reading again from the committed offsets");
                return Ok(());
            }
            Err(e) => wait("rewinding to the committed offsets", &e),
        }
    }
    Ok(())
}

/// After an aborted transaction: seek every assigned partition back to its committed offset
/// and forget in-flight work, so everything after the last commit is scored again.
pub(crate) fn rewind(consumer: &BaseConsumer<SourceContext>) -> Result<()> {
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

/// Pauses every assigned partition (back-pressure, recovery).
fn pause_all(consumer: &BaseConsumer<SourceContext>) {
    if let Ok(a) = consumer.assignment() {
        let _ = consumer.pause(&a);
    }
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
/// thread and client, so the broker round trips never stall the source loop. It covers every
/// assigned partition: one nothing was read from yet (just assigned, or paused) counts from the
/// group's committed offset, so a stalled partition shows its lag instead of hiding it.
/// `config` must carry the operator's group id; this client never joins the group.
pub(crate) fn spawn_lag_reporter(
    config: rdkafka::ClientConfig,
    tracker: Arc<OffsetTracker>,
    assignment: Arc<Mutex<BTreeSet<PartitionKey>>>,
    metrics: Arc<Metrics>,
    stop: Shutdown,
) -> Result<std::thread::JoinHandle<()>> {
    let client: BaseConsumer = config.create().map_err(|e| anyhow!("lag reporter client: {e}"))?;
    Ok(std::thread::Builder::new().name("lag".into()).spawn(move || {
        let mut reported: BTreeSet<PartitionKey> = BTreeSet::new();
        while !stop.is_requested() {
            let owned = assignment.lock().expect("assignment").clone();
            let read: std::collections::HashMap<_, _> = tracker.positions(None).into_iter().collect();
            let committed = committed_positions(&client, owned.iter().filter(|k| !read.contains_key(*k)));
            let mut total = 0;
            for key in &owned {
                let Ok((low, high)) = client.fetch_watermarks(&key.0, key.1, Duration::from_secs(2)) else {
                    continue;
                };
                let position = read.get(key).or(committed.get(key)).copied().unwrap_or(low);
                let lag = (high - position).max(0);
                total += lag;
                metrics.consumer_lag.get_or_create(&PartitionLabels { topic: key.0.clone(), partition: key.1 }).set(lag);
            }
            // Partitions that moved to another member are theirs to report.
            for gone in reported.difference(&owned) {
                metrics.consumer_lag.remove(&PartitionLabels { topic: gone.0.clone(), partition: gone.1 });
            }
            reported = owned;
            metrics.total_lag.store(total, Ordering::Relaxed);
            if stop.sleep(Duration::from_secs(5)) {
                return;
            }
        }
    })?)
}

/// The group's committed offsets of `keys` (those with one).
fn committed_positions<'a>(client: &BaseConsumer, keys: impl Iterator<Item = &'a PartitionKey>) -> std::collections::HashMap<PartitionKey, i64> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in keys {
        tpl.add_partition(topic, *partition);
    }
    if tpl.count() == 0 {
        return Default::default();
    }
    let Ok(committed) = client.committed_offsets(tpl, Duration::from_secs(2)) else {
        return Default::default();
    };
    offsets_in(&committed).into_iter().collect()
}

/// The partitions of `tpl` that carry a real offset, with it.
fn offsets_in(tpl: &TopicPartitionList) -> Vec<(PartitionKey, i64)> {
    tpl.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATE: FetchGate = FetchGate { max_in_flight: 512, max_in_flight_bytes: 1 << 28, refill_below: 16 };

    #[test]
    fn a_source_that_read_everything_stops_fetching_while_it_has_enough_to_score() {
        // Not caught up: fetch however much waits (back-pressure aside).
        assert_eq!(GATE.stop_fetching(false, 400, 1 << 20, 400, false), None);
        // Caught up with 400 to score: stop, and stay stopped down to the refill mark.
        assert_eq!(GATE.stop_fetching(false, 400, 1 << 20, 400, true), Some(StopReason::CaughtUp));
        assert_eq!(GATE.stop_fetching(true, 200, 1 << 20, 17, true), Some(StopReason::CaughtUp));
        // At the refill mark fetching starts again, so new records come before the engines run dry.
        assert_eq!(GATE.stop_fetching(true, 16, 1 << 20, 16, true), None);
        // Running, it stops only for a real backlog: twice the mark. A paced stream that keeps a
        // little more than the mark in the pipeline never pauses.
        assert_eq!(GATE.stop_fetching(false, 32, 1 << 20, 32, true), None);
        assert_eq!(GATE.stop_fetching(false, 33, 1 << 20, 33, true), Some(StopReason::CaughtUp));
        // Outputs waiting for their commit are not work: only unfinished inputs keep it stopped.
        assert_eq!(GATE.stop_fetching(false, 100, 1 << 20, 3, true), None);
    }

    #[test]
    fn back_pressure_pauses_at_the_limits_and_resumes_at_half() {
        assert_eq!(GATE.stop_fetching(false, 512, 0, 512, false), Some(StopReason::Full));
        assert_eq!(GATE.stop_fetching(false, 1, 1 << 28, 1, false), Some(StopReason::Full));
        assert_eq!(GATE.stop_fetching(true, 300, 0, 300, false), Some(StopReason::Full));
        assert_eq!(GATE.stop_fetching(true, 256, 0, 256, false), None);
        assert_eq!(GATE.stop_fetching(false, 300, 0, 300, false), None);
    }

    #[test]
    fn a_partition_counts_as_read_to_its_end_until_a_record_comes_from_it() {
        let assignment: BTreeSet<PartitionKey> = [("in".to_string(), 0), ("in".to_string(), 1)].into();
        let mut ends = PartitionEnds::default();
        assert!(!ends.all_reached(&assignment));
        ends.reached(0);
        assert!(!ends.all_reached(&assignment), "partition 1 not read to its end yet");
        ends.reached(1);
        assert!(ends.all_reached(&assignment));
        ends.record_read(1);
        assert!(!ends.all_reached(&assignment), "a record came from partition 1: it grew");
        ends.reached(1);
        ends.clear();
        assert!(!ends.all_reached(&assignment), "after a resume or rewind nothing is known");
        assert!(!PartitionEnds::default().all_reached(&BTreeSet::new()), "owning nothing is not being caught up");
    }

    #[test]
    fn the_stall_clock_runs_only_while_there_is_lag_and_nothing_finishes() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut watch = ProgressWatch::new(t0);
        // Idle for an hour with nothing to read: never stalled.
        assert_eq!(watch.observe(0, 0, at(3600)), Duration::ZERO);
        // Input arrives and finishes: progress.
        assert_eq!(watch.observe(5, 12, at(3601)), Duration::ZERO);
        // Lag, and the finished count stands still (a partition left paused): the clock runs.
        assert_eq!(watch.observe(5, 12, at(3611)), Duration::from_secs(10));
        assert_eq!(watch.observe(5, 40, at(3700)), Duration::from_secs(99));
        // One input finishes: the clock starts again.
        assert_eq!(watch.observe(6, 40, at(3701)), Duration::ZERO);
        // Caught up with nothing finishing (lag 0): not a stall either.
        assert_eq!(watch.observe(6, 0, at(3800)), Duration::ZERO);
    }
}
