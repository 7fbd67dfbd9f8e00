//! `dcam-stream demo`: the embedded default. An in-process Kafka (librdkafka's MockCluster),
//! real images published as events, the real operator scoring them, and a report read back
//! from the scores topic. Needs nothing running beforehand.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;

use crate::cli::produce::{self, WireFormat};
use crate::cli::score_reader::ScoreReader;
use crate::config::{HeatmapPolicy, Settings};
use crate::dataset::{self, ImageFile, Split};
use crate::event::ScoreRecord;
use crate::kafka;
use crate::stream::operator::RunningOperator;

#[derive(clap::Args)]
pub(super) struct Args {
    #[arg(long, default_value = "../shared/datasets")]
    dataset: PathBuf,
    /// Test images per class (spread over all labels).
    #[arg(long, default_value_t = 24)]
    per_class: usize,
    /// Where heatmaps go (default: a temporary directory).
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Print only the summary.
    #[arg(long)]
    quiet: bool,
}

/// At most this many bytes of published-but-unscored events. librdkafka's MockCluster keeps only
/// about 5 MB per partition and trims the oldest records, unread or not (docs/DESIGN.md §8), so
/// the demo never lets more than this wait in the topic, even if it all lands on one partition.
const UNSCORED_BYTES: u64 = 3 << 20;
/// Longest wait for the next score before the demo gives up with the count so far.
const STALL: Duration = Duration::from_secs(60);

/// How many events may be unscored at once so that the largest ones stay under `UNSCORED_BYTES`
/// (base64 JSON envelopes are 4/3 of the file).
fn window(files: &[ImageFile]) -> usize {
    let largest = files.iter().filter_map(|f| std::fs::metadata(&f.path).ok()).map(|m| m.len() * 4 / 3).max().unwrap_or(1).max(1);
    (UNSCORED_BYTES / largest).clamp(1, 32) as usize
}

pub(super) async fn run(settings: Settings, opts: Args) -> Result<()> {
    let files = dataset::list(std::slice::from_ref(&opts.dataset), Split::Test)
        .with_context(|| format!("reading the demo dataset {} (use --dataset DIR)", opts.dataset.display()))?;
    if files.is_empty() {
        bail!("no images found under {}", opts.dataset.display());
    }
    let files = dataset::sample_per_class(files, opts.per_class);

    let cluster = MockCluster::new(1).context("starting the in-process Kafka (MockCluster)")?;
    let brokers = cluster.bootstrap_servers();
    let topic = settings.kafka.input_topics[0].clone();
    let (control, audit) = (settings.topics.control.clone(), settings.topics.control_audit.clone());
    for t in [Some(&topic), Some(&settings.topics.scores), Some(&settings.topics.dead_letter), control.as_ref(), audit.as_ref()].into_iter().flatten() {
        cluster.create_topic(t, opts.partitions, 1)?;
    }
    let heatmaps = opts.heatmaps.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("dcam-demo-heatmaps-{}", std::process::id())));
    // The demo shows heatmaps: `none` becomes `anomalies`.
    let policy = match settings.heatmap.policy {
        HeatmapPolicy::All => "all",
        HeatmapPolicy::Anomalies | HeatmapPolicy::None => "anomalies",
    };
    let settings = settings.with_overrides(&[
        ("kafka.brokers", brokers.clone()),
        ("kafka.session_timeout_ms", settings.kafka.session_timeout.as_millis().max(6000).to_string()),
        ("kafka.group_id", "dcam-demo".into()),
        ("telemetry.http_addr", "127.0.0.1:0".into()),
        ("heatmap.store", format!("file://{}", heatmaps.display())),
        ("heatmap.overlay", "true".into()),
        ("heatmap.policy", policy.into()),
    ])?;

    println!("dcam-stream demo: in-process Kafka at {brokers}, {} images from {}", files.len(), opts.dataset.display());
    let op = RunningOperator::start(settings.clone(), None).await?;
    let model = op.models.current();
    let info = &model.engine.info;
    println!("model {} v{} ({} classes, {}px) on {}", info.name, info.version, info.classes.len(), info.input_size, model.engine.provider);
    println!("inspection page at http://{}/ui, metrics at http://{}/metrics", op.http_addr, op.http_addr);
    let producer: FutureProducer = kafka::producer_config(&settings.kafka, None).create()?;
    let mut reader = ScoreReader::start(kafka::base_config(&settings.kafka), &settings.topics.scores, files.len())?;
    let started = Instant::now();
    // Flow control: publish the next event only while few enough are waiting to be scored.
    let window = window(&files);
    for (i, f) in files.iter().enumerate() {
        reader.wait_for((i + 1).saturating_sub(window), STALL).await?;
        produce::publish_file(&producer, &topic, f, WireFormat::Mixed.is_json(i)).await?;
    }
    let records = reader.finish(STALL).await?;
    let elapsed = started.elapsed();
    op.stop().await?;
    report(&files, &records, elapsed, &heatmaps, opts.quiet);
    Ok(())
}

fn report(files: &[ImageFile], records: &[ScoreRecord], elapsed: Duration, heatmaps: &std::path::Path, quiet: bool) {
    let by_id: HashMap<&str, &ImageFile> = files.iter().map(|f| (f.image_id.as_str(), f)).collect();
    let mut rows: Vec<&ScoreRecord> = records.iter().collect();
    rows.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    if !quiet {
        println!("\n{:<44} {:<14} {:<16} {:>6} {:>9}  heatmap", "image_id", "class", "truth", "score", "verdict");
        for r in &rows {
            let truth = by_id.get(r.image_id.as_str()).and_then(|f| f.label.clone()).unwrap_or_default();
            let verdict = if r.is_anomaly { "ANOMALY" } else { "ok" };
            let heat =
                r.heatmap_uri.as_deref().map_or("-".to_string(), |u| u.rsplit('/').take(2).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("/"));
            println!("{:<44} {:<14} {:<16} {:>6.3} {:>9}  {}", r.image_id, r.class.as_deref().unwrap_or("-"), truth, r.score, verdict, heat);
        }
    }
    let anomalies = records.iter().filter(|r| r.is_anomaly).count();
    let (mut correct, mut labelled) = (0, 0);
    for r in records {
        if let Some(label) = by_id.get(r.image_id.as_str()).and_then(|f| f.label.as_deref()) {
            labelled += 1;
            if (label != "good") == r.is_anomaly {
                correct += 1;
            }
        }
    }
    let heatmap_count = records.iter().filter(|r| r.heatmap_uri.is_some()).count();
    println!("\nsummary");
    println!("  images scored     {}", records.len());
    println!("  anomalies         {anomalies}");
    if labelled > 0 {
        println!("  agree with labels {correct}/{labelled} ({:.1}%)", 100.0 * correct as f64 / labelled as f64);
    }
    println!("  throughput        {:.1} images/s end to end ({:.1} s)", records.len() as f64 / elapsed.as_secs_f64(), elapsed.as_secs_f64());
    println!("  heatmaps          {heatmap_count} PNGs under {}", heatmaps.display());
}
