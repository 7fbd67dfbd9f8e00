//! `dcam-stream bench`: in one run on one model and the same images,
//! (c) the per-image core-time of each stage on one thread (parse, decode + resize, inference with
//! one intra-op thread, heatmap encode) and the limit they set, cores / sum of core-times;
//! (a) raw ONNX Runtime throughput at several batch sizes and (b) end-to-end operator throughput
//! through a broker at the same batch sizes, with (b)/(a), (b)/limit and memory per in-flight
//! image. Tables on stdout, never a timed assertion; the last line is `e2e/limit = X.XX`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;

use crate::cli::produce::{self, WireFormat};
use crate::config::{usable_cores, Settings};
use crate::dataset::{self, Split};
use crate::event::ScoreRecord;
use crate::inference::decode::Decoder;
use crate::inference::engine::Engine;
use crate::inspect::percentile;
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
    /// How the events are published, and so what the parse stage costs (json: envelope + base64).
    #[arg(long, value_enum, default_value = "json")]
    format: WireFormat,
    /// Images (cycled) for each single-thread inference cost measurement, per batch size.
    #[arg(long, default_value_t = 64)]
    cost_images: usize,
    /// Also publish the same images, in the same format, to this topic (for a baseline consumer
    /// to read afterwards; scripts/bench.sh runs scripts/bench_python_consumer.py on it).
    #[arg(long)]
    export_topic: Option<String>,
    /// A folder of large JPEGs (e.g. camera-size 2048²): decode + resize per image is timed with
    /// reduced-scale IDCT (the default) and with full decode, on one thread.
    #[arg(long)]
    large_jpegs: Option<std::path::PathBuf>,
    /// (d) latency under load: events published one by one at this fraction of the limit to an
    /// operator that is already running (0 leaves it out).
    #[arg(long, default_value_t = 0.8)]
    paced_fraction: f64,
}

pub(super) async fn run(settings: Settings, args: Args) -> Result<()> {
    let images = args.images;
    let max_delay_ms = settings.batch.max_delay.as_secs_f64() * 1000.0;
    // What `dcam-stream run` would use with this configuration (the (b) rows set batch sizes and
    // one session themselves; scripts/bench_fair.py runs the operator as configured).
    let (e, cores) = (&settings.engine, usable_cores());
    println!(
        "engine policy of this configuration: provider {:?}, {} sessions x {} intra-op threads, max_batch {}, {cores} cores\n",
        e.provider, e.sessions, e.intra_threads, settings.batch.max_batch
    );
    let (rows, costs, paced, provider) = measure(settings, args).await?;
    print_costs(&costs);
    print_paced(&paced, max_delay_ms);
    print_table(&rows, &costs, provider, images);
    Ok(())
}

/// Per-image core-time of each stage, measured one image at a time on one thread.
#[derive(Debug, Clone)]
pub(super) struct Costs {
    pub cores: usize,
    pub images: usize,
    /// Parse: the real event parser on the published payload (JSON envelope + base64, or raw).
    pub parse_ms: f64,
    /// Decode + resize to S×S: the real Decoder.
    pub decode_ms: f64,
    /// (batch, ms per image) with one intra-op thread; batch 1 first.
    pub infer_ms: Vec<(usize, f64)>,
    /// Heatmap render + PNG encode, the sink's call.
    pub heatmap_ms: f64,
    /// Large JPEGs: (files, ms per image DCT-scaled, ms per image full decode), both + resize.
    pub large_jpeg: Option<(usize, f64, f64)>,
}

impl Costs {
    fn infer_at(&self, batch: usize) -> f64 {
        self.infer_ms.iter().find(|(b, _)| *b == batch).map(|(_, ms)| *ms).unwrap_or(f64::NAN)
    }

    /// Core-ms per image of everything the operator does for one image at this batch size
    /// (heatmaps only when the run renders them).
    pub(super) fn per_image_ms(&self, batch: usize, heatmaps: bool) -> f64 {
        self.parse_ms + self.decode_ms + self.infer_at(batch) + if heatmaps { self.heatmap_ms } else { 0.0 }
    }

