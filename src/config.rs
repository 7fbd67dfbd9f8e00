//! Settings: `config/default.toml` (compiled in) < `--config FILE` < env `DCAM__SECTION__KEY`.
//! Every struct denies unknown fields so a typo fails loudly with the key's name.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_with::{serde_as, DurationMilliSeconds};

pub(crate) const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub model: ModelSettings,
    pub engine: EngineSettings,
    pub batch: BatchSettings,
    pub decode: DecodeSettings,
    pub pipeline: PipelineSettings,
    pub heatmap: HeatmapSettings,
    pub s3: S3Settings,
    pub delivery: DeliverySettings,
    pub telemetry: TelemetrySettings,
    pub inspect: InspectSettings,
    pub control: ControlSettings,
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Consumer group every replica joins; also the prefix of the transactional id.
    pub group_id: String,
    /// Topics of image events to score (env: comma-separated).
    pub input_topics: Vec<String>,
    /// librdkafka `client.id` (broker logs and quotas).
    pub client_id: String,
    /// `plaintext` | `ssl` | `sasl_plaintext` | `sasl_ssl`.
    pub security_protocol: SecurityProtocol,
    /// `PLAIN` | `SCRAM-SHA-256` | `SCRAM-SHA-512` | `OAUTHBEARER` (only with `sasl_*`); empty = none.
    #[serde(default, with = "empty_is_none")]
    pub sasl_mechanism: Option<String>,
    /// SASL user name; empty = none.
    #[serde(default, with = "empty_is_none")]
    pub sasl_username: Option<String>,
    /// SASL password (masked in output); set it from a Secret.
    #[serde(default)]
    pub sasl_password: Secret,
    /// CA certificate file for the brokers' TLS; empty = the system store.
    #[serde(default, with = "empty_is_none")]
    pub ssl_ca_location: Option<String>,
    /// Client certificate file (mutual TLS); empty = none.
    #[serde(default, with = "empty_is_none")]
    pub ssl_certificate_location: Option<String>,
    /// Client key file (mutual TLS); empty = none.
    #[serde(default, with = "empty_is_none")]
    pub ssl_key_location: Option<String>,
    /// Password of the client key (masked in output).
    #[serde(default)]
    pub ssl_key_password: Secret,
    /// How long the broker waits for a heartbeat before evicting this member.
    #[serde(rename = "session_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub session_timeout: Duration,
    /// Longest gap between polls before the member leaves the group; drains stay below half of it.
    #[serde(rename = "max_poll_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub max_poll_interval: Duration,
    /// Where a new group starts reading: `earliest` | `latest`.
    pub auto_offset_reset: OffsetReset,
    /// How partitions move between members on a rebalance: `cooperative` (KIP-429, only the
    /// partitions that change owner stop) or `eager` (every member lets go of everything).
    pub rebalance_protocol: RebalanceProtocol,
    /// Static group membership (KIP-345) with the instance id, in exactly-once mode or when
    /// `delivery.instance_id` is set: a restarted pod takes its old place without a rebalance, but a
    /// member that leaves for good (scale-in) keeps its partitions until the broker's session
    /// timeout evicts it. Off: every stop leaves the group at once.
    pub static_membership: bool,
    /// Free-form librdkafka properties, applied last to every client (`"fetch.max.bytes" = "52428800"`).
    // The config crate splits dotted keys into tables; `flatten_dotted` joins them back to `a.b.c`.
    #[serde(default, deserialize_with = "flatten_dotted")]
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            group_id: "dcam-stream".into(),
            input_topics: vec!["images".into()],
            client_id: "dcam-stream".into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: Secret::default(),
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: Secret::default(),
            session_timeout: Duration::from_secs(10),
            max_poll_interval: Duration::from_secs(60),
            auto_offset_reset: OffsetReset::Earliest,
            rebalance_protocol: RebalanceProtocol::Cooperative,
            static_membership: true,
            extra: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RebalanceProtocol {
    Cooperative,
    Eager,
}

impl RebalanceProtocol {
    /// librdkafka's `partition.assignment.strategy` for it.
    pub fn assignment_strategy(self) -> &'static str {
        match self {
            Self::Cooperative => "cooperative-sticky",
            Self::Eager => "range,roundrobin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Where every score record goes.
    pub scores: String,
    /// Anomalies only, for alerting consumers; off when empty.
    #[serde(default, with = "empty_is_none")]
    pub anomalies: Option<String>,
    /// Where inputs that cannot be scored go, as they came, with `dcam-error*` headers.
    pub dead_letter: String,
    /// The compacted control topic (runtime thresholds, model announcements) every replica reads;
    /// runtime changes are off when empty.
    #[serde(default, with = "empty_is_none")]
    pub control: Option<String>,
    /// Every runtime change made through the API, appended (never compacted, never read back for
    /// state); off when empty.
    #[serde(default, with = "empty_is_none")]
    pub control_audit: Option<String>,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            scores: "scores".into(),
            anomalies: None,
            dead_letter: "images.dlq".into(),
            control: Some("dcam.control".into()),
            control_audit: Some("dcam.control.audit".into()),
        }
    }
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// The ONNX model served at start-up (the model contract, docs/DESIGN.md §1).
    pub path: String,
    /// How often `path` is checked for a new file to hot-reload; 0 = never.
    #[serde(rename = "watch_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub watch_interval: Duration,
    /// Per-class raw-score threshold overrides (`bottle = 0.42`); they win over the model's calibration.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
    /// Where models may be loaded from at runtime (`POST /api/model`, the control topic, the
    /// watched file): directories (a path, or `file:///dir`) and `s3://bucket/prefix`. Empty = the
    /// directory of `path`. `path` itself is always allowed (the rollback target).
    #[serde(default)]
    pub allowed_sources: Vec<ModelSource>,
    /// The largest model file or object read, in bytes; larger ones are refused before reading.
    pub max_bytes: u64,
    /// How long a starting replica waits for the model announced on the control topic before it
    /// reads its first record; past it the configured model serves first and the announced one
    /// swaps in when loaded.
    #[serde(rename = "announced_wait_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub announced_wait: Duration,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: "models/dcam.onnx".into(),
            watch_interval: Duration::ZERO,
            thresholds: BTreeMap::new(),
            allowed_sources: Vec::new(),
            max_bytes: 200 << 20,
            announced_wait: Duration::from_secs(60),
        }
    }
}

