//! `dcam-stream score`: scores image files without Kafka, JSON lines on stdout.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::Settings;
use crate::dataset::{self, Split};
use crate::inference::engine;
use crate::stream::offline;

#[derive(clap::Args)]
pub(super) struct Args {
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Write heatmap PNGs here (per heatmap.policy).
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "all")]
    split: Split,
    /// Product class of every file (default: from an MVTec-style path, else none).
    #[arg(long)]
    class: Option<String>,
}

pub(super) async fn run(settings: Settings, args: Args) -> Result<()> {
    let settings = with_model(settings, args.model.as_deref())?;
    let mut files = dataset::list(&args.paths, args.split)?;
    if let Some(c) = args.class {
        files.iter_mut().for_each(|f| f.class = Some(c.clone()));
    }
    tokio::task::spawn_blocking(move || {
        let engine = engine::load_configured(&settings)?;
        offline::score_files(&settings, engine, &files, args.heatmaps.as_deref(), |r| {
            println!("{}", serde_json::to_string(r).expect("json"));
        })
        .map(|_| ())
    })
    .await?
}

/// The settings with `model.path` replaced by a `--model` argument, if one was given.
pub(super) fn with_model(settings: Settings, model: Option<&std::path::Path>) -> Result<Settings> {
    match model {
        Some(m) => settings.with_overrides(&[("model.path", m.display())]),
        None => Ok(settings),
    }
}
