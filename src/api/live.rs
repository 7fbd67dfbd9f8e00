//! `/api/live`: server-sent events, one a second, with what the page's live panel draws:
//! throughput, end-to-end latency percentiles, consumer lag and dead letters by kind.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use super::ApiState;

pub(super) async fn stream(State(s): State<ApiState>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    s.recent.watched();
    let start = (Instant::now(), s.metrics.totals.scored.load(Ordering::Relaxed) + s.metrics.totals.dead_letters.load(Ordering::Relaxed));
    let ticks = futures::stream::unfold((s, start), |(s, (last_at, last_count))| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.recent.watched();
        let count = s.metrics.totals.scored.load(Ordering::Relaxed) + s.metrics.totals.dead_letters.load(Ordering::Relaxed);
        let now = Instant::now();
        let per_second = (count - last_count) as f64 / now.duration_since(last_at).as_secs_f64();
        let (p50, p99) = s.recent.latency_percentiles().map_or((None, None), |(a, b)| (Some(a), Some(b)));
        let data = serde_json::json!({
            "images_per_second": per_second,
            "latency_ms": {"p50": p50, "p99": p99},
            "consumer_lag": s.metrics.total_lag.load(Ordering::Relaxed),
            "dead_letters": s.metrics.dead_letter_counts(),
            "scored": s.metrics.totals.scored.load(Ordering::Relaxed),
            "anomalies": s.metrics.totals.anomalies.load(Ordering::Relaxed),
        });
        Some((Ok(Event::default().event("stats").data(data.to_string())), (s, (now, count))))
    });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}