/// A place models may be loaded from (`model.allowed_sources`), written as a directory path,
/// `file:///dir` or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum ModelSource {
    /// A directory on the pods; relative paths are relative to the working directory.
    Dir(std::path::PathBuf),
    /// Objects under `s3://bucket/prefix/` (the whole bucket when `prefix` is empty).
    S3 { bucket: String, prefix: String },
}

impl TryFrom<String> for ModelSource {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("model.allowed_sources entry {text:?} names no bucket"));
            }
            return Ok(Self::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        let path = match text.strip_prefix("file://") {
            Some(_) => url::Url::parse(&text).ok().and_then(|u| u.to_file_path().ok()),
            None if text.contains("://") => None,
            None => Some(std::path::PathBuf::from(&text)).filter(|p| !p.as_os_str().is_empty()),
        };
        path.map(Self::Dir).ok_or_else(|| format!("model.allowed_sources entry {text:?} must be a directory, file:///dir or s3://bucket/prefix"))
    }
}

impl From<ModelSource> for String {
    fn from(source: ModelSource) -> String {
        match source {
            ModelSource::Dir(path) => path.display().to_string(),
            ModelSource::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// ONNX Runtime execution provider: `cpu` | `cuda` | `tensorrt`.
    pub provider: Provider,
    /// GPU index for `cuda` / `tensorrt`.
    pub device_id: i32,
    /// Fail at start-up instead of falling back to CPU when the GPU provider is unavailable.
    pub require_gpu: bool,
    /// Parallel ONNX Runtime sessions; 0 = the policy (`Settings::apply_engine_policy`).
    pub sessions: usize,
    /// Intra-op threads per session; 0 = the policy.
    pub intra_threads: usize,
    /// Let TensorRT build FP16 engines.
    pub trt_fp16: bool,
    /// Where TensorRT keeps built engines; off when empty.
    #[serde(default, with = "empty_is_none")]
    pub trt_engine_cache: Option<String>,
    /// Dummy batches each session runs before the model serves (at least 1 runs: it checks the model answers).
    pub warmup_batches: usize,
    /// ONNX Runtime's CPU memory arena: kept at the largest batch shape seen (fast, but the
    /// process keeps that peak); off, buffers go back to the allocator after each batch.
    pub cpu_arena: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            provider: Provider::Cpu,
            device_id: 0,
            require_gpu: false,
            sessions: 0,
            intra_threads: 0,
            trt_fp16: false,
            trt_engine_cache: None,
            warmup_batches: 1,
            cpu_arena: true,
        }
    }
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Largest batch; 0 = the policy (`Settings::apply_engine_policy`).
    pub max_batch: usize,
    /// A batch closes when full or this long after its first image.
    #[serde(rename = "max_delay_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub max_delay: Duration,
    /// Decoded images waiting for a batch.
    pub queue_capacity: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self { max_batch: 0, max_delay: Duration::from_millis(10), queue_capacity: 256 }
    }
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSettings {
    /// Largest image payload (inline or fetched); larger inputs are dead-lettered as `too_large`.
    pub max_payload_bytes: usize,
    /// Largest image in pixels, read from the header before decoding (decompression bombs).
    pub max_pixels: u64,
    /// Decode worker threads; 0 = number of cores.
    pub workers: usize,
    /// `file://` image URIs are read only under this folder; off when empty.
    #[serde(default, with = "empty_is_none")]
    pub file_uri_root: Option<String>,
    /// Memory all decode workers together may hold for decoded pixels; 0 = a quarter of the memory limit.
    pub max_decode_bytes: u64,
}

