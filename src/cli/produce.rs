//! `dcam-stream produce`: publishes image files as input events (JSON envelope or raw bytes).
//! `demo` and `bench` publish through the same functions.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::producer::FutureProducer;

use crate::config::Settings;
use crate::dataset::{self, ImageFile, Split};
use crate::delivery::record::OutRecord;
use crate::event::{envelope_json, raw_event_headers};

#[derive(clap::Args)]
pub(super) struct Args {
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
}

pub(super) async fn run(settings: Settings, args: Args) -> Result<()> {
    let settings = match &args.brokers {
        Some(b) => settings.with_overrides(&[("kafka.brokers", b.as_str())])?,
        None => settings,
    };
    let mut files = dataset::list(&args.paths, args.split)?;
    if let Some(n) = args.per_class {
        files = dataset::sample_per_class(files, n);
    }
    let producer: FutureProducer = crate::kafka::producer_config(&settings.kafka, None).create()?;
    let n = publish(&producer, &args.topic, &files, args.format).await?;
    println!("published {n} images to {}", args.topic);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum WireFormat {
    /// JSON envelope with base64 image.
    Json,
    /// The image bytes as the record value, id and class in headers.
    Raw,
    /// Alternate JSON and raw.
    Mixed,
}

impl WireFormat {
    /// Whether the `i`-th file goes out as a JSON envelope.
    pub(crate) fn is_json(self, i: usize) -> bool {
        match self {
            Self::Json => true,
            Self::Raw => false,
            Self::Mixed => i.is_multiple_of(2),
        }
    }
}

/// The input event for one file, keyed by its image id.
pub fn event_record(topic: &str, file: &ImageFile, bytes: Vec<u8>, json: bool) -> OutRecord {
    let (payload, headers) = if json {
        (envelope_json(&file.image_id, file.class.as_deref(), &bytes, dataset::content_type(&file.path)), Vec::new())
    } else {
        (bytes, raw_event_headers(&file.image_id, file.class.as_deref()))
    };
    OutRecord { topic: topic.to_string(), key: Some(file.image_id.clone().into_bytes()), payload: Some(payload), headers }
}

/// Publishes every file to `topic`, keyed by image id; returns how many were acknowledged.
pub(super) async fn publish(producer: &FutureProducer, topic: &str, files: &[ImageFile], format: WireFormat) -> Result<usize> {
    let mut pending = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        pending.push(publish_file(producer, topic, f, format.is_json(i)));
        // Keep at most a few hundred sends outstanding.
        if pending.len() >= 256 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(files.len())
}

/// Publishes one file and waits for the acknowledgement.
pub(super) async fn publish_file(producer: &FutureProducer, topic: &str, file: &ImageFile, json: bool) -> Result<()> {
    let bytes = std::fs::read(&file.path).with_context(|| format!("reading {}", file.path.display()))?;
    let record = event_record(topic, file, bytes, json);
    producer.send(record.to_future_record(), Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("publishing to {topic}: {e}"))?;
    Ok(())
}
