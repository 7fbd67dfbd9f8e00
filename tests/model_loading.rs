//! Loading models at runtime, against a real broker process, real `dcam-stream run` replicas and a
//! real S3 server (docs/DESIGN.md §9): only allowed sources are read, every refusal looks the same
//! from outside, a check leaves nothing behind, new bytes under an old URI swap while the same
//! bytes do not, and a restarted replica scores with the announced model from its first record.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(120);
const TOKEN: &str = "line-7-token";

fn auth() -> [(&'static str, &'static str); 3] {
    [("Authorization", "Bearer line-7-token"), ("Content-Type", "application/json"), ("X-Dcam-User", "qe-alice")]
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `POST /api/model` with `uri`; a request that is not answered within 30 s (a reader stuck on a
/// FIFO, say) fails the test instead of hanging it.
fn post_model(port: u16, uri: &str) -> (u16, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    let body = serde_json::json!({ "uri": uri }).to_string();
    std::thread::spawn(move || {
        let _ = tx.send(http_send("POST", port, "/api/model", &auth(), &body));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(answer)) => answer,
        Ok(None) => panic!("POST /api/model {uri}: no HTTP answer"),
        Err(_) => panic!("POST /api/model {uri}: no answer within 30 s"),
    }
}

fn active_model(port: u16) -> serde_json::Value {
    json(&http_get(port, "/api/model").expect("GET /api/model").1)
}

/// A directory holding a copy of the committed model, to configure as `model.path`: its directory
/// is then the default allowed source.
fn model_dir(root: &Path) -> (PathBuf, PathBuf) {
    let dir = root.join("models");
    std::fs::create_dir_all(&dir).unwrap();
    let configured = dir.join("dcam.onnx");
    std::fs::copy(model_path(), &configured).unwrap();
    (dir, configured)
}

fn operator(s: &Scenario, configured: &Path) -> OperatorConfig {
    s.operator().set("DCAM__TELEMETRY__API_TOKEN", TOKEN).set("DCAM__HEATMAP__POLICY", "none").set("DCAM__MODEL__PATH", configured.display().to_string())
}

/// Row 1: any path on the host, `..`, `file://`, symlinks out, FIFOs, missing and broken files
/// all get the same answer, so a caller cannot learn which host files exist; a FIFO blocks nothing.
#[test]
fn models_outside_the_allowed_sources_are_refused_with_one_answer() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (allowed, configured) = model_dir(s.tmp.path());
    let elsewhere = s.tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let outside = recalibrated_model(&elsewhere, "outside");
    std::os::unix::fs::symlink(&outside, allowed.join("link.onnx")).unwrap();
    std::fs::write(allowed.join("broken.onnx"), b"this is not an ONNX model").unwrap();
    let fifo = allowed.join("fifo.onnx");
    let c_path = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0, "mkfifo");

    let mut op = operator(&s, &configured).spawn("op");
    op.wait_ready(READY);
    let configured_version = active_model(op.http_port)["active"]["version"].as_str().unwrap().to_string();

    let refused = [
        "/etc/passwd".to_string(),
        "/etc/no-such-file".to_string(),
        "file:///etc/passwd".to_string(),
        outside.display().to_string(),
        format!("{}/../elsewhere/{}", allowed.display(), outside.file_name().unwrap().to_string_lossy()),
        allowed.join("link.onnx").display().to_string(),
        allowed.join("broken.onnx").display().to_string(),
        allowed.join("missing.onnx").display().to_string(),
        format!("file://{}", allowed.join("missing.onnx").display()),
        "s3://any-bucket/model.onnx".to_string(),
        fifo.display().to_string(),
    ];
    let answers: Vec<(String, u16, String)> = refused
        .iter()
        .map(|uri| {
            let (code, body) = post_model(op.http_port, uri);
            (uri.clone(), code, body)
        })
        .collect();
    let first = &answers[0].2;
    for (uri, code, body) in &answers {
        assert_eq!(*code, 422, "{uri}: {body}");
        assert_eq!(body, first, "{uri} is refused with another answer than {}", answers[0].0);
    }
    assert_eq!(active_model(op.http_port)["active"]["version"], configured_version.as_str(), "nothing was swapped in");

    // The operator's own log says why.
    let log = op.log_text();
    assert!(log.contains("outside model.allowed_sources"), "{log}");
    assert!(log.contains("not a regular file"), "{log}");

    // An allowed model still goes through.
    let v2 = recalibrated_model(&allowed, "9.9.9-allowed");
    let (code, body) = post_model(op.http_port, &v2.display().to_string());
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "9.9.9-allowed");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