impl Default for DecodeSettings {
    fn default() -> Self {
        Self { max_payload_bytes: 16 << 20, max_pixels: 40_000_000, workers: 0, file_uri_root: None, max_decode_bytes: 0 }
    }
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Events consumed but not yet committed; partitions are paused when reached.
    pub max_in_flight: usize,
    /// Payload bytes of those events (plus buffered outputs in exactly_once); partitions are paused when reached.
    pub max_in_flight_bytes: usize,
    /// A partition whose oldest record waits longer makes `/readyz` fail.
    #[serde(rename = "stuck_after_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub stuck_after: Duration,
    /// After a stop request the process exits within this, whatever hangs.
    #[serde(rename = "shutdown_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub shutdown_timeout: Duration,
    /// Consumer lag with no input finished for this long makes the process exit with an error,
    /// so the orchestrator restarts it instead of it idling forever; 0 = never.
    #[serde(rename = "restart_stalled_after_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub restart_stalled_after: Duration,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            max_in_flight_bytes: 256 << 20,
            stuck_after: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
            restart_stalled_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeatmapPolicy {
    All,
    Anomalies,
    None,
}

impl HeatmapPolicy {
    /// Whether an image with this verdict gets a heatmap.
    pub fn wants(self, is_anomaly: bool) -> bool {
        match self {
            Self::All => true,
            Self::Anomalies => is_anomaly,
            Self::None => false,
        }
    }
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeatmapSettings {
    /// Which images get a heatmap: `all` | `anomalies` | `none`.
    pub policy: HeatmapPolicy,
    /// Where heatmaps go: `file:///path` or `s3://bucket/prefix`.
    pub store: String,
    /// Blend the colour map over the input image instead of the bare map.
    pub overlay: bool,
    /// A heatmap write (retries included) that takes longer is given up; the score goes out.
    #[serde(rename = "write_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub write_timeout: Duration,
}

impl Default for HeatmapSettings {
    fn default() -> Self {
        Self { policy: HeatmapPolicy::Anomalies, store: "file:///tmp/dcam-heatmaps".into(), overlay: false, write_timeout: Duration::from_secs(10) }
    }
}

/// The one S3 client configuration, shared by every component that reads or writes `s3://`
/// (heatmap store, model sources, image URIs).
#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// A non-AWS endpoint (MinIO, moto); AWS when empty.
    #[serde(default, with = "empty_is_none")]
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: String,
    /// Allow a plain-HTTP endpoint (e.g. MinIO in a test cluster).
    pub allow_http: bool,
    /// Static credentials; the AWS default chain when empty.
    #[serde(default, with = "empty_is_none")]
    pub access_key_id: Option<String>,
    /// Secret key (masked in output); else the usual `AWS_*` environment.
    #[serde(default)]
    pub secret_access_key: Secret,
    /// TCP/TLS connect timeout of the S3 client.
    #[serde(rename = "connect_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub connect_timeout: Duration,
    /// Timeout of one S3 request.
    #[serde(rename = "request_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub request_timeout: Duration,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            allow_http: false,
            access_key_id: None,
            secret_access_key: Secret::default(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    AtLeastOnce,
    ExactlyOnce,
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// `at_least_once` | `exactly_once` (Kafka transactions; docs/DESIGN.md §4).
    pub mode: DeliveryMode,
    /// This instance's stable identity (transactional id, static membership); the hostname when empty.
    #[serde(default, with = "empty_is_none")]
    pub instance_id: Option<String>,
    /// Kafka transaction timeout (exactly-once).
    #[serde(rename = "transaction_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub transaction_timeout: Duration,
    /// How often finished offsets (or a transaction) are committed.
    #[serde(rename = "commit_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub commit_interval: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self { mode: DeliveryMode::AtLeastOnce, instance_id: None, transaction_timeout: Duration::from_secs(60), commit_interval: Duration::from_secs(1) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Serves /metrics, /healthz, /readyz, the inspection page (/ui) and its API (/api).
    pub http_addr: String,
    /// `text` | `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `dcam_stream=debug,rdkafka=warn`, ...
    pub log_level: String,
    /// OTLP/gRPC collector for traces; off when empty.
    #[serde(default, with = "empty_is_none")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported traces.
    pub service_name: String,
    /// Bearer token for the HTTP API's writes (thresholds, model); writes are off when empty.
    #[serde(default)]
    pub api_token: Secret,
    /// Named writers, one `name:token` a line; each name is the `by` of that writer's changes.
    #[serde(default, with = "empty_is_none")]
    pub tokens_file: Option<String>,
    /// Bearer token for the HTTP API's reads (images, scores, ids, attributes); reads are open
    /// when empty. A writer's token reads too.
    #[serde(default)]
    pub read_token: Secret,
    /// Host names the HTTP server answers to (against DNS rebinding); empty = any. IP addresses
    /// and `localhost` are always accepted.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Connections served at once on the telemetry port; a few more are kept for the probes.
    pub max_connections: usize,
    /// `/api/live` streams served at once; more are refused with 503.
    pub max_live_clients: usize,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            http_addr: "0.0.0.0:9464".into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            service_name: "dcam-stream".into(),
            api_token: Secret::default(),
            tokens_file: None,
            read_token: Secret::default(),
            allowed_hosts: Vec::new(),
            max_connections: 128,
            max_live_clients: 16,
        }
    }
}

/// The control-topic reader: who may change the topic (records must carry an HMAC-SHA256 under
/// this key) and how long start-up waits for it.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// The signing key itself (from a Secret, as env); unsigned records are applied when neither
    /// this nor `signing_key_file` is set.
    #[serde(default)]
    pub signing_key: Secret,
    /// A file holding the signing key (a mounted Secret), read at start-up.
    #[serde(default, with = "empty_is_none")]
    pub signing_key_file: Option<String>,
    /// How long a starting replica waits to read the control topic to its end before scoring;
    /// past it, it starts with the values read so far and catches up live.
    #[serde(rename = "catch_up_timeout_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub catch_up_timeout: Duration,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self { signing_key: Secret::default(), signing_key_file: None, catch_up_timeout: Duration::from_secs(10) }
    }
}

/// The inspection page's in-memory data.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InspectSettings {
    /// Bytes of recent score records and thumbnails kept for `/ui`; 0 = off.
    pub recent_bytes: usize,
    /// Thumbnail edge in pixels (heatmap over the model input); 0 = no thumbnails.
    pub thumbnail_px: u32,
}

impl Default for InspectSettings {
    fn default() -> Self {
        Self { recent_bytes: 16 << 20, thumbnail_px: 256 }
    }
}

