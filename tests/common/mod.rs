//! Integration-test harness: a real Kafka-protocol broker process (noida-db, started and
//! stopped here) or an external cluster from `DCAM_TEST_BROKERS`, plus helpers to run the real
//! `dcam-stream` binary and read topics back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn datasets() -> PathBuf {
    std::env::var("DCAM_DATASETS").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("../shared/datasets"))
}

pub fn model_path() -> PathBuf {
    repo_root().join("models/dcam.onnx")
}

/// A copy of the committed model whose `image` input has a fixed batch dimension of `batch`.
pub fn fixed_batch_model(dir: &Path, batch: i64) -> PathBuf {
    let out = dir.join(format!("dcam-batch-{batch}.onnx"));
    edited_model(
        &out,
        &format!(
            r#"image = next(i for i in m.graph.input if i.name == "image")
image.type.tensor_type.shape.dim[0].dim_value = {batch}"#
        ),
    );
    out
}

/// A copy of the committed model whose score is NaN for an all-black image (every other image
/// scores as before).
pub fn nan_on_black_model(dir: &Path) -> PathBuf {
    let out = dir.join("dcam-nan-on-black.onnx");
    edited_model(
        &out,
        r#"
from onnx import helper, TensorProto
g = m.graph
for n in g.node:
    for i, o in enumerate(n.output):
        if o == "score":
            n.output[i] = "score_model"
scalar = lambda name, v: helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))
g.node.extend([
    helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
    helper.make_node("ReduceMax", ["image_f"], ["image_max"], axes=[1, 2, 3], keepdims=0),
    scalar("zero", 0.0),
    scalar("nan", float("nan")),
    helper.make_node("Equal", ["image_max", "zero"], ["black"]),
    helper.make_node("Where", ["black", "nan", "score_model"], ["score"]),
])
onnx.checker.check_model(m)
"#,
    );
    out
}

/// Writes `out`: a copy of the committed model changed by `edit`, Python run with the `onnx`
/// package of the test environment, where `m` is the loaded model and `props` its metadata by key.
pub fn edited_model(out: &Path, edit: &str) {
    let script =
        format!("import json, sys, onnx\nm = onnx.load(sys.argv[1])\nprops = {{p.key: p for p in m.metadata_props}}\n{edit}\nonnx.save(m, sys.argv[2])\n");
    let status = Command::new(repo_root().join(".venv/bin/python"))
        .args(["-c", &script, &model_path().display().to_string(), &out.display().to_string()])
        .status()
        .expect("running the test environment's python (scripts/setup-python.sh)");
    assert!(status.success(), "writing {} failed", out.display());
}

