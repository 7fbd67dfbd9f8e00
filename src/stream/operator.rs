//! The operator: wires source → pipeline → sink → delivery with telemetry, and shuts down in
//! order. `assemble` is the part `replay` shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::api::{ApiState, Writers};
use crate::config::{HeatmapPolicy, ModelSettings, Settings};
use crate::control::Control;
use crate::delivery::{Delivery, OffsetTracker};
use crate::inference::active::ModelSlot;
use crate::inference::engine::Engine;
use crate::inference::model::RuntimeThresholds;
use crate::inspect::Recent;
use crate::kafka;
use crate::shutdown::Shutdown;
use crate::store::BlobStore;
use crate::stream::pipeline::Pipeline;
use crate::stream::reload::{AnnouncedModel, Reloader};
use crate::stream::sink::{KafkaSink, Oversight, SinkSettings};
use crate::stream::source::{self, SourceContext, SourceOptions};
use crate::telemetry::{Health, Metrics, ProviderLabels};

pub(crate) struct RunningOperator {
    shutdown: Shutdown,
    source: Option<std::thread::JoinHandle<Result<()>>>,
    lag: Option<std::thread::JoinHandle<()>>,
    reloader: Option<std::thread::JoinHandle<()>>,
    pipeline: Option<Pipeline>,
    delivery: Arc<Delivery>,
    control: Option<Arc<Control>>,
    http: tokio::task::JoinHandle<()>,
    pub http_addr: SocketAddr,
    pub health: Arc<Health>,
    /// The serving model; hot reload swaps it.
    pub models: Arc<ModelSlot>,
}

impl RunningOperator {
    /// Starts everything, in order; returns once the consumer is subscribed and `/readyz` is ready.
    pub(crate) async fn start(settings: Settings, engine: Option<Arc<Engine>>) -> Result<Self> {
        let shutdown = Shutdown::new(settings.pipeline.shutdown_timeout);
        let (metrics, health) = (Metrics::new(), Health::new());
        let listener = tokio::net::TcpListener::bind(&settings.telemetry.http_addr)
            .await
            .with_context(|| format!("cannot listen on telemetry.http_addr {}", settings.telemetry.http_addr))?;
        let http_addr = listener.local_addr()?;
        let engine = load_engine(&settings, engine, &metrics).await?;
        let models = Arc::new(ModelSlot::configured(engine.clone(), &settings)?);
        // Runtime thresholds and model announcements, read to the end before the first image.
        let thresholds = Arc::new(RuntimeThresholds::default());
        let control = start_control(&settings, &thresholds, &metrics, &engine, &shutdown).await?;
        // The announced model loads while the rest starts, and serves before the first record.
        let announced = control.as_ref().and_then(|c| AnnouncedModel::start(&c.state, models.clone(), metrics.clone(), &settings.model));
        let recent = Arc::new(Recent::new(settings.inspect.recent_bytes, settings.inspect.thumbnail_px));
        let api = ApiState {
            metrics: metrics.clone(),
            health: health.clone(),
            recent: recent.clone(),
            models: models.clone(),
            thresholds: thresholds.clone(),
            control: control.clone(),
            writers: Arc::new(Writers::from_settings(&settings.telemetry)?),
            telemetry: Arc::new(settings.telemetry.clone()),
        };
        let http = tokio::spawn(crate::api::serve(listener, api));
        let reloader = start_reloader(&settings.model, &models, control.as_deref(), &metrics, &shutdown)?;
        let tracker = Arc::new(OffsetTracker::new());
        let delivery = start_delivery(&settings, &tracker, &metrics).await?;
        let oversight = Oversight { thresholds, recent: Some(recent) };
        let pipeline = assemble(&settings, models.clone(), SinkSettings::from_settings(&settings), oversight, delivery.clone(), metrics.clone())?;
        let (consumer, lag) = subscribe(&settings, &delivery, tracker, &metrics, &shutdown)?;
        if let Some(announced) = announced {
            announced.wait().await;
        }
        let source = start_source(&settings, consumer, &pipeline, &shutdown, &metrics, &health)?;
        health.set_ready(
            true,
            serde_json::json!({
                "provider": engine.provider,
                "topics": settings.kafka.input_topics,
                "control_topic": settings.topics.control,
                "delivery": settings.delivery.mode,
            }),
        );
        tracing::info!(%http_addr, topics = ?settings.kafka.input_topics, "operator running; inspection page at http://{http_addr}/ui");
        Ok(Self { shutdown, source: Some(source), lag: Some(lag), reloader, pipeline: Some(pipeline), delivery, control, http, http_addr, health, models })
    }