    /// img/s if every core did nothing but this work.
    pub(super) fn limit_ips(&self, batch: usize, heatmaps: bool) -> f64 {
        self.cores as f64 * 1000.0 / self.per_image_ms(batch, heatmaps)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Row {
    pub batch: usize,
    pub raw_ips: f64,
    pub raw_p50_ms: f64,
    pub raw_p99_ms: f64,
    pub e2e_ips: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// Operator start (sessions, group join) until the first record was consumed; not in e2e_ips.
    pub startup_s: f64,
    /// Peak resident set (VmHWM) during the operator run, and the in-flight cap it ran with.
    pub peak_rss_mb: f64,
    /// Resident set just before the operator started (model, images, bench state).
    pub base_rss_mb: f64,
    pub max_in_flight: usize,
}

impl Row {
    /// (b)/limit: the share of the machine's limit the operator reached (heatmaps off, as in (b)).
    fn over_limit(&self, costs: &Costs) -> f64 {
        self.e2e_ips / costs.limit_ips(self.batch, false)
    }
}

/// (d): latency with the operator keeping up, not draining a backlog.
#[derive(Debug, Clone)]
pub(super) struct Paced {
    pub batch: usize,
    /// What `rate_ips` is a fraction of: the limit, or the best end-to-end throughput (b) reached.
    pub basis: &'static str,
    /// The publishing rate asked for, and the rate scores came out at.
    pub rate_ips: f64,
    pub scored_ips: f64,
    pub images: usize,
    /// Per image, record timestamp → score published (time in the topic included).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Its two parts at p50: record timestamp → consumed, and consumed → score published.
    pub topic_p50_ms: f64,
    pub operator_p50_ms: f64,
    /// A full batch's inference time at this batch size, from (a).
    pub batch_inference_ms: f64,
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

/// One image on the wire, as the operator's consumer hands it to the parser.
struct Payload {
    value: Vec<u8>,
    id: String,
    class: Option<String>,
}

/// Mean ms of `f` over `items`, one at a time on this thread.
fn mean_ms<T, R>(items: &[T], mut f: impl FnMut(&T) -> Result<R>) -> Result<(f64, Vec<R>)> {
    let mut out = Vec::with_capacity(items.len());
    let started = Instant::now();
    for item in items {
        out.push(f(item)?);
    }
    Ok((started.elapsed().as_secs_f64() * 1000.0 / items.len().max(1) as f64, out))
}

/// (c): per-image core-time of each stage, on the calling thread, with the operator's own code.
/// Returns the costs and the decoded model inputs (reused by (a)).
fn core_costs(settings: &Settings, payloads: &[Payload], batches: &[usize], cost_images: usize, large: &[Vec<u8>]) -> Result<(Costs, Vec<Vec<u8>>)> {
    let source = crate::event::SourceRef { topic: "bench".into(), partition: 0, offset: 0, timestamp: None };
    let (parse_ms, events) =
        mean_ms(payloads, |p| crate::event::parse_event(Some(&p.value), Some(&p.id), p.class.as_deref(), &source).map_err(|e| anyhow::anyhow!("parse: {e}")))?;
    let mut one = settings.engine.clone();
    one.sessions = 1;
    one.intra_threads = 1;
    let engine = Engine::load(std::path::Path::new(&settings.model.path), &one)?;
    let decoder = Decoder::new(settings.decode.clone(), engine.input_size());
    let with_records: Vec<_> = events.iter().zip(payloads).collect();
    let (decode_ms, inputs) = mean_ms(&with_records, |(e, p)| decoder.decode(&e.image, &p.value).map(|m| m.rgb).map_err(|e| anyhow::anyhow!("decode: {e}")))?;
    let large_jpeg = if large.is_empty() {
        None
    } else {
        let full = decoder.clone().with_jpeg_scaling(false);
        let (scaled_ms, _) = mean_ms(large, |b| decoder.decode_bytes(b).map(|m| m.rgb.len()).map_err(|e| anyhow::anyhow!("decode: {e}")))?;
        let (full_ms, _) = mean_ms(large, |b| full.decode_bytes(b).map(|m| m.rgb.len()).map_err(|e| anyhow::anyhow!("decode: {e}")))?;
        Some((large.len(), scaled_ms, full_ms))
    };

    let mut sizes = vec![1];
    sizes.extend(batches.iter().copied().filter(|&b| b != 1));
    let mut infer_ms = Vec::new();
    let mut maps = Vec::new();
    for batch in sizes {
        let total = cost_images.max(batch * 2).div_ceil(batch) * batch;
        engine.run(0, &inputs[0].repeat(batch), batch)?; // warm this batch shape
        let mut buffer = Vec::with_capacity(batch * inputs[0].len());
        let started = Instant::now();
        for start in (0..total).step_by(batch) {
            buffer.clear();
            for i in start..start + batch {
                buffer.extend_from_slice(&inputs[i % inputs.len()]);
            }
            let out = engine.run(0, &buffer, batch)?;
            if batch == 1 && maps.len() < inputs.len().min(cost_images) {
                maps.push(out.maps);
            }
        }
        infer_ms.push((batch, started.elapsed().as_secs_f64() * 1000.0 / total as f64));
    }

    let scorer = crate::inference::model::Scorer::new(&engine.info, &settings.model.thresholds)?;
    let size = engine.input_size();
    let overlay = settings.heatmap.overlay;
    let indexed: Vec<usize> = (0..maps.len()).collect();
    let (heatmap_ms, _) = mean_ms(&indexed, |&i| {
        let calibration = scorer.calibration_for(payloads[i].class.as_deref());
        Ok(crate::inference::heatmap::render_png(&maps[i], size, &calibration, overlay.then_some(inputs[i].as_slice())).len())
    })?;
    let cores = usable_cores();
    Ok((Costs { cores, images: payloads.len(), parse_ms, decode_ms, infer_ms, heatmap_ms, large_jpeg }, inputs))
}

/// A line of /proc/self/status in MB (`VmHWM`, `VmRSS`); NaN where there is none.
fn proc_status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0), so each run's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Returns the rows, the stage costs, the paced runs and the execution provider actually used.
async fn measure(settings: Settings, opts: Args) -> Result<(Vec<Row>, Costs, Vec<Paced>, &'static str)> {
    let files = dataset::sample_per_class(dataset::list(std::slice::from_ref(&opts.dataset), Split::Test)?, opts.images.div_ceil(2));
    let files: Vec<_> = files.into_iter().filter(|f| opts.brokers.is_some() || f.class.as_deref() == Some("magnetic_tile")).collect();
    if files.is_empty() {
        bail!("no usable images under {} (without --brokers only magnetic_tile images are used)", opts.dataset.display());
    }
    let files: Vec<_> = files.into_iter().cycle().take(opts.images).collect();
    let payloads: Vec<Payload> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let record = produce::event_record("bench", f, std::fs::read(&f.path)?, opts.format.is_json(i));
            Ok(Payload { value: record.payload.unwrap_or_default(), id: f.image_id.clone(), class: f.class.clone() })
        })
        .collect::<Result<_>>()?;
    let large: Vec<Vec<u8>> = match &opts.large_jpegs {
        Some(dir) => {
            let mut paths: Vec<_> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg")))
                .collect();
            paths.sort();
            if paths.is_empty() {
                bail!("no .jpg files in {}", dir.display());
            }
            paths.iter().map(std::fs::read).collect::<std::io::Result<_>>()?
        }
        None => Vec::new(),
    };
    let (s2, batches, cost_images) = (settings.clone(), opts.batches.clone(), opts.cost_images);
    let (costs, inputs) = tokio::task::spawn_blocking(move || core_costs(&s2, &payloads, &batches, cost_images, &large)).await??;
    eprintln!("stage costs: done");

