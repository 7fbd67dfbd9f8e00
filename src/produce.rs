//! `dcam-stream produce`: publishes image files as input events (JSON envelope or raw bytes).

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::dataset::ImageFile;
use crate::event::{envelope_json, HEADER_CLASS, HEADER_IMAGE_ID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireFormat {
    /// JSON envelope with base64 image.
    Json,
    /// The image bytes as the record value, id and class in headers.
    Raw,
    /// Alternate JSON and raw.
    Mixed,
}

impl WireFormat {
    /// Whether the `i`-th file goes out as a JSON envelope.
    pub fn is_json(self, i: usize) -> bool {
        match self {
            Self::Json => true,
            Self::Raw => false,
            Self::Mixed => i % 2 == 0,
        }
    }
}

pub fn content_type(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

/// The record value and headers for one file in the given wire format.
pub fn encode(file: &ImageFile, bytes: &[u8], json: bool) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    if json {
        (envelope_json(&file.image_id, file.class.as_deref(), bytes, content_type(&file.path)), Vec::new())
    } else {
        let mut headers = vec![(HEADER_IMAGE_ID.to_string(), file.image_id.clone().into_bytes())];
        if let Some(c) = &file.class {
            headers.push((HEADER_CLASS.to_string(), c.clone().into_bytes()));
        }
        (bytes.to_vec(), headers)
    }
}

/// Publishes every file to `topic`, keyed by image id; returns how many were acknowledged.
pub async fn publish(producer: &FutureProducer, topic: &str, files: &[ImageFile], format: WireFormat) -> Result<usize> {
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
    let n = files.len();
    for r in futures::future::join_all(pending).await {
        r?;
    }
    Ok(n)
}

/// Publishes one file, keyed by its image id, and waits for the acknowledgement.
pub async fn publish_file(producer: &FutureProducer, topic: &str, file: &ImageFile, json: bool) -> Result<()> {
    let bytes = std::fs::read(&file.path).with_context(|| format!("reading {}", file.path.display()))?;
    let (value, headers) = encode(file, &bytes, json);
    send(producer, topic, Some(file.image_id.as_bytes()), Some(&value), &headers).await
}

/// Sends one record and waits for its acknowledgement.
pub fn send<'a>(
    producer: &'a FutureProducer,
    topic: &'a str,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: &'a [(String, Vec<u8>)],
) -> impl std::future::Future<Output = Result<()>> + 'a {
    async move {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_slice()) });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("publishing to {topic}: {e}"))?;
        Ok(())
    }
}
