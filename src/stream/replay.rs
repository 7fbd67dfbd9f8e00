//! `dcam-stream replay`: re-scores a time range of a topic (or a folder/dataset) with any model.
//! Start offsets come from `offsets_for_times`, end offsets are fixed when the replay starts, and
//! the replay reads with explicit assignment and a group of its own that never commits, so the
//! live group's offsets are never touched. Heatmaps go under `replay/<replay id>/...`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};

use rdkafka::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::delivery::{Delivery, OffsetTracker};
use crate::inference::active::ModelSlot;
use crate::kafka;
use crate::stream::operator::assemble;
use crate::stream::sink::{Oversight, SinkSettings};
use crate::stream::source::job_from_message;
use crate::telemetry::Metrics;

pub(crate) struct ReplayRequest {
    pub input_topic: String,
    pub from: DateTime<Utc>,
    pub to: Option<DateTime<Utc>>,
    pub partitions: Option<Vec<i32>>,
    pub output_topic: String,
    pub dead_letter_topic: Option<String>,
}

/// What a replay reports when it ends: as JSON, the record of `schemas/replay-summary.json`
/// (partitions become string keys, ranges `[start, end]` arrays); `Display` is the line for people.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ReplaySummary {
    pub records: u64,
    pub scored: u64,
    pub anomalies: u64,
    pub dead_letters: u64,
    #[serde(rename = "duration_s", serialize_with = "seconds")]
    pub duration: Duration,
    /// Per partition: [start, end) offsets replayed.
    pub ranges: BTreeMap<i32, (i64, i64)>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} records ({} scored, {} anomalies, {} dead letters) in {:.1}s; ranges {:?}",
            self.records,
            self.scored,
            self.anomalies,
            self.dead_letters,
            self.duration.as_secs_f64(),
            self.ranges
        )
    }
}

/// A stable id for a replay request, so re-running it overwrites the same heatmaps.
pub(crate) fn replay_id(req: &ReplayRequest, model_version: &str) -> String {
    let to = req.to.map_or("end".to_string(), |t| t.timestamp_millis().to_string());
    let parts = req.partitions.as_ref().map_or("all".to_string(), |p| p.iter().map(i32::to_string).collect::<Vec<_>>().join("."));
    let id = format!("{}-{}-{to}-{parts}-{}", req.input_topic, req.from.timestamp_millis(), model_version);
    crate::event::replace_unsafe(&id, crate::event::NAME_PUNCTUATION)
}

/// Resolves [start, end) offsets per partition for the time range.
fn resolve_ranges(consumer: &BaseConsumer, req: &ReplayRequest) -> Result<BTreeMap<i32, (i64, i64)>> {
    let timeout = Duration::from_secs(15);
    let md = consumer.fetch_metadata(Some(&req.input_topic), timeout).context("fetching topic metadata")?;
    let topic = md.topics().first().ok_or_else(|| anyhow!("topic {} not found", req.input_topic))?;
    if topic.partitions().is_empty() {
        bail!("topic {} has no partitions (does it exist?)", req.input_topic);
    }
    let all: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    let partitions = match &req.partitions {
        Some(p) => {
            for x in p {
                if !all.contains(x) {
                    bail!("partition {x} does not exist in {} (has {all:?})", req.input_topic);
                }
            }
            p.clone()
        }
        None => all,
    };
    let lookup = |at: DateTime<Utc>| -> Result<BTreeMap<i32, Option<i64>>> {
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(&req.input_topic, *p, Offset::Offset(at.timestamp_millis()))?;
        }
        let found = consumer.offsets_for_times(tpl, timeout).context("offsets_for_times")?;
        Ok(found.elements().iter().map(|e| (e.partition(), e.offset().to_raw().filter(|o| *o >= 0))).collect())
    };
    let starts = lookup(req.from)?;
    let ends = match req.to {
        Some(to) => Some(lookup(to)?),
        None => None,
    };
    let mut out = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(&req.input_topic, p, timeout).context("fetching watermarks")?;
        // No record at/after the time means the range starts at the end.
        let start = starts.get(&p).copied().flatten().unwrap_or(high).max(low);
        let end = ends.as_ref().map_or(high, |e| e.get(&p).copied().flatten().unwrap_or(high)).min(high);
        out.insert(p, (start, end.max(start)));
    }
    Ok(out)
}

