//! `dcam-stream dlq inspect|redrive`: what is on the dead-letter topic, and, once its cause is
//! fixed (a claim-check store back up, a limit raised), sending those records back to the input
//! topic exactly once: a transaction carries the republished records and the redrive group's
//! offsets together, so a rerun continues where the last one stopped and nothing goes twice.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::Settings;
use crate::event::{HEADER_ERROR, HEADER_ERROR_KIND};
use crate::kafka;
use crate::stream::replay::Progress;

#[derive(clap::Subcommand)]
pub(super) enum Command {
    /// A table of the dead letters: kind, count, first and last time, an example error.
    Inspect {
        /// The dead-letter topic (default: topics.dead_letter).
        #[arg(long)]
        topic: Option<String>,
        /// Only these kinds (dcam-error-kind), e.g. --kind fetch --kind decode.
        #[arg(long)]
        kind: Vec<String>,
        /// Only dead letters written at or after this time (RFC 3339, e.g. 2026-12-06T08:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
    /// Republish dead letters to the input topic: the original key, value and headers, without the
    /// dcam-error* and dcam-source headers, with dcam-redriven-from = topic/partition/offset.
    Redrive {
        #[arg(long)]
        topic: Option<String>,
        /// Where to (default: the first of kafka.input_topics).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        kind: Vec<String>,
        #[arg(long)]
        since: Option<String>,
        /// Count what would go, send nothing, commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// The consumer group that remembers how far redriving got (default: one per set of
        /// kinds, so redriving `fetch` today does not skip the `decode` ones for tomorrow).
        #[arg(long)]
        group: Option<String>,
    },
}

/// Which dead letters a command takes.
struct Filter {
    kinds: Vec<String>,
    since_ms: Option<i64>,
}

impl Filter {
    fn new(kinds: &[String], since: Option<&str>) -> Result<Self> {
        let since_ms = since
            .map(|s| chrono::DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).with_context(|| format!("--since {s:?} is not an RFC 3339 time")))
            .transpose()?;
        Ok(Self { kinds: kinds.to_vec(), since_ms })
    }

    fn takes(&self, m: &BorrowedMessage<'_>) -> bool {
        let kind_ok = self.kinds.is_empty() || header(m, HEADER_ERROR_KIND).is_some_and(|k| self.kinds.iter().any(|w| *w == k));
        let time_ok = self.since_ms.is_none_or(|since| m.timestamp().to_millis().is_some_and(|t| t >= since));
        kind_ok && time_ok
    }
}

pub(super) async fn run(settings: Settings, command: Command) -> Result<()> {
    tokio::task::spawn_blocking(move || match command {
        Command::Inspect { topic, kind, since } => {
            let topic = topic.unwrap_or_else(|| settings.topics.dead_letter.clone());
            inspect(&settings, &topic, &Filter::new(&kind, since.as_deref())?)
        }
        Command::Redrive { topic, to, kind, since, dry_run, group } => {
            let topic = topic.unwrap_or_else(|| settings.topics.dead_letter.clone());
            let to = to.or_else(|| settings.kafka.input_topics.first().cloned()).ok_or_else(|| anyhow!("no --to and no kafka.input_topics"))?;
            let group = group.unwrap_or_else(|| default_group(&kind));
            redrive(&settings, &topic, &to, &Filter::new(&kind, since.as_deref())?, &group, dry_run)
        }
    })
    .await?
}

fn default_group(kinds: &[String]) -> String {
    let mut kinds = kinds.to_vec();
    kinds.sort();
    kinds.dedup();
    format!("dcam-dlq-redrive-{}", if kinds.is_empty() { "all".to_string() } else { kinds.join("+") })
}

fn header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// Per kind: count, first and last timestamp (ms), one error text.
#[derive(Default)]
struct KindSummary {
    count: usize,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
    example: String,
}

