//! `dcam-stream run`: the operator until SIGTERM/SIGINT or a fatal error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::config::Settings;
use crate::stream::operator::RunningOperator;

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// `dcam-stream run`: runs until SIGTERM/SIGINT or a fatal error.
pub(super) async fn run(settings: Settings) -> Result<()> {
    let shutdown_timeout = settings.pipeline.shutdown_timeout;
    let op = RunningOperator::start(settings, None).await?;
    let stop = op.stop_flag();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.store(true, Ordering::SeqCst);
    });
    spawn_shutdown_watchdog(op.stop_flag(), shutdown_timeout);
    op.wait().await
}

/// Once a stop is requested, the process exits within `timeout` whatever is stuck (a broker
/// that is gone, a dependency that hangs): the orchestrator's grace period is not waited out
/// into a SIGKILL, and what was not committed is read again after the restart.
fn spawn_shutdown_watchdog(stop: Arc<AtomicBool>, timeout: Duration) {
    std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(timeout);
            tracing::error!(?timeout, "shutdown did not finish within pipeline.shutdown_timeout_ms; exiting, uncommitted work is read again after restart");
            eprintln!("error: shutdown did not finish within {timeout:?}; uncommitted work is read again after restart");
            std::process::exit(2);
        })
        .expect("spawn the shutdown watchdog");
}
