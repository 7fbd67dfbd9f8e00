//! `dcam-stream run`: the operator until SIGTERM/SIGINT or a fatal error.

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
    let op = RunningOperator::start(settings, None).await?;
    let shutdown = op.shutdown();
    shutdown.spawn_deadline()?;
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.request();
    });
    op.wait().await
}