fn inspect(settings: &Settings, topic: &str, filter: &Filter) -> Result<()> {
    let consumer: BaseConsumer = kafka::consumer_config(&settings.kafka, &format!("dcam-dlq-inspect-{}", rand::random::<u32>())).create()?;
    let mut kinds: BTreeMap<String, KindSummary> = BTreeMap::new();
    let mut selected = 0usize;
    let read = read_to_end(&consumer, topic, Offset::Beginning, "dlq inspect", |m| {
        if !filter.takes(m) {
            return Ok(format!("{selected} selected"));
        }
        selected += 1;
        let kind = header(m, HEADER_ERROR_KIND).unwrap_or("(none)").to_string();
        let s = kinds.entry(kind).or_default();
        s.count += 1;
        if let Some(t) = m.timestamp().to_millis() {
            s.first_ms = Some(s.first_ms.map_or(t, |f| f.min(t)));
            s.last_ms = Some(s.last_ms.map_or(t, |l| l.max(t)));
        }
        if s.example.is_empty() {
            s.example = header(m, HEADER_ERROR).unwrap_or_default().chars().take(100).collect();
        }
        Ok(format!("{selected} selected"))
    })?;
    println!("{topic}: {read} dead letters read, {selected} selected");
    println!("{:<20} {:>7}  {:<24} {:<24} example error", "kind", "count", "first", "last");
    let time = |ms: Option<i64>| {
        ms.and_then(chrono::DateTime::from_timestamp_millis).map_or("-".to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    for (kind, s) in &kinds {
        println!("{kind:<20} {:>7}  {:<24} {:<24} {}", s.count, time(s.first_ms), time(s.last_ms), s.example);
    }
    Ok(())
}

/// How many records one transaction carries.
const TRANSACTION_RECORDS: usize = 200;

fn redrive(settings: &Settings, topic: &str, to: &str, filter: &Filter, group: &str, dry_run: bool) -> Result<()> {
    if topic == to {
        bail!("--to must not be the dead-letter topic itself");
    }
    let consumer: BaseConsumer = kafka::consumer_config(&settings.kafka, group).create()?;
    let producer: Option<ThreadedProducer<DefaultProducerContext>> = if dry_run {
        None
    } else {
        let p: ThreadedProducer<DefaultProducerContext> =
            kafka::producer_config(&settings.kafka, Some((&format!("{group}-{topic}"), settings.delivery.transaction_timeout))).create()?;
        p.init_transactions(settings.delivery.transaction_timeout).context("init_transactions (is another redrive with this group running?)")?;
        Some(p)
    };
    let timeout = settings.delivery.transaction_timeout;
    let (mut sent, mut in_txn, mut skipped) = (0usize, 0usize, 0usize);
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let commit = |producer: &ThreadedProducer<DefaultProducerContext>, positions: &HashMap<i32, i64>| -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in positions {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*next))?;
        }
        let group_metadata = consumer.group_metadata().ok_or_else(|| anyhow!("the redrive consumer has no group metadata"))?;
        producer.send_offsets_to_transaction(&tpl, &group_metadata, timeout)?;
        producer.commit_transaction(timeout)?;
        Ok(())
    };
    let verb = if dry_run { "would redrive" } else { "redriven" };
    let read = read_to_end(&consumer, topic, Offset::Stored, "dlq redrive", |m| {
        positions.insert(m.partition(), m.offset() + 1);
        if !filter.takes(m) {
            skipped += 1;
            return Ok(format!("{verb} {sent}, skipped {skipped}"));
        }
        if let Some(producer) = &producer {
            if in_txn == 0 {
                producer.begin_transaction()?;
            }
            let source = crate::event::record_name(m.topic(), m.partition(), m.offset());
            let mut headers = rdkafka::message::OwnedHeaders::new();
            for h in m.headers().into_iter().flat_map(|h| h.iter()) {
                if !crate::event::is_dead_letter_header(h.key) {
                    headers = headers.insert(rdkafka::message::Header { key: h.key, value: h.value });
                }
            }
            headers = headers.insert(rdkafka::message::Header { key: "dcam-redriven-from", value: Some(source.as_bytes()) });
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(to).headers(headers);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            if let Some(v) = m.payload() {
                record = record.payload(v);
            }
            producer.send(record).map_err(|(e, _)| anyhow!("republishing {source} to {to}: {e}"))?;
            in_txn += 1;
            if in_txn >= TRANSACTION_RECORDS {
                commit(producer, &positions)?;
                in_txn = 0;
            }
        }
        sent += 1;
        Ok(format!("{verb} {sent}, skipped {skipped}"))
    })?;
    if let Some(producer) = &producer {
        // The offsets of skipped records are committed too, so a rerun does not look at them again.
        if !positions.is_empty() {
            if in_txn == 0 {
                producer.begin_transaction()?;
            }
            commit(producer, &positions)?;
        }
    }
    eprintln!("{topic} → {to}: {read} dead letters read (group {group}), {verb} {sent}, skipped {skipped} (other kinds or older)");
    println!("{sent}");
    Ok(())
}

