//! `dcam-stream model inspect`: a model's metadata, classes and calibration.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::Settings;
use crate::inference::engine::Engine;

#[derive(clap::Subcommand)]
pub(super) enum Command {
    /// Print a model's metadata, classes and calibration.
    Inspect { file: PathBuf },
}

pub(super) async fn run(settings: Settings, command: Command) -> Result<()> {
    let Command::Inspect { file } = command;
    let mut engine_settings = settings.engine;
    engine_settings.sessions = 1;
    let engine = tokio::task::spawn_blocking(move || Engine::load(&file, &engine_settings)).await?.context("loading the model")?;
    println!("{}", serde_json::to_string_pretty(&engine.info)?);
    Ok(())
}
