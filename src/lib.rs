//! dcam-stream: a Kafka streaming operator that scores industrial images for defects with a
//! multi-class DCAM anomaly model served by ONNX Runtime.
//!
//! # Layout
//!
//! The folders follow the data's way: an event comes in through `stream`, is turned into a score
//! by `inference`, and leaves through `delivery`; `cli` holds the commands that wire them.
//!
//! - `cli/`: one module per command (`run`, `demo`, `produce`, `score`, `replay`, `bench`,
//!   `model`, `config`); nothing outside `cli` imports it, except tests for input encoding.
//! - `stream/`: `source` (consumer-group member) → `pipeline` (decode, batch, infer) → `sink`
//!   (score, anomaly and dead-letter records, heatmaps); `operator` assembles them for `run`,
//!   `replay` re-scores a time range, `offline` scores files without Kafka.
//! - `delivery/`: offsets (`offsets`), records ready to publish (`record`), publish-until-acked
//!   and commits, exactly-once transactions (`transaction`).
//! - `inference/`: `decode`, `engine` (ONNX Runtime), `model` (contract, calibration), `heatmap`.
//! - `config` (typed settings), `event` (wire formats), `kafka` (client settings), `store`
//!   (heatmap blobs), `telemetry` (metrics, health, tracing), `dataset` (image folders),
//!   `memory` (byte budgets), `shutdown` (the one stop signal every thread and task waits on).
//!
//! # Threads
//!
//! `source` (blocking librdkafka consumer, one thread) → `decode-N` threads → `batcher` thread
//! → `engine-N` threads (one per ONNX Runtime session) → sink tasks on the tokio runtime
//! (heatmap writes, publishing) → offsets marked finished, committed by `source`. A `lag`
//! thread reports consumer lag; the HTTP server (`/metrics`, `/healthz`, `/readyz`) runs on tokio.
//! The contracts behind all of this are in `docs/DESIGN.md`.

#![warn(unreachable_pub)]

mod api;
mod cli;
mod config;
mod control;
mod dataset;
mod delivery;
mod event;
mod inference;
mod inspect;
mod kafka;
mod memory;
mod shutdown;
mod store;
mod stream;
mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// The `dcam-stream` command line (`src/main.rs` is this one call).
pub use cli::main;

/// What the integration tests and fuzzers drive directly beside the binary: the event parser and
/// decoder, the dataset walker, input encoding, and the delivery parts the transaction tests run
/// against a broker. Not a stable API: it follows the code.
#[doc(hidden)]
pub mod internals {
    pub use crate::cli::produce::event_record;
    pub use crate::config::{DecodeSettings, Settings};
    pub use crate::dataset::{list as list_images, sample_per_class, ImageFile, Split};
    pub use crate::delivery::offsets::OffsetTracker;
    pub use crate::delivery::record::OutRecord;
    pub use crate::delivery::transaction::TxnBuffer;
    pub use crate::delivery::Delivery;
    pub use crate::event::{parse_event, validate_image_id, ErrorKind, SourceRef};
    pub use crate::inference::decode::Decoder;
    pub use crate::inference::heatmap::key as heatmap_key;
    pub use crate::kafka::consumer_config;
    pub use crate::stream::source::{handle_commit, job_from_message, CommitOutcome, SourceContext};
    pub use crate::telemetry::Metrics;
}