    /// The operator's stop signal (for signal handlers and the shutdown deadline).
    pub(crate) fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Asks the operator to stop; `wait` then drains and commits.
    pub(crate) fn request_stop(&self) {
        self.shutdown.request();
    }

    /// Runs until a stop request (or a fatal source error), then shuts down in order:
    /// stop fetching → finish in-flight → publish → commit → leave the group.
    pub(crate) async fn wait(mut self) -> Result<()> {
        let source = self.source.take().expect("source thread");
        let shutdown = self.shutdown.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = source.join().map_err(|_| anyhow!("source thread panicked")).and_then(|r| r);
            shutdown.request();
            r
        })
        .await?;
        self.health.set_ready(false, serde_json::json!({"state": "stopping"}));
        if let Some(lag) = self.lag.take() {
            let _ = tokio::task::spawn_blocking(move || lag.join()).await;
        }
        if let Some(reloader) = self.reloader.take() {
            let _ = tokio::task::spawn_blocking(move || reloader.join()).await;
        }
        if let Some(control) = self.control.take() {
            let _ = tokio::task::spawn_blocking(move || control.stop()).await;
        }
        if let Some(p) = self.pipeline.take() {
            tokio::task::spawn_blocking(move || p.finish()).await?;
        }
        let delivery = self.delivery.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || delivery.flush(Duration::from_secs(10))).await? {
            tracing::warn!(error = %e, "outputs may be unsent at exit; their inputs are uncommitted and read again");
        }
        self.http.abort();
        result
    }

    /// Stop and wait.
    pub(crate) async fn stop(self) -> Result<()> {
        self.request_stop();
        self.wait().await
    }
}

/// The given engine, or the configured model loaded off the executor; its provider, classes and
/// version go to the metrics.
async fn load_engine(settings: &Settings, engine: Option<Arc<Engine>>, metrics: &Metrics) -> Result<Arc<Engine>> {
    let engine = match engine {
        Some(e) => e,
        None => {
            let s = settings.clone();
            tokio::task::spawn_blocking(move || crate::inference::engine::load_configured(&s)).await??
        }
    };
    metrics.provider.get_or_create(&ProviderLabels { provider: engine.provider.into() }).set(1);
    metrics.set_classes(&engine.info.classes);
    metrics.set_model(&engine.info.name, &engine.info.version);
    Ok(engine)
}

/// The control-topic reader, when `topics.control` is set.
async fn start_control(
    settings: &Settings,
    thresholds: &Arc<RuntimeThresholds>,
    metrics: &Arc<Metrics>,
    engine: &Engine,
    shutdown: &Shutdown,
) -> Result<Option<Arc<Control>>> {
    if settings.topics.control.is_none() {
        return Ok(None);
    }
    let control = Control::start(&settings.control, &settings.kafka, &settings.topics, thresholds.clone(), metrics.clone(), &engine.info, shutdown).await?;
    Ok(Some(Arc::new(control)))
}

