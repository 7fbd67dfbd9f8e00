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

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataset;
pub mod delivery;
pub mod event;
pub mod inference;
pub mod inspect;
pub mod kafka;
pub mod memory;
pub mod shutdown;
pub mod store;
pub mod stream;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