/// Range and consistency problems found by the sections' `validate`, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            self.0.push(message());
        }
    }

    fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            bail!("invalid configuration:\n  - {}", self.0.join("\n  - "))
        }
    }
}

impl KafkaSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(!self.brokers.trim().is_empty(), || "kafka.brokers must not be empty".into());
        p.check(!self.group_id.trim().is_empty(), || "kafka.group_id must not be empty".into());
        p.check(!self.input_topics.is_empty(), || "kafka.input_topics must name at least one topic".into());
        let session = ms(self.session_timeout);
        p.check((1000..=3_600_000).contains(&session), || format!("kafka.session_timeout_ms must be in 1000..=3600000, got {session}"));
        p.check((session..=3_600_000).contains(&ms(self.max_poll_interval)), || {
            format!("kafka.max_poll_interval_ms must be in session_timeout_ms..=3600000, got {}", ms(self.max_poll_interval))
        });
        if self.security_protocol.uses_sasl() {
            let known = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];
            p.check(self.sasl_mechanism.as_deref().is_some_and(|m| known.contains(&m)), || {
                format!("kafka.sasl_mechanism must be one of {known:?} with SASL, got {:?}", self.sasl_mechanism)
            });
        }
    }
}

impl TopicSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(!self.scores.is_empty(), || "topics.scores must not be empty".into());
        p.check(!self.dead_letter.is_empty(), || "topics.dead_letter must not be empty".into());
        for (name, topic) in [("topics.control", &self.control), ("topics.control_audit", &self.control_audit)] {
            if let Some(topic) = topic {
                p.check(topic != &self.scores && topic != &self.dead_letter, || format!("{name} ({topic:?}) must be a topic of its own"));
            }
        }
        p.check(self.control.is_none() || self.control != self.control_audit, || {
            "topics.control_audit must differ from topics.control (one is compacted, the other keeps every change)".into()
        });
    }
}

impl ModelSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(!self.path.is_empty(), || "model.path must not be empty".into());
        p.check(self.watch_interval.is_zero() || self.watch_interval >= Duration::from_millis(500), || {
            format!("model.watch_interval_ms must be 0 (off) or >= 500, got {}", ms(self.watch_interval))
        });
        p.check(self.max_bytes >= 1 << 20, || format!("model.max_bytes must be >= 1048576, got {}", self.max_bytes));
        p.check(ms(self.announced_wait) <= 3_600_000, || format!("model.announced_wait_ms must be <= 3600000, got {}", ms(self.announced_wait)));
        for (class, t) in &self.thresholds {
            p.check(t.is_finite(), || format!("model.thresholds.{class} must be a finite number"));
        }
    }
}

impl EngineSettings {
    fn validate(&self, p: &mut Problems) {
        p.check((1..=64).contains(&self.sessions), || format!("engine.sessions must be in 1..=64, got {}", self.sessions));
        p.check(self.intra_threads <= 256, || format!("engine.intra_threads must be <= 256, got {}", self.intra_threads));
        p.check(self.device_id >= 0, || format!("engine.device_id must be >= 0, got {}", self.device_id));
    }
}

impl BatchSettings {
    fn validate(&self, p: &mut Problems) {
        p.check((1..=1024).contains(&self.max_batch), || format!("batch.max_batch must be in 1..=1024, got {}", self.max_batch));
        p.check(ms(self.max_delay) <= 60_000, || format!("batch.max_delay_ms must be <= 60000, got {}", ms(self.max_delay)));
    }
}

impl DecodeSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(self.max_payload_bytes >= 1024, || format!("decode.max_payload_bytes must be >= 1024, got {}", self.max_payload_bytes));
        p.check(self.max_pixels >= 1, || "decode.max_pixels must be >= 1".into());
        p.check(self.workers <= 256, || format!("decode.workers must be <= 256, got {}", self.workers));
        p.check(self.max_decode_bytes == 0 || self.max_decode_bytes >= 16 << 20, || {
            format!("decode.max_decode_bytes must be 0 (auto) or >= 16777216, got {}", self.max_decode_bytes)
        });
    }
}

impl PipelineSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(self.max_in_flight_bytes >= 1 << 20, || format!("pipeline.max_in_flight_bytes must be >= 1048576, got {}", self.max_in_flight_bytes));
        p.check(ms(self.stuck_after) >= 1000, || format!("pipeline.stuck_after_ms must be >= 1000, got {}", ms(self.stuck_after)));
        p.check(self.restart_stalled_after.is_zero() || self.restart_stalled_after >= self.stuck_after, || {
            format!(
                "pipeline.restart_stalled_after_ms must be 0 (never) or >= pipeline.stuck_after_ms ({}), got {}",
                ms(self.stuck_after),
                ms(self.restart_stalled_after)
            )
        });
        p.check((1000..=3_600_000).contains(&ms(self.shutdown_timeout)), || {
            format!("pipeline.shutdown_timeout_ms must be in 1000..=3600000, got {}", ms(self.shutdown_timeout))
        });
    }
}

impl HeatmapSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(ms(self.write_timeout) >= 100, || format!("heatmap.write_timeout_ms must be >= 100, got {}", ms(self.write_timeout)));
        p.check(self.store.starts_with("file://") || self.store.starts_with("s3://"), || {
            format!("heatmap.store must start with file:// or s3://, got {:?}", self.store)
        });
    }
}

impl S3Settings {
    fn validate(&self, p: &mut Problems) {
        p.check(ms(self.connect_timeout) >= 100, || format!("s3.connect_timeout_ms must be >= 100, got {}", ms(self.connect_timeout)));
        p.check(ms(self.request_timeout) >= 100, || format!("s3.request_timeout_ms must be >= 100, got {}", ms(self.request_timeout)));
    }
}

