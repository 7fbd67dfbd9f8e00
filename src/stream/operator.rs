//! The operator: wires source → pipeline → sink with telemetry, and shuts down in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, Producer};

use crate::config::{DeliveryMode, HeatmapPolicy, Settings};
use crate::delivery::transaction::Transactions;
use crate::delivery::{Fatal, OffsetTracker};
use crate::event::ModelRef;
use crate::inference::engine::Engine;
use crate::inference::model::Scorer;
use crate::kafka;
use crate::store::BlobStore;
use crate::stream::pipeline::Pipeline;
use crate::stream::sink::{DirectProducer, KafkaSink, Publisher, SinkSettings};
use crate::stream::source::{self, SourceContext, SourceOptions};
use crate::telemetry::{Health, Metrics, ProviderLabels};

pub struct RunningOperator {
    shutdown: Arc<AtomicBool>,
    source: Option<std::thread::JoinHandle<Result<()>>>,
    lag: Option<std::thread::JoinHandle<()>>,
    pipeline: Option<Pipeline>,
    producer: Producers,
    http: tokio::task::JoinHandle<()>,
    pub http_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub engine: Arc<Engine>,
    pub heatmap_store: Option<String>,
}

impl RunningOperator {
    /// Starts everything; returns once the consumer is subscribed and `/readyz` is ready.
    pub async fn start(settings: Settings, engine: Option<Arc<Engine>>) -> Result<Self> {
        let metrics = Metrics::new();
        let health = Health::new();
        let listener = tokio::net::TcpListener::bind(&settings.telemetry.http_addr)
            .await
            .with_context(|| format!("cannot listen on telemetry.http_addr {}", settings.telemetry.http_addr))?;
        let http_addr = listener.local_addr()?;
        let http = {
            let (m, h) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::telemetry::serve_http(listener, m, h).await {
                    tracing::error!(error = %e, "http server stopped");
                }
            })
        };
        let engine = match engine {
            Some(e) => e,
            None => {
                let s = settings.clone();
                tokio::task::spawn_blocking(move || crate::inference::engine::load_configured(&s)).await??
            }
        };
        metrics.provider.get_or_create(&ProviderLabels { provider: engine.provider.into() }).set(1);
        metrics.set_classes(&engine.info.classes);
        let store = match settings.heatmap.policy {
            HeatmapPolicy::None => None,
            _ => Some(BlobStore::from_settings(&settings.heatmap)?),
        };
        let heatmap_store = store.as_ref().map(BlobStore::describe);
        let tracker = Arc::new(OffsetTracker::new());
        let fatal = Arc::new(Fatal::default());
        let scorer = Scorer::new(&engine.info, &settings.model.thresholds)?;
        let model = ModelRef { name: engine.info.name.clone(), version: engine.info.version.clone() };

        let (producer, transactions, publisher) = match settings.delivery.mode {
            DeliveryMode::AtLeastOnce => {
                let p = Arc::new(DirectProducer::new(kafka::producer_config(&settings, None)).context("creating the producer")?);
                (Producers::Direct(p.clone()), None, Publisher::Direct(p))
            }
            DeliveryMode::ExactlyOnce => {
                let id = kafka::transactional_id(&settings);
                let p: FutureProducer = kafka::producer_config(&settings, Some(&id)).create().context("creating the transactional producer")?;
                let (t, m, timeout) = (tracker.clone(), metrics.clone(), Duration::from_millis(settings.delivery.transaction_timeout_ms));
                let p2 = p.clone();
                let tx = tokio::task::spawn_blocking(move || Transactions::new(p2, t, m, timeout)).await?.map_err(|e| anyhow!("{e}"))?;
                tracing::info!(transactional_id = %id, "exactly-once delivery: transactional producer ready");
                let tx = Arc::new(tx);
                let buffer = tx.buffer.clone();
                (Producers::Transactional(p), Some(tx), Publisher::Transactional(buffer))
            }
        };
        let sink = KafkaSink::new(
            SinkSettings::from_settings(&settings, model),
            scorer,
            store,
            publisher,
            tracker.clone(),
            metrics.clone(),
            fatal.clone(),
            tokio::runtime::Handle::current(),
        );
        let pipeline = Pipeline::start(engine.clone(), &settings, metrics.clone(), Arc::new(sink));

        // The lag reporter uses a client of its own, outside the group.
        let lag_config = kafka::consumer_config(&settings, &format!("{}-lag", settings.kafka.group_id));
        let consumer: BaseConsumer<SourceContext> = kafka::consumer_config(&settings, &settings.kafka.group_id)
            .create_with_context(
                SourceContext::new(tracker.clone(), transactions, Duration::from_millis(settings.kafka.max_poll_interval_ms), fatal)
                    .with_shutdown_timeout(Duration::from_millis(settings.pipeline.shutdown_timeout_ms)),
            )
            .context("creating the consumer")?;
        let topics: Vec<&str> = settings.kafka.input_topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).context("subscribing")?;
        let shutdown = Arc::new(AtomicBool::new(false));
        let lag = source::spawn_lag_reporter(lag_config, tracker, metrics.clone(), shutdown.clone())?;
        let source = {
            let (submit, shutdown, metrics, health) = (pipeline.submitter(), shutdown.clone(), metrics.clone(), health.clone());
            let opts = SourceOptions {
                max_in_flight: settings.pipeline.max_in_flight,
                max_in_flight_bytes: settings.pipeline.max_in_flight_bytes,
                commit_interval: Duration::from_millis(settings.delivery.commit_interval_ms),
                stuck_after: Duration::from_millis(settings.pipeline.stuck_after_ms),
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
                "model": {"name": engine.info.name, "version": engine.info.version, "classes": engine.info.classes, "input_size": engine.info.input_size},
                "topics": topics,
                "delivery": settings.delivery.mode,
            }),
        );
        tracing::info!(%http_addr, topics = ?settings.kafka.input_topics, "operator running");
        Ok(Self { shutdown, source: Some(source), lag: Some(lag), pipeline: Some(pipeline), producer, http, http_addr, metrics, health, engine, heatmap_store })
    }

    /// The flag that asks the operator to stop (for signal handlers and watchdogs).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Asks the operator to stop; `wait` then drains and commits.
    pub fn request_stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Runs until a stop request (or a fatal source error), then shuts down in order:
    /// stop fetching → finish in-flight → publish → commit → leave the group.
    pub async fn wait(mut self) -> Result<()> {
        let source = self.source.take().expect("source thread");
        let shutdown = self.shutdown.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = source.join().map_err(|_| anyhow!("source thread panicked")).and_then(|r| r);
            shutdown.store(true, Ordering::SeqCst);
            r
        })
        .await?;
        self.health.set_ready(false, serde_json::json!({"state": "stopping"}));
        if let Some(lag) = self.lag.take() {
            let _ = tokio::task::spawn_blocking(move || lag.join()).await;
        }
        if let Some(p) = self.pipeline.take() {
            tokio::task::spawn_blocking(move || p.finish()).await?;
        }
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await?;
        self.http.abort();
        result
    }

    /// Stop and wait.
    pub async fn stop(self) -> Result<()> {
        self.request_stop();
        self.wait().await
    }
}

/// The producer to flush at shutdown.
#[derive(Clone)]
enum Producers {
    Direct(Arc<DirectProducer>),
    Transactional(FutureProducer),
}

impl Producers {
    fn flush(&self, timeout: Duration) {
        let _ = match self {
            Self::Direct(p) => p.flush(timeout),
            Self::Transactional(p) => p.flush(timeout),
        };
    }
}