/// Row 6: checks and loads from S3 leave no file behind, an object or file over `model.max_bytes`
/// is refused before it is read, and S3 objects outside the allowed prefixes are never fetched.
#[test]
fn model_checks_leave_no_files_and_stay_under_max_bytes() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (allowed, configured) = model_dir(s.tmp.path());
    let s3 = S3Server::start(s.tmp.path());
    s3.create_bucket("models");
    let v2 = recalibrated_model(s.tmp.path(), "9.9.9-s3");
    let put = |key: &str, file: &Path| {
        use object_store::ObjectStore;
        let bytes = std::fs::read(file).unwrap();
        let client = s3.client("models");
        tokio::runtime::Runtime::new().unwrap().block_on(client.put(&object_store::path::Path::from(key), bytes.into())).unwrap();
    };
    put("approved/v2.onnx", &v2);
    put("other/v2.onnx", &v2);
    // Bigger than model.max_bytes below: a copy of the model with 2 MiB of padding.
    let big = s.tmp.path().join("big.onnx");
    let mut padded = std::fs::read(&v2).unwrap();
    padded.extend(std::iter::repeat_n(0u8, 2 << 20));
    std::fs::write(&big, &padded).unwrap();
    put("approved/big.onnx", &big);
    std::fs::copy(&big, allowed.join("big.onnx")).unwrap();
    let tmpdir = s.tmp.path().join("operator-tmp");
    std::fs::create_dir_all(&tmpdir).unwrap();
    let max_bytes = std::fs::metadata(&v2).unwrap().len() + (1 << 20);

    let mut op = operator(&s, &configured)
        .set("TMPDIR", tmpdir.display().to_string())
        .set("DCAM__S3__ENDPOINT", s3.endpoint.as_str())
        .set("DCAM__S3__ALLOW_HTTP", "true")
        .set("DCAM__S3__ACCESS_KEY_ID", "test")
        .set("DCAM__S3__SECRET_ACCESS_KEY", "test")
        .set("DCAM__MODEL__ALLOWED_SOURCES", format!("{},s3://models/approved", allowed.display()))
        .set("DCAM__MODEL__MAX_BYTES", max_bytes.to_string())
        .spawn("op");
    op.wait_ready(READY);

    for _ in 0..3 {
        let (code, body) = post_model(op.http_port, "s3://models/approved/v2.onnx");
        assert_eq!(code, 200, "{body}");
        assert_eq!(json(&body)["active"]["version"], "9.9.9-s3");
    }
    // ONNX Runtime itself writes one `.ses` file (a session id, 51 bytes) per process.
    let left: Vec<_> = walkdir::WalkDir::new(&tmpdir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name() != ".ses")
        .map(|e| e.path().to_path_buf())
        .collect();
    assert!(left.is_empty(), "model checks left files behind: {left:?}");

    let refused = [
        "s3://models/approved/big.onnx".to_string(),
        "s3://models/other/v2.onnx".to_string(),
        "s3://elsewhere/v2.onnx".to_string(),
        "s3://models/approved/../other/v2.onnx".to_string(),
        allowed.join("big.onnx").display().to_string(),
    ];
    let answers: Vec<(&String, u16, String)> = refused
        .iter()
        .map(|uri| {
            let (code, body) = post_model(op.http_port, uri);
            (uri, code, body)
        })
        .collect();
    for (uri, code, body) in &answers {
        assert_eq!(*code, 422, "{uri}: {body}");
        assert_eq!(body, &answers[0].2, "{uri}");
    }
    let log = op.log_text();
    assert!(log.contains("over model.max_bytes"), "{log}");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

