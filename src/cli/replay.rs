//! `dcam-stream replay`: re-scores a time range of a topic, or a folder/dataset with `--dir`.
//! When it ends it prints its summary for people on stderr and, unless the `--dir` lines take
//! stdout, as one JSON record (`schemas/replay-summary.json`) on stdout.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::Settings;
use crate::stream::replay::{self, ReplayRequest};

#[derive(clap::Args)]
pub(super) struct Args {
    #[arg(long, required_unless_present = "dir")]
    input_topic: Option<String>,
    /// Start time, RFC 3339.
    #[arg(long, required_unless_present = "dir")]
    from: Option<String>,
    /// End time (exclusive), RFC 3339; default: the end of the topic when the replay starts.
    #[arg(long)]
    to: Option<String>,
    /// Only these partitions (comma-separated).
    #[arg(long, value_delimiter = ',')]
    partitions: Option<Vec<i32>>,
    #[arg(long, required_unless_present = "dir")]
    output_topic: Option<String>,
    /// Dead letters of the replay (default: <output-topic>.dlq).
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Score with this model instead of model.path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Replay files (folder or MVTec dataset) in file order, no Kafka.
    #[arg(long, num_args = 1.., conflicts_with_all = ["input_topic", "output_topic"])]
    dir: Option<Vec<PathBuf>>,
    /// With --dir: write JSON lines here instead of stdout (which then gets the summary record).
    #[arg(long, requires = "dir")]
    output: Option<PathBuf>,
    /// With --dir: heatmap PNGs go here.
    #[arg(long, requires = "dir")]
    heatmaps: Option<PathBuf>,
}

pub(super) async fn run(settings: Settings, args: Args) -> Result<()> {
    let settings = super::score::with_model(settings, args.model.as_deref())?;
    // `--dir` without `--output` writes its lines to stdout; otherwise stdout carries the summary.
    let stdout_is_free = args.dir.is_none() || args.output.is_some();
    let summary = match args.dir {
        Some(paths) => {
            let (output, heatmaps) = (args.output, args.heatmaps);
            tokio::task::spawn_blocking(move || replay::replay_dir(&settings, &paths, output.as_deref(), heatmaps.as_deref())).await??
        }
        None => {
            let request = ReplayRequest {
                input_topic: args.input_topic.expect("clap requires it without --dir"),
                from: replay::parse_time(&args.from.expect("clap requires it without --dir"))?,
                to: args.to.as_deref().map(replay::parse_time).transpose()?,
                partitions: args.partitions,
                output_topic: args.output_topic.expect("clap requires it without --dir"),
                dead_letter_topic: args.dead_letter_topic,
            };
            replay::replay_topic(settings, request).await?
        }
    };
    eprintln!("{summary}");
    if stdout_is_free {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}
