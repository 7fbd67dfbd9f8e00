//! The telemetry port's connections. At most `telemetry.max_connections` are served at once, each
//! must send its request head within a timeout, so no number of clients (slow, idle or streaming)
//! can take the descriptors the operator needs. Past the cap a few more connections get the
//! probes only, one request each, so the kubelet still hears `/healthz` and `/readyz` during a
//! flood instead of restarting a pod that is working; the rest are closed at once.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections kept for the probes beyond `max_connections`.
const PROBE_CONNECTIONS: usize = 8;
/// Time to send a request head (and, between requests, to send the next one).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A probe connection gets less: the kubelet sends its request at once.
const PROBE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. no descriptors left), instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `full` on up to `max_connections` connections and `probes` on a few more; forever.
pub(super) async fn run(listener: TcpListener, full: Router, probes: Router, max_connections: usize) {
    let full_seats = Arc::new(Semaphore::new(max_connections));
    let probe_seats = Arc::new(Semaphore::new(PROBE_CONNECTIONS));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (seat, router, keep_alive, head_timeout) = if let Ok(seat) = full_seats.clone().try_acquire_owned() {
            (seat, full.clone(), true, HEAD_TIMEOUT)
        } else if let Ok(seat) = probe_seats.clone().try_acquire_owned() {
            (seat, probes.clone(), false, PROBE_HEAD_TIMEOUT)
        } else {
            continue; // dropped: closed at once
        };
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
            // A client that goes away or times out is no error of ours.
            let _ = connection.await;
            drop(seat);
        });
    }
}
