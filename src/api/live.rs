//! `/api/live`: server-sent events, one a second, with what the page's live panel draws:
//! throughput, end-to-end latency percentiles, consumer lag and dead letters by kind.
//!
//! One task computes the panel once a second for every client and publishes it through a
//! `watch` channel; a client only forwards the latest value, so a thousand clients cost what one
//! does, and none of them touches the sink's locks. At most `telemetry.max_live_clients` streams
//! are served at once; more are refused (503), so streams cannot hold every connection.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio::sync::{watch, Semaphore};

use super::ApiState;
use crate::inspect::LatencyWindow;

/// The latest panel (JSON) and the seats for its streams.
pub(super) struct LivePanel {
    latest: watch::Receiver<Arc<str>>,
    seats: Arc<Semaphore>,
}

impl LivePanel {
    /// Starts the task that computes the panel; it stops once the panel and its streams are gone.
    pub(super) fn start(state: ApiState, max_clients: usize) -> Arc<Self> {
        let (publish, latest) = watch::channel(Arc::<str>::from("{}"));
        tokio::spawn(async move {
            let mut window = LatencyWindow::default();
            let mut last = (Instant::now(), finished(&state));
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !publish.is_closed() {
                tick.tick().await;
                let panel = compute(&state, &mut window, &mut last);
                publish.send_replace(panel.to_string().into());
            }
        });
        Arc::new(Self { latest, seats: Arc::new(Semaphore::new(max_clients)) })
    }
}

/// Inputs finished so far (scored or dead-lettered).
fn finished(s: &ApiState) -> u64 {
    s.metrics.totals.scored.load(Ordering::Relaxed) + s.metrics.totals.dead_letters.load(Ordering::Relaxed)
}

fn compute(s: &ApiState, window: &mut LatencyWindow, (last_at, last_count): &mut (Instant, u64)) -> serde_json::Value {
    let now = Instant::now();
    let count = finished(s);
    let per_second = count.saturating_sub(*last_count) as f64 / now.duration_since(*last_at).as_secs_f64();
    (*last_at, *last_count) = (now, count);
    window.absorb(s.recent.take_latencies(), now);
    let (p50, p99) = window.percentiles().map_or((None, None), |(a, b)| (Some(a), Some(b)));
    serde_json::json!({
        "images_per_second": per_second,
        "latency_ms": {"p50": p50, "p99": p99},
        "consumer_lag": s.metrics.total_lag.load(Ordering::Relaxed),
        "dead_letters": s.metrics.dead_letter_counts(),
        "scored": s.metrics.totals.scored.load(Ordering::Relaxed),
        "anomalies": s.metrics.totals.anomalies.load(Ordering::Relaxed),
    })
}

pub(super) async fn stream(State(s): State<ApiState>, Extension(panel): Extension<Arc<LivePanel>>) -> Response {
    let Ok(seat) = panel.seats.clone().try_acquire_owned() else {
        let refusal = (StatusCode::SERVICE_UNAVAILABLE, [(header::CONNECTION, "close"), (header::RETRY_AFTER, "10")], "too many live clients\n");
        return refusal.into_response();
    };
    s.recent.watched();
    let events = futures::stream::unfold((s, panel.latest.clone(), seat), |(s, mut latest, seat)| async move {
        latest.changed().await.ok()?;
        s.recent.watched();
        let data = latest.borrow_and_update().clone();
        Some((Ok::<_, Infallible>(Event::default().event("stats").data(&*data)), (s, latest, seat)))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