/// A copy of the committed model with another version and calibration (thresholds scaled).
pub fn recalibrated_model(dir: &Path, version: &str) -> PathBuf {
    let out = dir.join(format!("dcam-{version}.onnx"));
    edited_model(
        &out,
        &format!(
            r#"props["dcam.version"].value = "{version}"
cal = json.loads(props["dcam.calibration"].value)
for c in cal.values():
    c["threshold"] = c["threshold"] * 1.5
props["dcam.calibration"].value = json.dumps(cal)"#
        ),
    );
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Blocks until something listens on the local `port`.
pub fn wait_for_port(port: u16, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A broker for one test: a noida-db child process with its own port and data dir.
pub struct Broker {
    pub brokers: String,
    child: Option<Child>,
    port: u16,
    data_dir: Option<tempfile::TempDir>,
}

impl Broker {
    pub fn start() -> Broker {
        if let Ok(external) = std::env::var("DCAM_TEST_BROKERS") {
            return Broker { brokers: external, child: None, port: 0, data_dir: None };
        }
        let data_dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut b = Broker { brokers: format!("127.0.0.1:{port}"), child: None, port, data_dir: Some(data_dir) };
        b.spawn();
        b
    }

    pub fn is_external(&self) -> bool {
        self.data_dir.is_none()
    }

    fn bin() -> PathBuf {
        std::env::var("NOIDA_DB_BIN").map(PathBuf::from).unwrap_or_else(|_| repo_root().join(".venv/bin/noida-db"))
    }

    fn spawn(&mut self) {
        let bin = Self::bin();
        assert!(bin.exists(), "noida-db not found at {} (run scripts/setup-python.sh, or set DCAM_TEST_BROKERS)", bin.display());
        let dir = self.data_dir.as_ref().unwrap().path();
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        // Its own process group: noida-db ignores SIGTERM and runs a child process, and an idle
        // broker left behind burns CPU; the group is killed as a whole.
        use std::os::unix::process::CommandExt;
        let child = Command::new(&bin)
            .args(["start", "--only", "kafka", "--kafka-port", &self.port.to_string(), "--data-dir"])
            .arg(dir.join("data"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning noida-db");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30), "broker");
    }

    /// Stops the broker process and starts it again on the same port and data dir. The Kafka
    /// service is stopped gracefully first (`noida-db stop kafka`, like Kafka's controlled
    /// shutdown): killed by a signal alone, noida-db sometimes loses the last second of writes it
    /// had acknowledged (docs/DESIGN.md §5), which no client can make up for.
    pub fn restart(&mut self, down_for: Duration) {
        assert!(!self.is_external(), "cannot restart an external cluster");
        let dir = self.data_dir.as_ref().unwrap().path().join("data");
        let stopped = Command::new(Self::bin()).args(["stop", "kafka", "--data-dir"]).arg(&dir).stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(stopped.as_ref().is_ok_and(|s| s.success()), "noida-db stop kafka failed: {stopped:?}");
        self.kill();
        std::thread::sleep(down_for);
        self.spawn();
    }

    /// Stops the broker for good (the rest of the test runs without it).
    pub fn stop(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let group = -(c.id() as i32);
            // The broker writes its data dir on SIGTERM (seconds for a big backlog): let it finish,
            // or a restart finds it truncated.
            unsafe { libc::kill(group, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// Creates a topic with topic-level configs (e.g. `max.message.bytes`).
    pub fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &self.brokers).create().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let res = rt.block_on(admin.create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))).unwrap();
        for r in res {
            if let Err((t, e)) = r {
                assert!(e == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating {t}: {e}");
            }
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new().set("bootstrap.servers", &self.brokers).set("message.max.bytes", "20971520").set("enable.idempotence", "true").create().unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Unique topic names so tests sharing an external cluster do not collide.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), rand::random::<u32>())
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp (ms since the epoch), if it has one.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().unwrap_or_default()).expect("record value is JSON")
    }
}

/// Reads a topic from the beginning until `n` records or `timeout`; read_committed.
pub fn read_topic(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    read_topic_until(brokers, topic, timeout, |got| got.len() >= n)
}

pub fn read_topic_until(brokers: &str, topic: &str, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    read_topic_isolated(brokers, topic, "read_committed", timeout, done)
}

/// Where a read_committed reader stops short, per partition: (partition, records visible
/// read_committed, records read_uncommitted). A partition whose uncommitted count runs ahead for
/// good holds a transaction that was never ended (its last stable offset is stuck).
pub fn isolation_gap(brokers: &str, topic: &str) -> Vec<(i32, usize, usize)> {
    let count = |isolation| {
        let records = read_topic_isolated(brokers, topic, isolation, Duration::from_secs(8), |_| false);
        let mut per: std::collections::BTreeMap<i32, usize> = Default::default();
        for r in records {
            *per.entry(r.partition).or_default() += 1;
        }
        per
    };
    let (committed, uncommitted) = (count("read_committed"), count("read_uncommitted"));
    uncommitted.iter().map(|(p, u)| (*p, committed.get(p).copied().unwrap_or(0), *u)).collect()
}

fn read_topic_isolated(brokers: &str, topic: &str, isolation: &str, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("session.timeout.ms", "6000")
        // noida-db ignores fetch size limits and answers with the whole backlog: a long topic of
        // images (a soak's input) is one response of hundreds of MB, over librdkafka's default.
        .set("receive.message.max.bytes", "1000000000")
        .create()
        .unwrap();
    // Explicit assignment from the beginning: no group join, so reading starts at once.
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        if n > 0 || Instant::now() >= deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
                .unwrap_or_default();
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// Lost and duplicated ids among score records (keyed by image id).
pub fn audit(records: &[Record], ids: &[String]) -> (usize, usize) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in records {
        *counts.entry(String::from_utf8(r.key.clone().unwrap()).unwrap()).or_default() += 1;
    }
    let lost = ids.iter().filter(|id| !counts.contains_key(*id)).count();
    let dups = counts.values().map(|c| c - 1).sum();
    (lost, dups)
}

/// Distinct record keys (image ids) among `records`.
pub fn unique_keys(records: &[Record]) -> usize {
    records.iter().map(|r| r.key.clone()).collect::<std::collections::HashSet<_>>().len()
}

/// Committed offsets of a group for a topic's partitions.
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let out = committed.elements().iter().map(|e| e.offset().to_raw().unwrap_or(-1)).collect();
    drop(committed);
    out
}

/// A running `dcam-stream run` process.
pub struct OperatorProcess {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

#[derive(Clone)]
pub struct OperatorConfig {
    pub env: Vec<(String, String)>,
    pub log_dir: PathBuf,
}

impl OperatorConfig {
    pub fn new(brokers: &str, input: &str, scores: &str, dlq: &str, group: &str, log_dir: &Path) -> Self {
        let env = vec![
            ("DCAM__KAFKA__BROKERS", brokers.to_string()),
            ("DCAM__KAFKA__INPUT_TOPICS", input.to_string()),
            ("DCAM__KAFKA__GROUP_ID", group.to_string()),
            ("DCAM__KAFKA__SESSION_TIMEOUT_MS", "6000".to_string()),
            // A killed member holds up the group's next join for up to this long.
            ("DCAM__KAFKA__MAX_POLL_INTERVAL_MS", "15000".to_string()),
            ("DCAM__TOPICS__SCORES", scores.to_string()),
            ("DCAM__TOPICS__DEAD_LETTER", dlq.to_string()),
            // Replicas of one group share their control topic; other tests never see it.
            ("DCAM__TOPICS__CONTROL", format!("{group}.control")),
            ("DCAM__TOPICS__CONTROL_AUDIT", format!("{group}.control.audit")),
            ("DCAM__MODEL__PATH", model_path().display().to_string()),
            ("DCAM__DELIVERY__COMMIT_INTERVAL_MS", "200".to_string()),
            ("DCAM__BATCH__MAX_BATCH", "8".to_string()),
            ("DCAM__ENGINE__WARMUP_BATCHES", "0".to_string()),
        ];
        Self { env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), log_dir: log_dir.to_path_buf() }
    }

    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn spawn(&self, name: &str) -> OperatorProcess {
        let http_port = free_port();
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        // DCAM_OPERATOR_BIN runs the scenarios against another build (e.g. the one before a fix).
        let bin = std::env::var("DCAM_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dcam-stream").to_string());
        let child = Command::new(bin)
            .arg("run")
            .envs(self.env.iter().cloned())
            .env("DCAM__TELEMETRY__HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            // DCAM_TEST_LOG_LEVEL (with DCAM__KAFKA__EXTRA__DEBUG=cgrp,eos,...) traces librdkafka when chasing a stall.
            .env("DCAM__TELEMETRY__LOG_LEVEL", std::env::var("DCAM_TEST_LOG_LEVEL").unwrap_or_else(|_| "info,rdkafka=warn".into()))
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawning dcam-stream run");
        OperatorProcess { child, http_port, log }
    }
}

impl OperatorProcess {
    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("operator exited early with {status}:\n{}", self.log_text());
            }
            if http_get(self.http_port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "operator not ready in {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "operator did not stop on SIGTERM:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics").map(|(_, body)| body).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Minimal HTTP/1.1 GET on localhost: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request("GET", port, path)
}

/// Minimal bodiless HTTP/1.1 request on localhost: (status, body).
pub fn http_request(method: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_send(method, port, path, &[], "")
}

/// Minimal HTTP/1.1 request with headers and a body on localhost: (status, body).
pub fn http_send(method: &str, port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(if method == "GET" { 5 } else { 150 }))).ok()?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// An S3-compatible HTTP server for one test: moto's `moto_server` child process (path-style
/// buckets, any credentials accepted).
pub struct S3Server {
    pub endpoint: String,
    pub port: u16,
    child: Child,
}