impl DeliverySettings {
    /// Stable identity of this instance, used for the transactional id.
    pub fn instance_id(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "dcam-stream".into())
    }

    fn validate(&self, p: &mut Problems) {
        p.check((1000..=900_000).contains(&ms(self.transaction_timeout)), || {
            format!("delivery.transaction_timeout_ms must be in 1000..=900000, got {}", ms(self.transaction_timeout))
        });
        p.check((10..=60_000).contains(&ms(self.commit_interval)), || {
            format!("delivery.commit_interval_ms must be in 10..=60000, got {}", ms(self.commit_interval))
        });
        p.check(self.instance_id.as_deref().unwrap_or_default().chars().all(|c| crate::event::is_safe_char(c, crate::event::NAME_PUNCTUATION)), || {
            format!("delivery.instance_id may only hold [A-Za-z0-9._-], got {:?}", self.instance_id)
        });
    }
}

impl TelemetrySettings {
    fn validate(&self, p: &mut Problems) {
        p.check(self.http_addr.parse::<std::net::SocketAddr>().is_ok(), || {
            format!("telemetry.http_addr must be host:port with an IP, got {:?}", self.http_addr)
        });
        p.check(tracing_subscriber::EnvFilter::try_new(&self.log_level).is_ok(), || format!("telemetry.log_level is not a valid filter: {:?}", self.log_level));
        p.check((1..self.max_connections).contains(&self.max_live_clients), || {
            format!(
                "telemetry.max_live_clients must be at least 1 and below telemetry.max_connections ({}), got {}",
                self.max_connections, self.max_live_clients
            )
        });
        p.check(self.allowed_hosts.iter().all(|h| !h.is_empty() && !h.contains([':', '/', '@'])), || {
            format!("telemetry.allowed_hosts holds host names without scheme or port, got {:?}", self.allowed_hosts)
        });
    }
}

impl InspectSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(self.recent_bytes <= 1 << 30, || format!("inspect.recent_bytes must be <= 1073741824, got {}", self.recent_bytes));
        p.check(self.thumbnail_px <= 512, || format!("inspect.thumbnail_px must be <= 512, got {}", self.thumbnail_px));
    }
}

impl ControlSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(self.signing_key.expose().is_none() || self.signing_key_file.is_none(), || {
            "set control.signing_key or control.signing_key_file, not both".into()
        });
        p.check(self.signing_key.expose().is_none_or(|k| k.len() >= MIN_SIGNING_KEY_BYTES), || {
            format!("control.signing_key must be at least {MIN_SIGNING_KEY_BYTES} bytes (e.g. openssl rand -hex 32)")
        });
        p.check((1000..=3_600_000).contains(&ms(self.catch_up_timeout)), || {
            format!("control.catch_up_timeout_ms must be in 1000..=3600000, got {}", ms(self.catch_up_timeout))
        });
    }
}

const MASK: &str = "***";

/// Shorter HMAC keys are guessable; 32 bytes is SHA-256's own size.
pub(crate) const MIN_SIGNING_KEY_BYTES: usize = 32;

/// Cores this process may use (its cgroup's CPU quota included): what the engine policy, the
/// decode pool and the bench size themselves by.
pub(crate) fn usable_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most CPU sessions the engine policy starts: each holds its own arena and model copy.
const MAX_POLICY_CPU_SESSIONS: usize = 4;

/// librdkafka properties whose values are secrets (`sasl.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, `ssl.keystore.password`, ...). Paths (`*.location`) are not.
fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with(".location") {
        return false;
    }
    ["password", "secret", "token", "credential", ".pem", "oauthbearer.config", "jaas", "ssl.key"].iter().any(|w| k.contains(w))
}

/// `scheme://user:pass@host/...?query` → `scheme://***@host/...?***`; anything else unchanged.
fn mask_url_credentials(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return text.to_string();
    };
    if url.cannot_be_a_base() || (url.username().is_empty() && url.password().is_none() && url.query().is_none()) {
        return text.to_string();
    }
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_password(None);
        let _ = url.set_username(MASK);
    }
    if url.query().is_some() {
        url.set_query(Some(MASK));
    }
    url.to_string()
}

fn flatten_dotted<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let value = serde_json::Value::deserialize(d)?;
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    Ok(out)
}

/// A secret setting (passwords, keys, tokens): `Debug` never shows it, and `config check`
/// prints it masked. Empty means unset.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that hands it to a client library.
    pub fn expose(&self) -> Option<&str> {
        (!self.0.is_empty()).then_some(self.0.as_str())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { MASK })
    }
}

thread_local! {
    /// Set while `to_toml_masked` serialises, so secrets come out masked there and only there
    /// (`with_overrides` round-trips settings through serde and must keep them).
    static MASKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let masked = MASKING.with(|m| m.get()) && !self.0.is_empty();
        s.serialize_str(if masked { MASK } else { &self.0 })
    }
}

/// Optional strings are written as `""` when off (TOML has no null, env vars cannot unset).
/// Not serde_with's `NoneAsEmptyString`: it refuses an env value that `try_parsing` turned into
/// a number (`DCAM__DELIVERY__INSTANCE_ID=123`), where this reads it as the string it was.
mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or_default())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(d).map(|v| v.filter(|s| !s.trim().is_empty()))
    }
}

/// Sections that moved, so an old file or env var fails with where it went instead of "unknown field".
const MOVED_KEYS: [(&str, &str); 1] = [("heatmap.s3", "s3")];

