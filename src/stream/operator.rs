//! The operator: wires source → pipeline → sink → delivery with telemetry, and shuts down in
//! order. `assemble` is the part `replay` shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::api::{ApiState, Writers};
use crate::config::{HeatmapPolicy, Settings};
use crate::control::Control;
use crate::delivery::{Delivery, OffsetTracker};
use crate::inference::active::{ActiveModel, ModelSlot};
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
    /// Starts everything; returns once the consumer is subscribed and `/readyz` is ready.
    pub(crate) async fn start(settings: Settings, engine: Option<Arc<Engine>>) -> Result<Self> {
        let shutdown = Shutdown::new(settings.pipeline.shutdown_timeout);
        let metrics = Metrics::new();
        let health = Health::new();
        let listener = tokio::net::TcpListener::bind(&settings.telemetry.http_addr)
            .await
            .with_context(|| format!("cannot listen on telemetry.http_addr {}", settings.telemetry.http_addr))?;
        let http_addr = listener.local_addr()?;
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
        let models = Arc::new(ModelSlot::new(ActiveModel::new(engine.clone(), &settings, &settings.model.path)?, &settings));

        // Runtime thresholds and model announcements, read to the end before the first image.
        let thresholds = Arc::new(RuntimeThresholds::default());
        let control = match &settings.topics.control {
            Some(topic) => Some(Arc::new(Control::start(&settings, topic, thresholds.clone(), metrics.clone(), &engine.info, &shutdown).await?)),
            None => None,
        };
        // The announced model loads while the rest starts, and serves before the first record.
        let announced = control.as_ref().and_then(|c| AnnouncedModel::start(&c.state, models.clone(), metrics.clone(), &settings));
        let recent = Arc::new(Recent::new(settings.inspect.recent_bytes, settings.inspect.thumbnail_px));
        let shared_settings = Arc::new(settings.clone());
        let http = {
            let state = ApiState {
                metrics: metrics.clone(),
                health: health.clone(),
                recent: recent.clone(),
                models: models.clone(),
                thresholds: thresholds.clone(),
                control: control.clone(),
                writers: Arc::new(Writers::from_settings(&settings.telemetry)?),
                settings: shared_settings.clone(),
            };
            tokio::spawn(crate::api::serve(listener, state))
        };
        let reloader = (control.is_some() || !settings.model.watch_interval.is_zero())
            .then(|| {
                Reloader {
                    models: models.clone(),
                    control: control.as_ref().map(|c| c.state.clone()),
                    settings: shared_settings.clone(),
                    metrics: metrics.clone(),
                    runtime: tokio::runtime::Handle::current(),
                }
                .spawn(shutdown.clone())
            })
            .transpose()?;

        let tracker = Arc::new(OffsetTracker::new());
        let delivery = {
            let (s, t, m) = (settings.clone(), tracker.clone(), metrics.clone());
            Arc::new(tokio::task::spawn_blocking(move || Delivery::build(&s, t, m, Arc::default())).await??)
        };
        let oversight = Oversight { thresholds, recent: Some(recent) };
        let pipeline = assemble(&settings, models.clone(), SinkSettings::from_settings(&settings), oversight, delivery.clone(), metrics.clone())?;

        // The lag reporter uses a client of its own that reads the group's committed offsets
        // without joining the group.
        let lag_config = kafka::consumer_config(&settings, &settings.kafka.group_id);
        let mut consumer_config = kafka::consumer_config(&settings, &settings.kafka.group_id);
        if let Some(id) = crate::delivery::static_member_id(&settings) {
            consumer_config.set("group.instance.id", id);
        }
        let source_context = SourceContext::new(delivery.clone(), settings.kafka.max_poll_interval).with_shutdown_timeout(settings.pipeline.shutdown_timeout);
        let assignment = source_context.assignment.clone();
        let consumer: BaseConsumer<SourceContext> = consumer_config.create_with_context(source_context).context("creating the consumer")?;
        let topics: Vec<&str> = settings.kafka.input_topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        let lag = source::spawn_lag_reporter(lag_config, tracker, assignment, metrics.clone(), shutdown.clone())?;
        if let Some(announced) = announced {
            announced.wait().await;
        }
        let source = {
            let (submit, shutdown, metrics, health) = (pipeline.submitter(), shutdown.clone(), metrics.clone(), health.clone());
            let opts = SourceOptions {
                max_in_flight: settings.pipeline.max_in_flight,
                max_in_flight_bytes: settings.pipeline.max_in_flight_bytes,
                commit_interval: settings.delivery.commit_interval,
                stuck_after: settings.pipeline.stuck_after,
                restart_stalled_after: settings.pipeline.restart_stalled_after,
            };
            std::thread::Builder::new().name("source".into()).spawn(move || {
                let result = source::run(&consumer, &submit, &opts, &shutdown, &metrics, &health);
                drop(consumer); // leaves the group
                result
            })?
        };
        health.set_ready(
            true,
            serde_json::json!({
                "provider": engine.provider,
                "topics": topics,
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
    let pipeline = Pipeline::start(models, settings, metrics, Arc::new(sink));
    Ok(pipeline)
}