/// Assigns every partition of `topic` from `start` (Beginning, or Stored: the group's committed
/// offsets) and calls `each` on every record below the end offsets seen at the start; returns how
/// many were read. A progress bar named `what` (log lines off a terminal) counts the offsets passed,
/// with the status line `each` returns beside it. Gives up (with an error) when nothing arrives for
/// 30 s before the end (an open transaction on the topic, or the broker gone).
fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    start: Offset,
    what: &'static str,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> Result<String>,
) -> Result<usize> {
    let timeout = Duration::from_secs(15);
    let md = consumer.fetch_metadata(Some(topic), timeout).with_context(|| format!("metadata of {topic}"))?;
    let partitions: Vec<i32> = md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
    if partitions.is_empty() {
        bail!("topic {topic} does not exist or has no partitions");
    }
    // Where each partition starts: the beginning, or (Stored) the group's committed offset.
    let mut starts: BTreeMap<i32, Offset> = partitions.iter().map(|p| (*p, Offset::Beginning)).collect();
    if start == Offset::Stored {
        let mut all = TopicPartitionList::new();
        for p in &partitions {
            all.add_partition(topic, *p);
        }
        for e in consumer.committed_offsets(all, timeout).context("the redrive group's committed offsets")?.elements() {
            if let Offset::Offset(at) = e.offset() {
                starts.insert(e.partition(), Offset::Offset(at));
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    // Upper bound on what is to read: offsets below the ends, transaction markers included.
    let mut to_read = 0u64;
    for (p, from) in starts {
        tpl.add_partition_offset(topic, p, from)?;
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let first = match from {
            Offset::Offset(at) => at.max(low),
            _ => low,
        };
        if high > first {
            ends.insert(p, high);
            to_read += (high - first) as u64;
        }
    }
    consumer.assign(&tpl)?;
    let progress = Progress::new(to_read, what);
    let (mut read, mut offsets_passed) = (0, 0u64);
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_progress = Instant::now();
    while !ends.is_empty() {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            kafka::take_reached_ends(consumer, &mut ends);
            if last_progress.elapsed() > Duration::from_secs(30) {
                bail!("{topic}: nothing more arrived for 30 s before the end offsets {ends:?} (an open transaction, or the broker unreachable)");
            }
            continue;
        };
        let m = result.with_context(|| format!("reading {topic}"))?;
        last_progress = Instant::now();
        let Some(end) = ends.get(&m.partition()).copied() else { continue };
        if m.offset() >= end {
            continue;
        }
        let status = each(&m)?;
        read += 1;
        // Count offsets, not records, so skipped transaction markers still move the bar.
        let before = next.insert(m.partition(), m.offset() + 1).unwrap_or(m.offset());
        offsets_passed += (m.offset() + 1 - before) as u64;
        progress.tick(offsets_passed.min(to_read), || status);
        if m.offset() + 1 >= end {
            ends.remove(&m.partition());
        }
    }
    progress.tick(to_read, String::new);
    progress.finish();
    Ok(read)
}
