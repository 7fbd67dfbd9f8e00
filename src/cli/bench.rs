//! `dcam-stream bench`: in one run on one model, (a) raw ONNX Runtime throughput at several batch
//! sizes and (b) end-to-end operator throughput through a broker at the same batch sizes, with
//! the ratio (b)/(a). A table on stdout, never a timed assertion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;

use crate::cli::produce::{self, WireFormat};
use crate::config::Settings;
use crate::dataset::{self, Split};
use crate::event::ScoreRecord;
use crate::inference::decode::Decoder;
use crate::inference::engine::Engine;
use crate::kafka;
use crate::stream::operator::RunningOperator;

#[derive(clap::Args)]
pub(super) struct Args {
    #[arg(long, default_value = "../shared/datasets")]
    dataset: std::path::PathBuf,
    #[arg(long, default_value_t = 192)]
    images: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// A broker process to measure through (scripts/bench.sh starts one). Without it, librdkafka's
    /// in-process MockCluster is used; it keeps only a few MB per partition, so only small images
    /// (the magnetic_tile class) are published then.
    #[arg(long)]
    brokers: Option<String>,
}

pub(super) async fn run(settings: Settings, args: Args) -> Result<()> {
    let images = args.images;
    let (rows, provider) = measure(settings, args).await?;
    print_table(&rows, provider, images);
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Row {
    pub batch: usize,
    pub raw_ips: f64,
    pub raw_p50_ms: f64,
    pub raw_p99_ms: f64,
    pub e2e_ips: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// Operator start (sessions, group join) until the first record was consumed; not in e2e_ips.
    pub startup_s: f64,
}

/// The operator's working window in wall-clock ms: first consume → last score. Throughput over
/// it leaves out the one-off start-up (group join), which would otherwise dominate short runs.
fn scoring_window_ms(records: &[ScoreRecord]) -> Option<(f64, f64)> {
    let mut first = f64::INFINITY;
    let mut last = f64::NEG_INFINITY;
    for r in records {
        let scored = chrono::DateTime::parse_from_rfc3339(&r.scored_at).ok()?.timestamp_millis() as f64;
        first = first.min(scored - r.latency_ms.total);
        last = last.max(scored);
    }
    (last > first).then_some((first, last))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// (a): batches of already-decoded images straight into the session. Latency is per batch.
fn raw_throughput(engine: &Engine, inputs: &[Vec<u8>], batch: usize, total: usize) -> Result<(f64, f64, f64)> {
    let mut buffer = Vec::new();
    engine.run(0, &inputs[0].repeat(batch), batch)?; // warm this batch shape
    let mut lat = Vec::new();
    let started = Instant::now();
    let mut done = 0;
    while done < total {
        buffer.clear();
        for i in 0..batch {
            buffer.extend_from_slice(&inputs[(done + i) % inputs.len()]);
        }
        let t = Instant::now();
        engine.run(0, &buffer, batch)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        done += batch;
    }
    let ips = done as f64 / started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok((ips, percentile(&lat, 0.5), percentile(&lat, 0.99)))
}

/// Returns the rows and the execution provider actually used.
async fn measure(settings: Settings, opts: Args) -> Result<(Vec<Row>, &'static str)> {
    let files = dataset::sample_per_class(dataset::list(std::slice::from_ref(&opts.dataset), Split::Test)?, opts.images.div_ceil(2));
    let files: Vec<_> = files.into_iter().filter(|f| opts.brokers.is_some() || f.class.as_deref() == Some("magnetic_tile")).collect();
    if files.is_empty() {
        bail!("no usable images under {} (without --brokers only magnetic_tile images are used)", opts.dataset.display());
    }
    let files: Vec<_> = files.into_iter().cycle().take(opts.images).collect();
    let mut engine_settings = settings.engine.clone();
    engine_settings.sessions = 1;
    let model = std::path::PathBuf::from(&settings.model.path);
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&model, &engine_settings)).await??);
    let decoder = Decoder::new(settings.decode.clone(), engine.input_size());
    let inputs: Vec<Vec<u8>> =
        files.iter().map(|f| decoder.decode_bytes(&std::fs::read(&f.path)?).map(|m| m.rgb).map_err(|e| anyhow::anyhow!("{e}"))).collect::<Result<_>>()?;

    let cluster = match &opts.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1)?),
    };
    let brokers = opts.brokers.clone().unwrap_or_else(|| cluster.as_ref().expect("mock").bootstrap_servers());
    let base = settings.with_overrides(&[("kafka.brokers", brokers.as_str().into())])?;
    let producer: FutureProducer = kafka::producer_config(&base, None).create()?;
    let mut rows = Vec::new();
    for &batch in &opts.batches {
        let e = engine.clone();
        let inputs2 = inputs.clone();
        let total = opts.images.max(batch * 4);
        let (raw_ips, raw_p50, raw_p99) = tokio::task::spawn_blocking(move || raw_throughput(&e, &inputs2, batch, total)).await??;

        // (b): the same images as Kafka events, published before the operator starts, so the
        // clock measures the operator alone: consume → decode → batch → infer → publish → commit.
        let run_id = rand::random::<u32>();
        let (input, scores) = (format!("bench-images-{batch}-{run_id}"), format!("bench-scores-{batch}-{run_id}"));
        match &cluster {
            Some(c) => {
                c.create_topic(&input, 1, 1)?;
                c.create_topic(&scores, 1, 1)?;
            }
            None => create_topics(&base, &[&input, &scores]).await?,
        }
        produce::publish(&producer, &input, &files, WireFormat::Raw).await?;
        let s = base.with_overrides(&[
            ("kafka.input_topics", serde_json::json!([input])),
            ("kafka.group_id", format!("bench-{run_id}").into()),
            ("kafka.session_timeout_ms", (base.kafka.session_timeout.as_millis().max(6000) as u64).into()),
            ("topics.scores", scores.as_str().into()),
            ("topics.dead_letter", format!("{scores}.dlq").into()),
            ("batch.max_batch", batch.into()),
            ("batch.queue_capacity", base.batch.queue_capacity.max(batch * 4).into()),
            ("pipeline.max_in_flight", base.pipeline.max_in_flight.max(batch * 8).into()),
            ("heatmap.policy", "none".into()),
            ("telemetry.http_addr", "127.0.0.1:0".into()),
        ])?;
        let started_ms = chrono::Utc::now().timestamp_millis() as f64;
        let op = RunningOperator::start(s, Some(engine.clone())).await?;
        let records =
            crate::cli::score_reader::ScoreReader::start(kafka::base_config(&base.kafka), &scores, files.len())?.finish(Duration::from_secs(600)).await?;
        op.stop().await?;
        let (first_ms, last_ms) = scoring_window_ms(&records).ok_or_else(|| anyhow::anyhow!("no scores to time"))?;
        let mut lat: Vec<f64> = records.iter().map(|r| r.latency_ms.total).collect();
        lat.sort_by(f64::total_cmp);
        rows.push(Row {
            batch,
            raw_ips,
            raw_p50_ms: raw_p50,
            raw_p99_ms: raw_p99,
            e2e_ips: records.len() as f64 / ((last_ms - first_ms) / 1000.0),
            e2e_p50_ms: percentile(&lat, 0.5),
            e2e_p99_ms: percentile(&lat, 0.99),
            startup_s: (first_ms - started_ms) / 1000.0,
        });
        eprintln!("batch {batch}: done");
    }
    Ok((rows, engine.provider))
}

/// Creates topics up front, so readers never wait for a metadata refresh to find them.
async fn create_topics(settings: &Settings, names: &[&str]) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka::base_config(&settings.kafka).create()?;
    let topics: Vec<NewTopic<'_>> = names.iter().map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                bail!("creating topic {t}: {e}");
            }
        }
    }
    Ok(())
}

fn print_table(rows: &[Row], provider: &str, images: usize) {
    println!("dcam-stream bench: {images} images per run, provider {provider}");
    println!("(a) raw = ONNX Runtime session alone, pre-decoded input, latency per batch");
    println!("(b) e2e = operator through the broker: consume, decode, batch, infer, publish, commit; latency per image;");
    println!("    img/s over first consume → last score (the events wait in the topic); start = start-up and group join before that\n");
    println!("| batch | (a) raw img/s | (a) p50 ms | (a) p99 ms | (b) e2e img/s | (b) p50 ms | (b) p99 ms | (b) start s | (b)/(a) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} |",
            r.batch,
            r.raw_ips,
            r.raw_p50_ms,
            r.raw_p99_ms,
            r.e2e_ips,
            r.e2e_p50_ms,
            r.e2e_p99_ms,
            r.startup_s,
            r.e2e_ips / r.raw_ips
        );
    }
}