/// Runs a topic replay to completion.
pub(crate) async fn replay_topic(settings: Settings, req: ReplayRequest) -> Result<ReplaySummary> {
    let started = Instant::now();
    let engine = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || crate::inference::engine::load_configured(&s)).await??
    };
    let id = replay_id(&req, &engine.info.version);
    let group = format!("{}-replay-{}", settings.kafka.group_id, rand::random::<u32>());
    // End-of-partition events close a partition whose last offsets hold no record to deliver:
    // a transaction's commit marker, or an aborted transaction skipped by read_committed.
    let consumer: BaseConsumer =
        kafka::consumer_config(&settings.kafka, &group).set("enable.partition.eof", "true").create().context("creating the replay consumer")?;
    let ranges = {
        let (c, r) = (&consumer, &req);
        tokio::task::block_in_place(|| resolve_ranges(c, r))?
    };
    let total: i64 = ranges.values().map(|(s, e)| e - s).sum();
    tracing::info!(replay_id = %id, ?ranges, total, "replay range resolved");

    let metrics = Metrics::new();
    let tracker = Arc::new(OffsetTracker::new());
    let dead_letter_topic = req.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dlq", req.output_topic));
    let delivery = Arc::new(Delivery::at_least_once(&settings.kafka, &dead_letter_topic, tracker.clone(), metrics.clone(), Arc::default())?);
    let sink_settings = SinkSettings::for_replay(&settings, &req.output_topic, &dead_letter_topic, &id);
    // A replay judges with the model's calibration and the configured thresholds, not with
    // runtime changes: it answers "what would this model have said".
    let models = Arc::new(ModelSlot::configured(engine, &settings)?);
    let pipeline = assemble(&settings, models, sink_settings, Oversight::default(), delivery.clone(), metrics.clone())?;
    let fatal = delivery.fatal().clone();

    let mut tpl = TopicPartitionList::new();
    for (p, (start, end)) in &ranges {
        if end > start {
            tpl.add_partition_offset(&req.input_topic, *p, Offset::Offset(*start))?;
            tracker.assign(&req.input_topic, *p);
        }
    }
    let submit = pipeline.submitter();
    let progress = Progress::new(total as u64, "replay");
    let consumed = tokio::task::block_in_place(|| -> Result<u64> {
        consumer.assign(&tpl).context("assigning replay partitions")?;
        let mut open: BTreeMap<i32, i64> = ranges.iter().filter(|(_, (s, e))| e > s).map(|(p, (_, e))| (*p, *e)).collect();
        let mut consumed = 0u64;
        while !open.is_empty() {
            if let Some(e) = fatal.get() {
                bail!("{e}");
            }
            // Bounded in-flight work, as in the operator.
            tracker.wait_below(settings.pipeline.max_in_flight, Duration::from_secs(1));
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = match msg {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    // Everything up to the high watermark, which is at or past `end`, was read.
                    if open.remove(&p).is_some() {
                        let mut done = TopicPartitionList::new();
                        done.add_partition(&req.input_topic, p);
                        let _ = consumer.pause(&done);
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "replay consumer error");
                    continue;
                }
            };
            let p = rdkafka::Message::partition(&m);
            let Some(&end) = open.get(&p) else { continue };
            let offset = rdkafka::Message::offset(&m);
            if offset < end {
                let job = job_from_message(&m, &tracker);
                drop(m);
                submit.send(job).map_err(|_| anyhow!("pipeline stopped"))?;
                consumed += 1;
                progress.tick(consumed, || anomalies(&metrics));
            }
            if offset + 1 >= end {
                open.remove(&p);
                let mut done = TopicPartitionList::new();
                done.add_partition(&req.input_topic, p);
                let _ = consumer.pause(&done);
            }
        }
        Ok(consumed)
    })?;
    drop(submit);
    tokio::task::block_in_place(|| -> Result<()> {
        while !tracker.wait_drained(None, Duration::from_secs(1)) {
            if let Some(e) = fatal.get() {
                bail!("{e}");
            }
        }
        Ok(())
    })?;
    tokio::task::spawn_blocking(move || pipeline.finish()).await?;
    tokio::task::block_in_place(|| delivery.flush(Duration::from_secs(30))).context("flushing replay output")?;
    progress.finish();
    let t = &metrics.totals;
    Ok(ReplaySummary {
        records: consumed,
        scored: t.scored.load(Ordering::Relaxed),
        anomalies: t.anomalies.load(Ordering::Relaxed),
        dead_letters: t.dead_letters.load(Ordering::Relaxed),
        duration: started.elapsed(),
        ranges,
    })
}

/// A progress bar on a terminal, periodic log lines otherwise (replay, `dlq redrive`).
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    what: &'static str,
    last_log: std::sync::Mutex<Instant>,
}

impl Progress {
    /// `what` names the work in the log lines written when stderr is not a terminal.
    pub(crate) fn new(total: u64, what: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} ETA {eta} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Self { bar, total, what, last_log: std::sync::Mutex::new(Instant::now()) }
    }

    /// `message` is shown beside the bar (e.g. "3 anomalies"); built only when shown.
    pub(crate) fn tick(&self, done: u64, message: impl FnOnce() -> String) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            b.set_message(message());
            return;
        }
        let mut last = self.last_log.lock().expect("progress");
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            tracing::info!(done, total = self.total, detail = message(), "{} progress", self.what);
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn anomalies(metrics: &Metrics) -> String {
    format!("{} anomalies", metrics.totals.anomalies.load(Ordering::Relaxed))
}

/// `replay --dir`: scores files in file order without Kafka; JSON lines to `output` or stdout.
pub(crate) fn replay_dir(
    settings: &Settings,
    paths: &[PathBuf],
    output: Option<&std::path::Path>,
    heatmaps: Option<&std::path::Path>,
) -> Result<ReplaySummary> {
    use std::io::Write;
    let started = Instant::now();
    let files = crate::dataset::list(paths, crate::dataset::Split::All)?;
    let engine = crate::inference::engine::load_configured(settings)?;
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let progress = Progress::new(files.len() as u64, "replay");
    let metrics = Metrics::new();
    let mut summary = ReplaySummary::default();
    let mut write_err = None;
    crate::stream::offline::score_files(settings, engine, &files, heatmaps, |r| {
        summary.records += 1;
        match r.is_anomaly {
            Some(a) => {
                summary.scored += 1;
                summary.anomalies += a as u64;
            }
            None => summary.dead_letters += 1,
        }
        if let Err(e) = writeln!(out, "{}", serde_json::to_string(r).expect("json")) {
            write_err.get_or_insert(e);
        }
        progress.tick(summary.records, || anomalies(&metrics));
    })?;
    progress.finish();
    if let Some(e) = write_err {
        return Err(e).context("writing replay output");
    }
    out.flush()?;
    summary.duration = started.elapsed();
    Ok(summary)
}

pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).with_context(|| format!("{s:?} is not an RFC 3339 time (e.g. 2026-11-27T08:00:00Z)"))
}