impl S3Server {
    pub fn start(log_dir: &Path) -> S3Server {
        let bin = repo_root().join(".venv/bin/moto_server");
        assert!(bin.exists(), "moto_server not found at {} (run scripts/setup-python.sh)", bin.display());
        let port = free_port();
        let log = std::fs::File::create(log_dir.join("s3.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning moto_server");
        let server = S3Server { endpoint: format!("http://127.0.0.1:{port}"), port, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(port, "/").is_none() {
            assert!(Instant::now() < deadline, "moto_server did not answer on {port}");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (code, body) = http_request("PUT", self.port, &format!("/{bucket}")).expect("S3 create bucket");
        assert_eq!(code, 200, "create bucket {bucket}: {body}");
    }

    /// A client for the same server, to read back what the operator wrote.
    pub fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Real test images from the shared datasets: (class, label, path), `per_class` of each class.
pub fn sample_images(per_class: usize) -> Vec<dcam_stream::internals::ImageFile> {
    let files = dcam_stream::internals::list_images(&[datasets()], dcam_stream::internals::Split::Test).expect("shared datasets present");
    dcam_stream::internals::sample_per_class(files, per_class)
}

/// Heavy tests (broker + operator processes) run one at a time on this 2-core machine.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes `(key, value, headers)` records in order and waits for every ack.
pub fn publish(producer: &FutureProducer, topic: &str, records: &[(Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>)]) -> Vec<(i32, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        for (key, value, headers) in records {
            let record =
                dcam_stream::internals::OutRecord { topic: topic.to_string(), key: key.clone(), payload: Some(value.clone()), headers: headers.clone() };
            let d = producer.send(record.to_future_record(), Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("publish");
            out.push((d.partition, d.offset));
        }
        out
    })
}

/// (key, value, headers) as `publish` sends it.
pub type RawRecord = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

/// `n` valid raw-image records (id and class headers) cycling over real test images of both
/// classes (the bottle PNGs are ~0.5 MB each).
pub fn image_records(n: usize, id_prefix: &str) -> (Vec<RawRecord>, Vec<String>) {
    records_cycling(sample_images(6), n, id_prefix)
}

/// `n` raw records with small real images (magnetic tile JPEGs, tens of kB). Use these for long
/// streams: noida-db ignores `fetch.max.bytes` and answers a fetch with the whole backlog, and a
/// response over librdkafka's `receive.message.max.bytes` (100 MB) stalls the consumer.
pub fn small_image_records(n: usize, id_prefix: &str) -> (Vec<RawRecord>, Vec<String>) {
    let files = sample_images(20).into_iter().filter(|f| f.class.as_deref() == Some("magnetic_tile")).collect();
    records_cycling(files, n, id_prefix)
}

fn records_cycling(files: Vec<dcam_stream::internals::ImageFile>, n: usize, id_prefix: &str) -> (Vec<RawRecord>, Vec<String>) {
    let blobs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(&f.path).unwrap()).collect();
    let mut records = Vec::new();
    let mut ids = Vec::new();
    for (i, (f, bytes)) in files.iter().zip(&blobs).cycle().take(n).enumerate() {
        let id = format!("{id_prefix}-{i:05}");
        let headers = vec![("dcam-image-id".to_string(), id.clone().into_bytes()), ("dcam-class".to_string(), f.class.clone().unwrap().into_bytes())];
        records.push((Some(id.clone().into_bytes()), bytes.clone(), headers));
        ids.push(id);
    }
    (records, ids)
}

/// One operator run's world: a broker, fresh input/scores/dead-letter topics, a group id and a
/// temp dir for logs and heatmaps. Destructure what a test needs:
/// `let Scenario { broker, input, scores, dlq, group, tmp } = Scenario::start(2);`
pub struct Scenario {
    pub broker: Broker,
    pub input: String,
    pub scores: String,
    pub dlq: String,
    pub group: String,
    pub tmp: tempfile::TempDir,
}

impl Scenario {
    /// `partitions` input partitions; one scores and one dead-letter partition.
    pub fn start(partitions: i32) -> Scenario {
        Self::start_with(partitions, &[], &[])
    }

    /// With several scores partitions (transactions then span partitions).
    pub fn start_with_score_partitions(partitions: i32, score_partitions: i32) -> Scenario {
        Self::create(partitions, score_partitions, &[], &[])
    }

    /// With topic-level configs (e.g. `max.message.bytes`) for the input and dead-letter topics.
    pub fn start_with(partitions: i32, input_config: &[(&str, &str)], dlq_config: &[(&str, &str)]) -> Scenario {
        Self::create(partitions, 1, input_config, dlq_config)
    }

    fn create(partitions: i32, score_partitions: i32, input_config: &[(&str, &str)], dlq_config: &[(&str, &str)]) -> Scenario {
        let broker = Broker::start();
        let (input, scores, dlq, group) = (unique("images"), unique("scores"), unique("dlq"), unique("group"));
        broker.create_topic_with(&input, partitions, input_config);
        broker.create_topic(&scores, score_partitions);
        broker.create_topic_with(&dlq, 1, dlq_config);
        Scenario { broker, input, scores, dlq, group, tmp: tempfile::tempdir().unwrap() }
    }

    /// The operator's settings for these topics, group and temp dir.
    pub fn operator(&self) -> OperatorConfig {
        OperatorConfig::new(&self.broker.brokers, &self.input, &self.scores, &self.dlq, &self.group, self.tmp.path())
    }
}
