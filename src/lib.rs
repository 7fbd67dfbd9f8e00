//! dcam-stream: a Kafka streaming operator that scores industrial images for defects with a
//! multi-class DCAM anomaly model served by ONNX Runtime.
//!
//! Data path: source → decode → batch → engine → sink (see `pipeline`).

pub mod bench;
pub mod config;
pub mod dataset;
pub mod decode;
pub mod delivery;
pub mod demo;
pub mod engine;
pub mod event;
pub mod heatmap;
pub mod kafka;
pub mod memory;
pub mod model;
pub mod offline;
pub mod operator;
pub mod pipeline;
pub mod produce;
pub mod record;
pub mod replay;
pub mod score_reader;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod transaction;
