//! Telemetry: Prometheus metrics and internal events (`metrics`), `/healthz` and `/readyz`
//! (`health`), logs and OpenTelemetry traces (`logging`, OTLP off by default), and trace context
//! carried in Kafka headers (`propagation`).

mod health;
mod logging;
mod metrics;
mod propagation;

pub(crate) use health::Health;
pub(crate) use logging::init;
pub use metrics::*;
pub(crate) use propagation::{image_span, output_trace_headers};