    // (a) and (b) sweep batch sizes on one session with an intra-op thread per core (the
    // policy's sessions are what scripts/bench_fair.py measures, with `dcam-stream run`).
    let mut engine_settings = settings.engine.clone();
    engine_settings.sessions = 1;
    engine_settings.intra_threads = usable_cores();
    let model = std::path::PathBuf::from(&settings.model.path);
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&model, &engine_settings)).await??);

    let cluster = match &opts.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1)?),
    };
    let brokers = opts.brokers.clone().unwrap_or_else(|| cluster.as_ref().expect("mock").bootstrap_servers());
    let base = settings.with_overrides(&[("kafka.brokers", brokers.as_str())])?;
    let producer: FutureProducer = kafka::producer_config(&base.kafka, None).create()?;
    if let Some(topic) = &opts.export_topic {
        match &cluster {
            Some(c) => c.create_topic(topic, 1, 1)?,
            None => create_topics(&base, &[topic]).await?,
        }
        let n = produce::publish(&producer, topic, &files, opts.format).await?;
        eprintln!("published {n} images to {topic}");
    }
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
        create_run_topics(cluster.as_ref(), &base, &input, &scores).await?;
        produce::publish(&producer, &input, &files, opts.format).await?;
        let s = operator_settings(&base, &input, &scores, batch, run_id)?;
        let max_in_flight = s.pipeline.max_in_flight;
        reset_peak_rss();
        let base_rss_mb = proc_status_mb("VmRSS");
        let started_ms = chrono::Utc::now().timestamp_millis() as f64;
        let op = RunningOperator::start(s, Some(engine.clone())).await?;
        let records =
            crate::cli::score_reader::ScoreReader::start(kafka::base_config(&base.kafka), &scores, files.len())?.finish(Duration::from_secs(600)).await?;
        let peak_rss_mb = proc_status_mb("VmHWM");
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
            peak_rss_mb,
            base_rss_mb,
            max_in_flight,
        });
        eprintln!("batch {batch}: done");
    }

    let best = rows.iter().max_by(|a, b| a.over_limit(&costs).total_cmp(&b.over_limit(&costs)));
    // Paced at a fraction of the limit (what the machine could do) and of what (b) reached (what it
    // did, with the broker and the bench sharing the cores).
    let mut paced = Vec::new();
    if let Some(row) = best.filter(|_| opts.paced_fraction > 0.0) {
        for (basis, capacity) in [("limit", costs.limit_ips(row.batch, false)), ("(b) e2e", row.e2e_ips)] {
            let (input, scores) = (format!("bench-paced-images-{}", rand::random::<u32>()), format!("bench-paced-scores-{}", rand::random::<u32>()));
            create_run_topics(cluster.as_ref(), &base, &input, &scores).await?;
            let s = operator_settings(&base, &input, &scores, row.batch, rand::random())?;
            paced.push(paced_latency(s, engine.clone(), &producer, &files, opts.format, (basis, opts.paced_fraction * capacity), row.raw_p50_ms).await?);
            eprintln!("paced at {} of {basis}: done", opts.paced_fraction);
        }
    }
    Ok((rows, costs, paced, engine.provider))
}