fn env_name(key: &str) -> String {
    key.replace('.', "__").to_ascii_uppercase()
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Settings {
    /// Loads the layered configuration and validates it.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Same as `load`, with the environment passed in (tests must not touch the process env).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let file = match file {
            Some(path) if !path.exists() => bail!("config file {} does not exist", path.display()),
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?),
            None => None,
        };
        Self::layered(DEFAULT_TOML, file.as_deref(), env)
    }

    /// `base` (TOML) < `file` (TOML) < the `DCAM__*` entries of `env`, deserialised, the engine
    /// policy applied and validated.
    fn layered(base: &str, file: Option<&str>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        use config::{Config, File, FileFormat};
        let mut builder = Config::builder().add_source(File::from_str(base, FileFormat::Toml));
        if let Some(text) = file {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let env_map: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("DCAM__")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix("DCAM")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("kafka.input_topics")
                .with_list_parse_key("telemetry.allowed_hosts")
                .with_list_parse_key("model.allowed_sources")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let raw = builder.build().context("reading configuration")?;
        for (moved, now) in MOVED_KEYS {
            if raw.get::<config::Value>(moved).is_ok() {
                bail!(
                    "invalid configuration: {moved} moved to {now} (in a file: rename the section; env: DCAM__{}__* is now DCAM__{}__*)",
                    env_name(moved),
                    env_name(now)
                );
            }
        }
        let mut settings: Settings = raw.try_deserialize().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.apply_engine_policy();
        settings.validate()?;
        Ok(settings)
    }

    /// Fills `engine.sessions`, `engine.intra_threads` and `batch.max_batch` left at 0 from the
    /// provider and the cores this process may use (its cgroup's CPU quota included). On CPU: one
    /// single-threaded session per core (at most `MAX_POLICY_CPU_SESSIONS`, sharing the cores
    /// between them beyond that) at batch 4. Measured on 2 cores against one session with a
    /// thread per core at batch 32: 25 % more images per second, 18 % less CPU per image, 40 %
    /// of the peak memory (README, Benchmark). A GPU: one session at batch 32.
    pub fn apply_engine_policy(&mut self) {
        let cores = usable_cores();
        let cpu = self.engine.provider == Provider::Cpu;
        if self.engine.sessions == 0 {
            self.engine.sessions = if cpu { cores.min(MAX_POLICY_CPU_SESSIONS) } else { 1 };
        }
        if self.engine.intra_threads == 0 && cpu {
            self.engine.intra_threads = (cores / self.engine.sessions).max(1);
        }
        if self.batch.max_batch == 0 {
            self.batch.max_batch = if cpu { 4 } else { 32 };
        }
    }

    /// Each section's own range checks (next to its type), then the checks across sections.
    pub fn validate(&self) -> Result<()> {
        let mut p = Problems::default();
        self.kafka.validate(&mut p);
        self.topics.validate(&mut p);
        self.model.validate(&mut p);
        self.engine.validate(&mut p);
        self.batch.validate(&mut p);
        self.decode.validate(&mut p);
        self.pipeline.validate(&mut p);
        self.heatmap.validate(&mut p);
        self.s3.validate(&mut p);
        self.delivery.validate(&mut p);
        self.telemetry.validate(&mut p);
        self.inspect.validate(&mut p);
        self.control.validate(&mut p);
        for t in &self.kafka.input_topics {
            p.check(t != &self.topics.scores && t != &self.topics.dead_letter && Some(t) != self.topics.anomalies.as_ref(), || {
                format!("kafka.input_topics contains output topic {t:?}")
            });
            for (name, topic) in [("topics.control", &self.topics.control), ("topics.control_audit", &self.topics.control_audit)] {
                p.check(topic.as_ref() != Some(t), || format!("{name} ({t:?}) must be a topic of its own"));
            }
        }
        p.check(self.batch.queue_capacity >= self.batch.max_batch, || {
            format!("batch.queue_capacity ({}) must be >= batch.max_batch ({})", self.batch.queue_capacity, self.batch.max_batch)
        });
        p.check(self.pipeline.max_in_flight >= self.batch.max_batch, || {
            format!("pipeline.max_in_flight ({}) must be >= batch.max_batch ({})", self.pipeline.max_in_flight, self.batch.max_batch)
        });
        p.into_result()
    }

    /// The effective configuration as TOML, secrets masked: the secret fields, librdkafka
    /// pass-through properties that name a secret, and credentials inside endpoint URLs.
    pub fn to_toml_masked(&self) -> String {
        let mut copy = self.clone();
        for (key, value) in copy.kafka.extra.iter_mut() {
            if is_secret_property(key) {
                *value = MASK.into();
            }
        }
        for url in [copy.telemetry.otlp_endpoint.as_mut(), copy.s3.endpoint.as_mut(), Some(&mut copy.kafka.brokers)].into_iter().flatten() {
            *url = mask_url_credentials(url);
        }
        // `Secret` fields print as the mask while this is set.
        MASKING.with(|m| m.set(true));
        let text = toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}"));
        MASKING.with(|m| m.set(false));
        text
    }

    /// A copy with some keys replaced (`("kafka.brokers", "host:9092")`), each read like the env var
    /// of its key (lists comma-separated, `""` = off) over these settings and validated like a
    /// loaded file: how the tools that embed the operator (demo, bench) adapt it, so no caller edits
    /// fields behind validation's back.
    pub fn with_overrides<V: ToString>(&self, overrides: &[(&str, V)]) -> Result<Self> {
        let current = toml::to_string(self).context("serialising settings")?;
        let env = overrides.iter().map(|(key, value)| (format!("DCAM__{}", env_name(key)), value.to_string()));
        Self::layered(&current, None, env).context("invalid override")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(s.batch.max_batch, 4, "the CPU policy's batch");
        assert_eq!(s.engine.sessions, cores.min(4), "a session per core, at most 4");
        assert_eq!(s.engine.intra_threads, (cores / s.engine.sessions).max(1));
        assert_eq!(s.delivery.mode, DeliveryMode::AtLeastOnce);
        assert_eq!(s.heatmap.policy, HeatmapPolicy::Anomalies);
    }

    #[test]
    fn default_toml_is_the_types_defaults() {
        let file: Settings = toml::from_str(DEFAULT_TOML).expect("config/default.toml parses");
        assert_eq!(file, Settings::default(), "config/default.toml and the Default impls disagree");
        Settings::default().validate().expect_err("max_batch 0 and sessions 0 are for the policy to fill");
        let mut filled = Settings::default();
        filled.apply_engine_policy();
        filled.validate().expect("the defaults, with the policy applied, are valid");
    }

    #[test]
    fn a_moved_section_says_where_it_went() {
        let err = Settings::load_with_env(None, env(&[("DCAM__HEATMAP__S3__ENDPOINT", "http://minio:9000")])).unwrap_err();
        assert!(format!("{err:#}").contains("heatmap.s3 moved to s3"), "{err:#}");
        assert!(format!("{err:#}").contains("DCAM__S3__"), "{err:#}");
        let file = write("[heatmap.s3]\nregion = \"eu-west-1\"\n");
        let err = Settings::load_with_env(Some(file.path()), env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("heatmap.s3 moved to s3"), "{err:#}");
        let s = Settings::load_with_env(None, env(&[("DCAM__S3__REGION", "eu-west-1")])).unwrap();
        assert_eq!(s.s3.region, "eu-west-1");
    }

    #[test]
    fn model_sources_are_directories_or_s3_prefixes() {
        let s = Settings::load_with_env(None, env(&[("DCAM__MODEL__ALLOWED_SOURCES", "/opt/models,file:///srv/m,s3://bucket/a/b/,s3://whole")])).unwrap();
        assert_eq!(
            s.model.allowed_sources,
            vec![
                ModelSource::Dir("/opt/models".into()),
                ModelSource::Dir("/srv/m".into()),
                ModelSource::S3 { bucket: "bucket".into(), prefix: "a/b".into() },
                ModelSource::S3 { bucket: "whole".into(), prefix: String::new() },
            ]
        );
        for bad in ["s3:///key", "https://example.com/m", "file://host/dir"] {
            let err = Settings::load_with_env(None, env(&[("DCAM__MODEL__ALLOWED_SOURCES", bad)])).unwrap_err();
            assert!(format!("{err:#}").contains("model.allowed_sources"), "{bad}: {err:#}");
        }
    }

    #[test]
    fn file_then_env_override_in_order() {
        let f = write("[batch]\nmax_batch = 8\n[kafka]\nbrokers = \"file:1\"\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[("DCAM__KAFKA__BROKERS", "env:2"), ("DCAM__KAFKA__INPUT_TOPICS", "a,b")])).unwrap();
        assert_eq!(s.batch.max_batch, 8);
        assert_eq!(s.kafka.brokers, "env:2");
        assert_eq!(s.kafka.input_topics, vec!["a", "b"]);
    }

    #[test]
    fn masked_output_hides_every_secret() {
        let f = write(
            "[kafka]\nsasl_password = \"pw1\"\n[kafka.extra]\n\"sasl.oauthbearer.client.secret\" = \"pw2\"\n\"ssl.key.pem\" = \"pw3\"\n\"ssl.keystore.password\" = \"pw4\"\n\"ssl.keystore.location\" = \"/etc/ks.p12\"\n\"fetch.max.bytes\" = \"52428800\"\n[telemetry]\notlp_endpoint = \"http://user:pw5@collector:4317/?api_key=pw6\"\n[s3]\nendpoint = \"https://k:pw7@s3.local\"\nsecret_access_key = \"pw8\"\n",
        );
        let text = Settings::load_with_env(Some(f.path()), env(&[])).unwrap().to_toml_masked();
        for n in 1..=8 {
            assert!(!text.contains(&format!("pw{n}")), "pw{n} leaked:\n{text}");
        }
        assert!(text.contains("/etc/ks.p12") && text.contains("52428800") && text.contains("collector:4317"), "{text}");
    }

    #[test]
    fn optional_strings_from_env_keep_numbers_and_empty_is_off() {
        let s = Settings::load_with_env(None, env(&[("DCAM__DELIVERY__INSTANCE_ID", "123"), ("DCAM__TOPICS__ANOMALIES", "")])).unwrap();
        assert_eq!(s.delivery.instance_id.as_deref(), Some("123"));
        assert_eq!(s.topics.anomalies, None);
        let s = Settings::load_with_env(None, env(&[("DCAM__PIPELINE__STUCK_AFTER_MS", "45000")])).unwrap();
        assert_eq!(s.pipeline.stuck_after, Duration::from_millis(45_000));
    }

    #[test]
    fn unknown_key_is_named() {
        let f = write("[batch]\nmax_bach = 8\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("max_bach"), "{err}");
        let f = write("[nonsense]\nx = 1\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn out_of_range_is_named() {
        let f = write("[batch]\nmax_batch = 2000\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("batch.max_batch"), "{err}");
        let err = Settings::load_with_env(None, env(&[("DCAM__ENGINE__PROVIDER", "tpu")])).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        let err = Settings::load_with_env(None, env(&[("DCAM__HEATMAP__STORE", "ftp://x")])).unwrap_err().to_string();
        assert!(err.contains("heatmap.store"), "{err}");
        // Live streams must leave connections for everything else.
        let err = Settings::load_with_env(None, env(&[("DCAM__TELEMETRY__MAX_CONNECTIONS", "16"), ("DCAM__TELEMETRY__MAX_LIVE_CLIENTS", "16")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.max_live_clients"), "{err}");
        let err = Settings::load_with_env(None, env(&[("DCAM__TELEMETRY__ALLOWED_HOSTS", "https://dcam.example.com")])).unwrap_err().to_string();
        assert!(err.contains("telemetry.allowed_hosts"), "{err}");
        let hosts = Settings::load_with_env(None, env(&[("DCAM__TELEMETRY__ALLOWED_HOSTS", "dcam.example.com,dcam.dcam.svc")])).unwrap();
        assert_eq!(hosts.telemetry.allowed_hosts, ["dcam.example.com", "dcam.dcam.svc"], "a comma-separated list from the environment");
    }

    #[test]
    fn sasl_needs_a_mechanism_and_secrets_are_masked() {
        let err = Settings::load_with_env(None, env(&[("DCAM__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")])).unwrap_err().to_string();
        assert!(err.contains("kafka.sasl_mechanism"), "{err}");
        let s = Settings::load_with_env(
            None,
            env(&[("DCAM__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"), ("DCAM__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"), ("DCAM__KAFKA__SASL_PASSWORD", "hunter2")]),
        )
        .unwrap();
        let shown = s.to_toml_masked();
        assert!(!shown.contains("hunter2") && shown.contains("***"));
    }

    #[test]
    fn librdkafka_passthrough_keeps_dotted_names() {
        let f = write("[kafka.extra]\n\"fetch.max.bytes\" = \"52428800\"\n\"enable.idempotence\" = true\n");
        let s = Settings::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(s.kafka.extra.get("fetch.max.bytes").map(String::as_str), Some("52428800"));
        assert_eq!(s.kafka.extra.get("enable.idempotence").map(String::as_str), Some("true"));
    }

    #[test]
    fn durations_are_typed_and_secrets_never_print() {
        let s = Settings::load_with_env(
            None,
            env(&[("DCAM__BATCH__MAX_DELAY_MS", "7"), ("DCAM__KAFKA__SASL_PASSWORD", "hunter2"), ("DCAM__TOPICS__ANOMALIES", "")]),
        )
        .unwrap();
        assert_eq!(s.batch.max_delay, Duration::from_millis(7));
        assert_eq!(s.topics.anomalies, None, "empty means off");
        assert!(!format!("{s:?}").contains("hunter2"), "Debug shows no secret");
        // Overrides round-trip through serde and keep the secret (and the `_ms` keys).
        let o = s.with_overrides(&[("batch.max_delay_ms", "9"), ("kafka.brokers", "b:1")]).unwrap();
        assert_eq!(o.kafka.sasl_password.expose(), Some("hunter2"));
        assert_eq!((o.batch.max_delay, o.kafka.brokers.as_str()), (Duration::from_millis(9), "b:1"));
        assert!(format!("{:#}", s.with_overrides(&[("batch.max_batch", "2000")]).unwrap_err()).contains("batch.max_batch"), "overrides are validated");
        let gpu = s.with_overrides(&[("engine.provider", "cuda"), ("engine.sessions", "0"), ("batch.max_batch", "0")]).unwrap();
        assert_eq!((gpu.engine.sessions, gpu.batch.max_batch), (1, 32), "the GPU policy, from an override");
        let explicit = s.with_overrides(&[("engine.sessions", "1"), ("engine.intra_threads", "0"), ("batch.max_batch", "16")]).unwrap();
        assert_eq!((explicit.engine.sessions, explicit.batch.max_batch), (1, 16), "set values stay");
        let lists = s.with_overrides(&[("kafka.input_topics", "a,b"), ("topics.control", "")]).unwrap();
        assert_eq!((lists.kafka.input_topics.clone(), lists.topics.control), (vec!["a".to_string(), "b".to_string()], None));
        assert!(format!("{:#}", s.with_overrides(&[("batch.nope", "1")]).unwrap_err()).contains("nope"));
    }

    #[test]
    fn control_signing_key_is_one_long_secret() {
        let key = "k".repeat(MIN_SIGNING_KEY_BYTES);
        let s = Settings::load_with_env(None, env(&[("DCAM__CONTROL__SIGNING_KEY", &key)])).unwrap();
        assert!(!s.to_toml_masked().contains(&key), "the key prints masked");
        let short = Settings::load_with_env(None, env(&[("DCAM__CONTROL__SIGNING_KEY", "short")])).unwrap_err().to_string();
        assert!(short.contains("control.signing_key must be at least 32 bytes"), "{short}");
        let both =
            Settings::load_with_env(None, env(&[("DCAM__CONTROL__SIGNING_KEY", &key), ("DCAM__CONTROL__SIGNING_KEY_FILE", "/k")])).unwrap_err().to_string();
        assert!(both.contains("not both"), "{both}");
        let same = Settings::load_with_env(None, env(&[("DCAM__TOPICS__CONTROL_AUDIT", "dcam.control")])).unwrap_err().to_string();
        assert!(same.contains("topics.control_audit must differ"), "{same}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/x.toml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("does not exist"));
    }
}
