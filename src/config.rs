//! Settings: `config/default.toml` (compiled in) < `--config FILE` < env `DCAM__SECTION__KEY`.
//! Every struct denies unknown fields so a typo fails loudly with the key's name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub delivery: DeliverySettings,
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub input_topics: Vec<String>,
    pub client_id: String,
    pub security_protocol: SecurityProtocol,
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
    pub ssl_ca_location: String,
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: String,
    pub session_timeout_ms: u64,
    pub max_poll_interval_ms: u64,
    pub auto_offset_reset: OffsetReset,
    /// librdkafka properties. The config crate splits dotted keys into tables, so they are
    /// flattened back to `a.b.c` here.
    #[serde(default, deserialize_with = "flatten_dotted")]
    pub extra: BTreeMap<String, String>,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub scores: String,
    pub anomalies: String,
    pub dead_letter: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub path: String,
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Cpu,
    Cuda,
    Tensorrt,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub provider: Provider,
    pub device_id: i32,
    pub require_gpu: bool,
    pub sessions: usize,
    pub intra_threads: usize,
    pub trt_fp16: bool,
    pub trt_engine_cache: String,
    pub warmup_batches: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub max_batch: usize,
    pub max_delay_ms: u64,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSettings {
    pub max_payload_bytes: usize,
    pub max_pixels: u64,
    pub workers: usize,
    pub file_uri_root: String,
    pub max_decode_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
    pub stuck_after_ms: u64,
    pub shutdown_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeatmapPolicy {
    All,
    Anomalies,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeatmapSettings {
    pub policy: HeatmapPolicy,
    pub store: String,
    pub overlay: bool,
    pub write_timeout_ms: u64,
    pub s3: S3Settings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub allow_http: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    AtLeastOnce,
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub mode: DeliveryMode,
    pub instance_id: String,
    pub transaction_timeout_ms: u64,
    pub commit_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub http_addr: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub otlp_endpoint: String,
    pub service_name: String,
}

const MASK: &str = "***";

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

impl Settings {
    /// Loads the layered configuration and validates it.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Same as `load`, with the environment passed in (tests must not touch the process env).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        use config::{Config, File, FileFormat};
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            if !path.exists() {
                bail!("config file {} does not exist", path.display());
            }
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let env_map: config::Map<String, String> = env.into_iter().filter(|(k, _)| k.starts_with("DCAM__")).collect();
        builder = builder.add_source(
            config::Environment::with_prefix("DCAM")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("kafka.input_topics")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let raw = builder.build().context("reading configuration")?;
        let settings: Settings = raw.try_deserialize().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Range and consistency checks that serde's types cannot express.
    pub fn validate(&self) -> Result<()> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                errors.push(msg)
            }
        };
        check(!self.kafka.brokers.trim().is_empty(), "kafka.brokers must not be empty".into());
        check(!self.kafka.group_id.trim().is_empty(), "kafka.group_id must not be empty".into());
        check(!self.kafka.input_topics.is_empty(), "kafka.input_topics must name at least one topic".into());
        check(
            (1000..=3_600_000).contains(&self.kafka.session_timeout_ms),
            format!("kafka.session_timeout_ms must be in 1000..=3600000, got {}", self.kafka.session_timeout_ms),
        );
        check(
            (self.kafka.session_timeout_ms..=3_600_000).contains(&self.kafka.max_poll_interval_ms),
            format!("kafka.max_poll_interval_ms must be in session_timeout_ms..=3600000, got {}", self.kafka.max_poll_interval_ms),
        );
        if self.kafka.security_protocol.uses_sasl() {
            let known = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];
            check(
                known.contains(&self.kafka.sasl_mechanism.as_str()),
                format!("kafka.sasl_mechanism must be one of {known:?} with SASL, got {:?}", self.kafka.sasl_mechanism),
            );
        }
        check(!self.topics.scores.is_empty(), "topics.scores must not be empty".into());
        check(!self.topics.dead_letter.is_empty(), "topics.dead_letter must not be empty".into());
        for t in &self.kafka.input_topics {
            check(
                t != &self.topics.scores && t != &self.topics.dead_letter && t != &self.topics.anomalies,
                format!("kafka.input_topics contains output topic {t:?}"),
            );
        }
        check(!self.model.path.is_empty(), "model.path must not be empty".into());
        for (class, t) in &self.model.thresholds {
            check(t.is_finite(), format!("model.thresholds.{class} must be a finite number"));
        }
        check((1..=64).contains(&self.engine.sessions), format!("engine.sessions must be in 1..=64, got {}", self.engine.sessions));
        check(self.engine.intra_threads <= 256, format!("engine.intra_threads must be <= 256, got {}", self.engine.intra_threads));
        check(self.engine.device_id >= 0, format!("engine.device_id must be >= 0, got {}", self.engine.device_id));
        check((1..=1024).contains(&self.batch.max_batch), format!("batch.max_batch must be in 1..=1024, got {}", self.batch.max_batch));
        check(self.batch.max_delay_ms <= 60_000, format!("batch.max_delay_ms must be <= 60000, got {}", self.batch.max_delay_ms));
        check(
            self.batch.queue_capacity >= self.batch.max_batch,
            format!("batch.queue_capacity ({}) must be >= batch.max_batch ({})", self.batch.queue_capacity, self.batch.max_batch),
        );
        check(self.decode.max_payload_bytes >= 1024, format!("decode.max_payload_bytes must be >= 1024, got {}", self.decode.max_payload_bytes));
        check(self.decode.max_pixels >= 1, "decode.max_pixels must be >= 1".into());
        check(self.decode.workers <= 256, format!("decode.workers must be <= 256, got {}", self.decode.workers));
        check(
            self.pipeline.max_in_flight >= self.batch.max_batch,
            format!("pipeline.max_in_flight ({}) must be >= batch.max_batch ({})", self.pipeline.max_in_flight, self.batch.max_batch),
        );
        check(
            self.pipeline.max_in_flight_bytes >= 1 << 20,
            format!("pipeline.max_in_flight_bytes must be >= 1048576, got {}", self.pipeline.max_in_flight_bytes),
        );
        check(self.pipeline.stuck_after_ms >= 1000, format!("pipeline.stuck_after_ms must be >= 1000, got {}", self.pipeline.stuck_after_ms));
        check(
            (1000..=3_600_000).contains(&self.pipeline.shutdown_timeout_ms),
            format!("pipeline.shutdown_timeout_ms must be in 1000..=3600000, got {}", self.pipeline.shutdown_timeout_ms),
        );
        check(
            self.decode.max_decode_bytes == 0 || self.decode.max_decode_bytes >= 16 << 20,
            format!("decode.max_decode_bytes must be 0 (auto) or >= 16777216, got {}", self.decode.max_decode_bytes),
        );
        check(self.heatmap.write_timeout_ms >= 100, format!("heatmap.write_timeout_ms must be >= 100, got {}", self.heatmap.write_timeout_ms));
        check(self.heatmap.s3.connect_timeout_ms >= 100, format!("heatmap.s3.connect_timeout_ms must be >= 100, got {}", self.heatmap.s3.connect_timeout_ms));
        check(self.heatmap.s3.request_timeout_ms >= 100, format!("heatmap.s3.request_timeout_ms must be >= 100, got {}", self.heatmap.s3.request_timeout_ms));
        check(
            self.heatmap.store.starts_with("file://") || self.heatmap.store.starts_with("s3://"),
            format!("heatmap.store must start with file:// or s3://, got {:?}", self.heatmap.store),
        );
        check(
            (1000..=900_000).contains(&self.delivery.transaction_timeout_ms),
            format!("delivery.transaction_timeout_ms must be in 1000..=900000, got {}", self.delivery.transaction_timeout_ms),
        );
        check(
            (10..=60_000).contains(&self.delivery.commit_interval_ms),
            format!("delivery.commit_interval_ms must be in 10..=60000, got {}", self.delivery.commit_interval_ms),
        );
        check(
            self.delivery.instance_id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            format!("delivery.instance_id may only hold [A-Za-z0-9._-], got {:?}", self.delivery.instance_id),
        );
        check(
            self.telemetry.http_addr.parse::<std::net::SocketAddr>().is_ok(),
            format!("telemetry.http_addr must be host:port with an IP, got {:?}", self.telemetry.http_addr),
        );
        check(
            tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_ok(),
            format!("telemetry.log_level is not a valid filter: {:?}", self.telemetry.log_level),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("invalid configuration:\n  - {}", errors.join("\n  - "))
        }
    }

    /// The effective configuration as TOML, secrets masked: the secret fields, librdkafka
    /// pass-through properties that name a secret, and credentials inside endpoint URLs.
    pub fn to_toml_masked(&self) -> String {
        let mut copy = self.clone();
        for secret in [&mut copy.kafka.sasl_password, &mut copy.kafka.ssl_key_password, &mut copy.heatmap.s3.secret_access_key] {
            if !secret.is_empty() {
                *secret = MASK.into();
            }
        }
        for (key, value) in copy.kafka.extra.iter_mut() {
            if is_secret_property(key) {
                *value = MASK.into();
            }
        }
        for url in [&mut copy.telemetry.otlp_endpoint, &mut copy.heatmap.s3.endpoint, &mut copy.kafka.brokers] {
            *url = mask_url_credentials(url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// A copy with some keys replaced (`("kafka.brokers", "host:9092".into())`), validated like a
    /// loaded file: how the tools that embed the operator (demo, bench) adapt it, so no caller
    /// edits fields behind validation's back.
    pub fn with_overrides(&self, overrides: &[(&str, serde_json::Value)]) -> Result<Self> {
        let mut tree = serde_json::to_value(self).context("serialising settings")?;
        for (key, value) in overrides {
            let mut node = &mut tree;
            for part in key.split('.') {
                node = node.get_mut(part).with_context(|| format!("unknown setting {key}"))?;
            }
            *node = value.clone();
        }
        let settings: Settings = serde_json::from_value(tree).map_err(|e| anyhow::anyhow!("invalid override: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Stable identity of this instance, used for the transactional id.
    pub fn instance_id(&self) -> String {
        if !self.delivery.instance_id.is_empty() {
            return self.delivery.instance_id.clone();
        }
        hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "dcam-stream".into())
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
        assert_eq!(s.batch.max_batch, 32);
        assert_eq!(s.delivery.mode, DeliveryMode::AtLeastOnce);
        assert_eq!(s.heatmap.policy, HeatmapPolicy::Anomalies);
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
            "[kafka]\nsasl_password = \"pw1\"\n[kafka.extra]\n\"sasl.oauthbearer.client.secret\" = \"pw2\"\n\"ssl.key.pem\" = \"pw3\"\n\"ssl.keystore.password\" = \"pw4\"\n\"ssl.keystore.location\" = \"/etc/ks.p12\"\n\"fetch.max.bytes\" = \"52428800\"\n[telemetry]\notlp_endpoint = \"http://user:pw5@collector:4317/?api_key=pw6\"\n[heatmap.s3]\nendpoint = \"https://k:pw7@s3.local\"\nsecret_access_key = \"pw8\"\n",
        );
        let text = Settings::load_with_env(Some(f.path()), env(&[])).unwrap().to_toml_masked();
        for n in 1..=8 {
            assert!(!text.contains(&format!("pw{n}")), "pw{n} leaked:\n{text}");
        }
        assert!(text.contains("/etc/ks.p12") && text.contains("52428800") && text.contains("collector:4317"), "{text}");
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
        let f = write("[batch]\nmax_batch = 0\n");
        let err = Settings::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("batch.max_batch"), "{err}");
        let err = Settings::load_with_env(None, env(&[("DCAM__ENGINE__PROVIDER", "tpu")])).unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        let err = Settings::load_with_env(None, env(&[("DCAM__HEATMAP__STORE", "ftp://x")])).unwrap_err().to_string();
        assert!(err.contains("heatmap.store"), "{err}");
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
    fn missing_file_is_an_error() {
        let err = Settings::load_with_env(Some(Path::new("/nonexistent/x.toml")), env(&[])).unwrap_err().to_string();
        assert!(err.contains("does not exist"));
    }
}
