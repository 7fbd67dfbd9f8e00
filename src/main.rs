use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use dcam_stream::config::Settings;
use dcam_stream::dataset::{self, Split};
use dcam_stream::produce::WireFormat;
use dcam_stream::{bench, demo, engine, offline, operator, produce, replay, telemetry};

#[derive(Parser)]
#[command(name = "dcam-stream", version, about = "Scores industrial images from Kafka with a multi-class DCAM anomaly model")]
struct Cli {
    /// Configuration file (layered over config/default.toml; env DCAM__SECTION__KEY wins).
    #[arg(long, short, global = true, env = "DCAM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: consume images, score them, publish scores/heatmaps/dead letters.
    Run,
    /// Publish image files or an MVTec-layout dataset as input events.
    Produce {
        /// Files, folders or dataset roots.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, default_value = "images")]
        topic: String,
        #[arg(long, value_enum, default_value = "json")]
        format: WireFormat,
        #[arg(long, value_enum, default_value = "test")]
        split: Split,
        /// At most this many images per class.
        #[arg(long)]
        per_class: Option<usize>,
    },
    /// Embedded demo: in-process Kafka, sample images, the operator, and a report.
    Demo {
        #[arg(long, default_value = "../shared/datasets")]
        dataset: PathBuf,
        /// Test images per class (spread over all labels).
        #[arg(long, default_value_t = 24)]
        per_class: usize,
        /// Where heatmaps go (default: a temporary directory).
        #[arg(long)]
        heatmaps: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Print only the summary.
        #[arg(long)]
        quiet: bool,
    },
    /// Score image files offline (no Kafka): JSON lines on stdout.
    Score {
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
    },
    /// Re-score a time range of a topic (or a folder/dataset with --dir) and stop.
    Replay {
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
        /// With --dir: write JSON lines here instead of stdout.
        #[arg(long, requires = "dir")]
        output: Option<PathBuf>,
        /// With --dir: heatmap PNGs go here.
        #[arg(long, requires = "dir")]
        heatmaps: Option<PathBuf>,
    },
    /// Benchmark: raw ONNX Runtime vs end-to-end operator throughput at several batch sizes.
    Bench {
        #[arg(long, default_value = "../shared/datasets")]
        dataset: PathBuf,
        #[arg(long, default_value_t = 192)]
        images: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batches: Vec<usize>,
        /// Use this cluster instead of the in-process one.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Print a model's metadata, classes and calibration.
    Inspect { file: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration.
    Check { file: PathBuf },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    if let Command::Config { command: ConfigCommand::Check { file } } = &cli.command {
        let settings = Settings::load(Some(file))?;
        println!("# {} is valid; effective configuration:", file.display());
        print!("{}", settings.to_toml_masked());
        return Ok(());
    }
    let mut settings = Settings::load(cli.config.as_deref())?;
    // One-shot tools print tables and JSON; keep their logs to warnings unless asked otherwise.
    let one_shot = !matches!(cli.command, Command::Run);
    if one_shot && settings.telemetry.log_level == "info" && std::env::var_os("RUST_LOG").is_none() {
        settings.telemetry.log_level = "warn".into();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let guard = runtime.enter();
    let tracer = telemetry::init(&settings.telemetry)?;
    let result = runtime.block_on(dispatch(cli.command, settings));
    if let Some(t) = tracer {
        let _ = t.shutdown();
    }
    drop(guard);
    // Tasks still retrying against a dependency that is gone must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn dispatch(command: Command, mut settings: Settings) -> Result<()> {
    match command {
        Command::Run => operator::run(settings).await,
        Command::Produce { paths, brokers, topic, format, split, per_class } => {
            if let Some(b) = brokers {
                settings.kafka.brokers = b;
            }
            let mut files = dataset::list(&paths, split)?;
            if let Some(n) = per_class {
                files = dataset::sample_per_class(files, n);
            }
            let producer: rdkafka::producer::FutureProducer = dcam_stream::kafka::producer_config(&settings, None).create()?;
            let n = produce::publish(&producer, &topic, &files, format).await?;
            println!("published {n} images to {topic}");
            Ok(())
        }
        Command::Demo { dataset, per_class, heatmaps, partitions, quiet } => {
            demo::run(settings, demo::DemoOptions { dataset, per_class, heatmaps, partitions, quiet }).await
        }
        Command::Score { paths, heatmaps, model, split, class } => {
            if let Some(m) = model {
                settings.model.path = m.display().to_string();
            }
            let mut files = dataset::list(&paths, split)?;
            if let Some(c) = class {
                files.iter_mut().for_each(|f| f.class = Some(c.clone()));
            }
            let engine = tokio::task::spawn_blocking({
                let s = settings.clone();
                move || operator::load_engine(&s)
            })
            .await??;
            tokio::task::spawn_blocking(move || {
                offline::score_files(&settings, engine, &files, heatmaps.as_deref(), |r| {
                    println!("{}", serde_json::to_string(r).expect("json"));
                })
                .map(|_| ())
            })
            .await?
        }
        Command::Replay { input_topic, from, to, partitions, output_topic, dead_letter_topic, model, dir, output, heatmaps } => {
            if let Some(m) = model {
                settings.model.path = m.display().to_string();
            }
            let summary = match dir {
                Some(paths) => tokio::task::spawn_blocking(move || replay::replay_dir(&settings, &paths, output.as_deref(), heatmaps.as_deref())).await??,
                None => {
                    let req = replay::ReplayRequest {
                        input_topic: input_topic.expect("clap"),
                        from: replay::parse_time(&from.expect("clap"))?,
                        to: to.as_deref().map(replay::parse_time).transpose()?,
                        partitions,
                        output_topic: output_topic.expect("clap"),
                        dead_letter_topic,
                    };
                    replay::replay_topic(settings, req).await?
                }
            };
            eprintln!("{summary}");
            Ok(())
        }
        Command::Bench { dataset, images, batches, brokers } => {
            let (rows, provider) = bench::run(settings, bench::BenchOptions { dataset, images, batches, brokers }).await?;
            bench::print_table(&rows, provider, images);
            Ok(())
        }
        Command::Model { command: ModelCommand::Inspect { file } } => {
            let mut s = settings.engine.clone();
            s.sessions = 1;
            let e = tokio::task::spawn_blocking(move || engine::Engine::load(&file, &s)).await?.context("loading the model")?;
            println!("{}", serde_json::to_string_pretty(&e.info)?);
            Ok(())
        }
        Command::Config { .. } => unreachable!("handled before the runtime starts"),
    }
}