/// The operator's settings for one bench run on these topics.
fn operator_settings(base: &Settings, input: &str, scores: &str, batch: usize, run_id: u32) -> Result<Settings> {
    base.with_overrides(&[
        ("kafka.input_topics", input.to_string()),
        ("kafka.group_id", format!("bench-{run_id}")),
        ("kafka.session_timeout_ms", base.kafka.session_timeout.as_millis().max(6000).to_string()),
        ("topics.scores", scores.into()),
        ("topics.dead_letter", format!("{scores}.dlq")),
        ("batch.max_batch", batch.to_string()),
        ("batch.queue_capacity", base.batch.queue_capacity.max(batch * 4).to_string()),
        ("pipeline.max_in_flight", base.pipeline.max_in_flight.max(batch * 8).to_string()),
        ("heatmap.policy", "none".into()),
        ("telemetry.http_addr", "127.0.0.1:0".into()),
        // The bench measures scoring; runtime control has nothing to do here.
        ("topics.control", "".into()),
    ])
}

/// (d): starts the operator, waits until a warm-up event is scored (group joined, sessions warm),
/// then publishes `files` one at a time at `rate` img/s (`basis` names what it is a fraction of)
/// without waiting for acknowledgements, and times each image from its record timestamp to its score.
async fn paced_latency(
    settings: Settings,
    engine: Arc<Engine>,
    producer: &FutureProducer,
    files: &[dataset::ImageFile],
    format: WireFormat,
    (basis, rate): (&'static str, f64),
    batch_inference_ms: f64,
) -> Result<Paced> {
    let (input, scores, batch) = (settings.kafka.input_topics[0].clone(), settings.topics.scores.clone(), settings.batch.max_batch);
    // Read and encode every event before the clock starts, so pacing is not held up by file I/O.
    let events =
        files.iter().enumerate().map(|(i, f)| Ok(produce::event_record(&input, f, std::fs::read(&f.path)?, format.is_json(i)))).collect::<Result<Vec<_>>>()?;
    let reader_client = kafka::base_config(&settings.kafka);
    let op = RunningOperator::start(settings, Some(engine)).await?;
    let mut reader = crate::cli::score_reader::ScoreReader::start(reader_client, &scores, files.len() + 1)?;
    produce::publish_file(producer, &input, &files[0], format.is_json(0)).await?;
    reader.wait_for(1, Duration::from_secs(120)).await?;

    let started = Instant::now();
    let mut acks = Vec::with_capacity(files.len());
    for (i, event) in events.iter().enumerate() {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        acks.push(producer.send_result(event.to_future_record()).map_err(|(e, _)| anyhow::anyhow!("publishing to {input}: {e}"))?);
    }
    for ack in acks {
        ack.await.map_err(|_| anyhow::anyhow!("publishing to {input}: cancelled"))?.map_err(|(e, _)| anyhow::anyhow!("publishing to {input}: {e}"))?;
    }
    let records = reader.finish(Duration::from_secs(600)).await?;
    op.stop().await?;
    // Offset 0 is the warm-up event.
    let records: Vec<&ScoreRecord> = records.iter().filter(|r| r.source.offset > 0).collect();
    let sorted = |f: fn(&ScoreRecord) -> f64| {
        let mut v: Vec<f64> = records.iter().map(|r| f(r)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let lat = sorted(|r| r.latency_ms.queue + r.latency_ms.total);
    // From the first event's record timestamp to the last score's publication.
    let first_sent = records.iter().filter_map(|r| r.source.timestamp).min().unwrap_or(0) as f64;
    let last_scored =
        records.iter().filter_map(|r| chrono::DateTime::parse_from_rfc3339(&r.scored_at).ok()).map(|t| t.timestamp_millis()).max().unwrap_or(0) as f64;
    let window_s = ((last_scored - first_sent) / 1000.0).max(1e-3);
    Ok(Paced {
        batch,
        basis,
        rate_ips: rate,
        scored_ips: records.len() as f64 / window_s,
        images: records.len(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        topic_p50_ms: percentile(&sorted(|r| r.latency_ms.queue), 0.5),
        operator_p50_ms: percentile(&sorted(|r| r.latency_ms.total), 0.5),
        batch_inference_ms,
    })
}

/// A run's input and score topics, on the in-process cluster or the broker.
async fn create_run_topics(
    cluster: Option<&MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    base: &Settings,
    input: &str,
    scores: &str,
) -> Result<()> {
    match cluster {
        Some(c) => {
            c.create_topic(input, 1, 1)?;
            c.create_topic(scores, 1, 1)?;
        }
        None => create_topics(base, &[input, scores]).await?,
    }
    Ok(())
}

/// Creates topics up front, so readers never wait for a metadata refresh to find them.
async fn create_topics(settings: &Settings, names: &[&str]) -> Result<()> {
    for name in names {
        kafka::ensure_topic(&settings.kafka, name, &[]).await?;
    }
    Ok(())
}

fn print_costs(c: &Costs) {
    println!("(c) per-image core-time on one thread, {} images, {} cores", c.images, c.cores);
    println!("| stage | ms/image |");
    println!("|---|---:|");
    println!("| parse (event parser: envelope + base64) | {:.2} |", c.parse_ms);
    println!("| decode + resize (Decoder) | {:.2} |", c.decode_ms);
    for (b, ms) in &c.infer_ms {
        println!("| inference, 1 intra-op thread, batch {b} | {ms:.2} |");
    }
    println!("| heatmap render + PNG encode | {:.2} |", c.heatmap_ms);
    if let Some((n, scaled, full)) = c.large_jpeg {
        println!("| large JPEGs ({n}): decode + resize, reduced-scale IDCT | {scaled:.2} |");
        println!("| large JPEGs ({n}): decode + resize, full decode | {full:.2} |");
    }
    let (b1, hm) = (c.per_image_ms(1, false), c.per_image_ms(1, true));
    println!(
        "limit at batch 1 = {} cores / {b1:.2} ms = {:.1} img/s (with a heatmap for every image: {:.1} img/s)\n",
        c.cores,
        c.limit_ips(1, false),
        c.cores as f64 * 1000.0 / hm
    );
}

fn print_paced(runs: &[Paced], max_delay_ms: f64) {
    let Some(first) = runs.first() else { return };
    println!("(d) latency under load: {} events published one at a time to a running operator (batch {}), at a fraction of", first.images, first.batch);
    println!("    the limit and of the best (b) e2e; latency = record timestamp → score published, time in the topic included;");
    println!("    in the topic = record timestamp → consumed, in the operator = consumed → score published;");
    println!("    bound = batch.max_delay_ms + 3 × (a) p50 batch time");
    println!("| paced at | batch | rate img/s | scored img/s | p50 ms | p99 ms | p50 in the topic ms | p50 in the operator ms | bound ms | p99 / bound |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in runs {
        let bound = max_delay_ms + 3.0 * p.batch_inference_ms;
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            p.basis,
            p.batch,
            p.rate_ips,
            p.scored_ips,
            p.p50_ms,
            p.p99_ms,
            p.topic_p50_ms,
            p.operator_p50_ms,
            bound,
            p.p99_ms / bound
        );
    }
    println!();
}

/// The best batch policy's e2e / limit (heatmaps are off in the end-to-end runs).
pub(super) fn best_ratio(rows: &[Row], costs: &Costs) -> f64 {
    rows.iter().map(|r| r.over_limit(costs)).fold(f64::NAN, f64::max)
}

fn print_table(rows: &[Row], costs: &Costs, provider: &str, images: usize) {
    println!("dcam-stream bench: {images} images per run, provider {provider}");
    println!("(a) raw = ONNX Runtime session alone, pre-decoded input, latency per batch");
    println!("(b) e2e = operator through the broker: consume, parse, decode, batch, infer, publish, commit; latency per image;");
    println!("    img/s over first consume → last score (the events wait in the topic); start = start-up and group join before that");
    println!("limit = cores / (parse + decode + inference at this batch, one thread each), heatmaps off as in (b);");
    println!("RSS = peak resident set during (b) (VmHWM); per in-flight = peak / pipeline.max_in_flight, Δ = (peak − RSS before start) / max_in_flight\n");
    println!("| batch | (a) raw img/s | (a) p50 ms | (a) p99 ms | (b) e2e img/s | (b) p50 ms | (b) p99 ms | (b) start s | (b)/(a) | limit img/s | (b)/limit | peak RSS MB | in-flight | MB per in-flight | Δ MB per in-flight |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let limit = costs.limit_ips(r.batch, false);
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} | {} | {:.2} | {:.2} |",
            r.batch,
            r.raw_ips,
            r.raw_p50_ms,
            r.raw_p99_ms,
            r.e2e_ips,
            r.e2e_p50_ms,
            r.e2e_p99_ms,
            r.startup_s,
            r.e2e_ips / r.raw_ips,
            limit,
            r.e2e_ips / limit,
            r.peak_rss_mb,
            r.max_in_flight,
            r.peak_rss_mb / r.max_in_flight as f64,
            (r.peak_rss_mb - r.base_rss_mb) / r.max_in_flight as f64,
        );
    }
    println!("\ne2e/limit = {:.2}", best_ratio(rows, costs));
}
