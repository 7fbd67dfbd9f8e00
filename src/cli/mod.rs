//! The command line: one module per command, each owning its arguments and its wiring. Commands
//! use the stages (`stream`, `delivery`, `inference`); no stage imports a command.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::telemetry;

mod bench;
mod config;
mod demo;
mod dlq;
mod model;
pub(crate) mod produce;
mod replay;
mod run;
mod schema;
mod score;
mod score_reader;

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
    Produce(produce::Args),
    /// Embedded demo: in-process Kafka, sample images, the operator, and a report.
    Demo(demo::Args),
    /// Score image files offline (no Kafka): JSON lines on stdout.
    Score(score::Args),
    /// Re-score a time range of a topic (or a folder/dataset with --dir) and stop.
    Replay(replay::Args),
    /// Benchmark: raw ONNX Runtime vs end-to-end operator throughput at several batch sizes.
    Bench(bench::Args),
    /// Dead letters: a table of what is there (inspect), or send them back after a fix (redrive).
    Dlq {
        #[command(subcommand)]
        command: dlq::Command,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        command: model::Command,
    },
    /// Print the JSON Schema of a record the operator reads or writes (without NAME: list them).
    Schema(schema::Args),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: config::Command,
    },
}

/// The binary's entry point: parse, run, and exit 1 with the error chain on failure.
pub fn main() {
    let cli = Cli::parse();
    if let Err(e) = run_cli(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_cli(cli: Cli) -> Result<()> {
    if let Command::Config { command } = &cli.command {
        // Before telemetry and the runtime: checking a file must not need either.
        return config::run(command);
    }
    if let Command::Schema(args) = &cli.command {
        return schema::run(args);
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

async fn dispatch(command: Command, settings: Settings) -> Result<()> {
    match command {
        Command::Run => run::run(settings).await,
        Command::Produce(args) => produce::run(settings, args).await,
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Score(args) => score::run(settings, args).await,
        Command::Replay(args) => replay::run(settings, args).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::Model { command } => model::run(settings, command).await,
        Command::Dlq { command } => dlq::run(settings, command).await,
        Command::Config { .. } | Command::Schema(_) => unreachable!("handled before the runtime starts"),
    }
}