fn reloads(metrics: &str, kind: &str) -> u64 {
    let prefix = format!("dcam_model_reloads_total{{kind=\"{kind}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Row 7: `latest.onnx` overwritten with a new model and announced again swaps; announcing the
/// same bytes again swaps nothing.
#[test]
fn the_same_uri_with_new_bytes_swaps_and_the_same_bytes_do_not() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (allowed, configured) = model_dir(s.tmp.path());
    let latest = allowed.join("latest.onnx");
    let mut op = operator(&s, &configured).spawn("op");
    op.wait_ready(READY);

    std::fs::rename(recalibrated_model(s.tmp.path(), "2.0.0"), &latest).unwrap();
    let (code, body) = post_model(op.http_port, &latest.display().to_string());
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "2.0.0");

    std::fs::rename(recalibrated_model(s.tmp.path(), "3.0.0"), &latest).unwrap();
    let (code, body) = post_model(op.http_port, &latest.display().to_string());
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "3.0.0", "new bytes under the same URI swap");
    let model = active_model(op.http_port);
    assert_eq!((model["active"]["version"].as_str(), model["previous"]["version"].as_str()), (Some("3.0.0"), Some("2.0.0")), "{model}");
    let metrics = op.metrics();
    assert!(metrics.contains(r#"version="3.0.0"} 1"#), "{metrics}");
    let swapped = reloads(&metrics, "swapped");

    let (code, body) = post_model(op.http_port, &latest.display().to_string());
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "3.0.0");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(reloads(&op.metrics(), "swapped"), swapped, "the same bytes are not loaded again");
    assert_eq!(active_model(op.http_port)["previous"]["version"], "2.0.0", "the rollback target stays");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

/// Row 8: a replica restarted after a model was announced scores with that model from its first
/// record, even when loading it takes a while; without the announced file it falls back to the
/// configured model and says so.
#[test]
fn a_restarted_replica_scores_with_the_announced_model_from_the_first_record() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (allowed, configured) = model_dir(s.tmp.path());
    let v2 = recalibrated_model(&allowed, "9.9.9-announced");
    let cfg = operator(&s, &configured);
    let mut a = cfg.spawn("a");
    a.wait_ready(READY);
    let configured_version = active_model(a.http_port)["active"]["version"].as_str().unwrap().to_string();
    let (code, body) = post_model(a.http_port, &v2.display().to_string());
    assert_eq!(code, 200, "{body}");
    assert!(a.terminate(Duration::from_secs(60)).success());

    let (records, ids) = small_image_records(24, "restart");
    publish(&s.broker.producer(), &s.input, &records);
    // Warm-up batches make loading the announced model slow, so scoring would start first.
    let mut b = cfg.clone().set("DCAM__ENGINE__WARMUP_BATCHES", "12").spawn("b");
    b.wait_ready(READY);
    let out = read_topic(&s.broker.brokers, &s.scores, ids.len(), Duration::from_secs(300));
    let versions: Vec<String> = out.iter().map(|r| r.json()["model"]["version"].as_str().unwrap().to_string()).collect();
    assert!(versions.iter().all(|v| v == "9.9.9-announced"), "every record is scored by the announced model: {versions:?}");
    assert!(b.terminate(Duration::from_secs(60)).success());

    // The announced model is gone: the configured one serves, with a warning.
    std::fs::remove_file(&v2).unwrap();
    let mut c = cfg.spawn("c");
    c.wait_ready(READY);
    assert_eq!(active_model(c.http_port)["active"]["version"], configured_version.as_str());
    let log = c.log_text();
    assert!(log.contains("WARN") && log.contains("announced model"), "{log}");
    assert!(c.terminate(Duration::from_secs(60)).success());
}
