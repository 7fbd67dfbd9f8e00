//! The log subscriber (text or JSON) and, when configured, the OTLP trace exporter.

use anyhow::{Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetrySettings};

/// Installs the log subscriber, plus an OTLP trace exporter when configured.
/// Returns the tracer provider so the caller can flush it on exit.
pub(crate) fn init(settings: &TelemetrySettings) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log_level));
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let (provider, otel_layer) = if let Some(endpoint) = &settings.otlp_endpoint {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build().context("building the OTLP exporter")?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(settings.service_name.clone()).build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let tracer = provider.tracer("dcam-stream");
        opentelemetry::global::set_tracer_provider(provider.clone());
        (Some(provider), Some(tracing_opentelemetry::layer().with_tracer(tracer)))
    } else {
        (None, None)
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = match settings.log_format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).try_init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).try_init(),
    };
    // A second init (tests, demo) keeps the first subscriber.
    let _ = result;
    Ok(provider)
}