/// The `model-reload` thread, when models can change (announced on the control topic, or the
/// watched file).
fn start_reloader(
    model: &ModelSettings,
    models: &Arc<ModelSlot>,
    control: Option<&Control>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<Option<std::thread::JoinHandle<()>>> {
    if control.is_none() && model.watch_interval.is_zero() {
        return Ok(None);
    }
    let reloader = Reloader {
        models: models.clone(),
        control: control.map(|c| c.state.clone()),
        settings: model.clone(),
        metrics: metrics.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    Ok(Some(reloader.spawn(shutdown.clone())?))
}

/// The configured delivery, built off the executor (exactly-once fences older instances).
async fn start_delivery(settings: &Settings, tracker: &Arc<OffsetTracker>, metrics: &Arc<Metrics>) -> Result<Arc<Delivery>> {
    let (d, k, dead_letters) = (settings.delivery.clone(), settings.kafka.clone(), settings.topics.dead_letter.clone());
    let (t, m) = (tracker.clone(), metrics.clone());
    Ok(Arc::new(tokio::task::spawn_blocking(move || Delivery::build(&d, &k, &dead_letters, t, m, Arc::default())).await??))
}

/// The group member's consumer, subscribed to the input topics, and the lag reporter, which
/// uses a client of its own that reads the group's committed offsets without joining the group.
fn subscribe(
    settings: &Settings,
    delivery: &Arc<Delivery>,
    tracker: Arc<OffsetTracker>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Result<(BaseConsumer<SourceContext>, std::thread::JoinHandle<()>)> {
    let lag_config = kafka::consumer_config(&settings.kafka, &settings.kafka.group_id);
    let mut consumer_config = kafka::consumer_config(&settings.kafka, &settings.kafka.group_id);
    // The source stops fetching once it has read everything and has enough to score (FetchGate).
    consumer_config.set("enable.partition.eof", "true");
    if let Some(id) = crate::delivery::static_member_id(&settings.kafka, &settings.delivery) {
        consumer_config.set("group.instance.id", id);
    }
    let source_context = SourceContext::new(delivery.clone(), settings.kafka.max_poll_interval).with_shutdown_timeout(settings.pipeline.shutdown_timeout);
    let assignment = source_context.assignment.clone();
    let consumer: BaseConsumer<SourceContext> = consumer_config.create_with_context(source_context).context("creating the consumer")?;
    let topics: Vec<&str> = settings.kafka.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).context("subscribing")?;
    let lag = source::spawn_lag_reporter(lag_config, tracker, assignment, metrics.clone(), shutdown.clone())?;
    Ok((consumer, lag))
}

/// The `source` thread: the group member's loop, feeding `pipeline`.
fn start_source(
    settings: &Settings,
    consumer: BaseConsumer<SourceContext>,
    pipeline: &Pipeline,
    shutdown: &Shutdown,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let (submit, shutdown, metrics, health) = (pipeline.submitter(), shutdown.clone(), metrics.clone(), health.clone());
    let opts = SourceOptions {
        max_in_flight: settings.pipeline.max_in_flight,
        max_in_flight_bytes: settings.pipeline.max_in_flight_bytes,
        commit_interval: settings.delivery.commit_interval,
        stuck_after: settings.pipeline.stuck_after,
        restart_stalled_after: settings.pipeline.restart_stalled_after,
        refill_below: pipeline.refill_mark(),
    };
    Ok(std::thread::Builder::new().name("source".into()).spawn(move || {
        let result = source::run(&consumer, &submit, &opts, &shutdown, &metrics, &health);
        drop(consumer); // leaves the group
        result
    })?)
}

/// The stages every scoring run shares, `run` and `replay` alike: heatmap store, sink and
/// pipeline, scoring with `models` and delivering through `delivery`. Each caller brings its own
/// sink settings (topics, heatmap prefix), oversight (runtime thresholds, the page's buffer)
/// and delivery (the configured mode; replays always at-least-once).
pub(crate) fn assemble(
    settings: &Settings,
    models: Arc<ModelSlot>,
    sink_settings: SinkSettings,
    oversight: Oversight,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
) -> Result<Pipeline> {
    let store = match settings.heatmap.policy {
        HeatmapPolicy::None => None,
        _ => Some(BlobStore::new(&settings.heatmap, &settings.s3)?),
    };
    if let Some(store) = &store {
        tracing::info!(store = %store.describe(), "heatmaps go to the store");
    }
    let sink = KafkaSink::new(sink_settings, oversight, store, delivery, metrics.clone(), tokio::runtime::Handle::current());
    let pipeline = Pipeline::start(models, &settings.decode, &settings.s3, &settings.batch, metrics, Arc::new(sink));
    Ok(pipeline)
}
