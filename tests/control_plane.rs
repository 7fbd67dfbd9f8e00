//! Operating it live, against a real broker process and real `dcam-stream run` replicas:
//! thresholds changed at runtime reach every replica and survive restarts; a model swapped in
//! mid-stream scores every input (exactly once in exactly-once mode) and labels each score with
//! the model that produced it; a broken model is refused while scoring goes on; writes need the
//! bearer token, whose name is the change's `by`; records produced straight to the control topic
//! apply only when signed and valid; every change made through the API is on the audit topic.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const READY: Duration = Duration::from_secs(120);
const TOKEN: &str = "line-7-token";

/// The single API token: the writer `operator` (`X-Dcam-User` names nobody).
fn auth() -> [(&'static str, &'static str); 3] {
    [("Authorization", "Bearer line-7-token"), ("Content-Type", "application/json"), ("X-Dcam-User", "qe-alice")]
}

const SIGNING_KEY: &str = "line-7-control-signing-key-0123456789";

/// The `dcam-signature` header of a control record, computed here from the documented format
/// (docs/DESIGN.md §9: HMAC-SHA256 over the key's length as 4 big-endian bytes, the key, the value).
fn signature(secret: &str, key: &str, value: &str) -> (String, Vec<u8>) {
    let mut message = (key.len() as u32).to_be_bytes().to_vec();
    message.extend_from_slice(key.as_bytes());
    message.extend_from_slice(value.as_bytes());
    let mac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()), &message);
    ("dcam-signature".to_string(), mac.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes())
}

/// A control record as someone with produce rights on the topic would write it.
fn control_record(key: &str, value: &str, signed_with: Option<&str>) -> RawRecord {
    (Some(key.as_bytes().to_vec()), value.as_bytes().to_vec(), signed_with.map(|secret| signature(secret, key, value)).into_iter().collect())
}

fn threshold_json(version: &str, class: &str, threshold: &str) -> String {
    format!(
        r#"{{"kind":"threshold","class":"{class}","model_version":"{version}","threshold":{threshold},"previous":null,"by":"someone","at":"2026-01-01T00:00:00.000Z"}}"#
    )
}

/// Waits until `class`'s threshold in force on the replica is `value`.
fn wait_threshold(port: u16, class: &str, value: f64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = thresholds(port);
        if t[class]["threshold"].as_f64() == Some(value) {
            return t;
        }
        assert!(Instant::now() < deadline, "{class} never reached {value}: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn thresholds(port: u16) -> serde_json::Value {
    let (code, body) = http_get(port, "/api/thresholds").expect("GET /api/thresholds");
    assert_eq!(code, 200, "{body}");
    json(&body)
}

#[test]
fn a_threshold_change_reaches_every_replica_and_survives_a_restart() {
    let _serial = serial();
    let s = Scenario::start(2);
    let (broker, input, scores, group) = (&s.broker, &s.input, &s.scores, &s.group);
    let cfg = s.operator().set("DCAM__TELEMETRY__API_TOKEN", TOKEN).set("DCAM__HEATMAP__POLICY", "none");
    let mut a = cfg.spawn("a");
    let mut b = cfg.spawn("b");
    a.wait_ready(READY);
    b.wait_ready(READY);

    let before = thresholds(a.http_port);
    let model_threshold = before["bottle"]["threshold"].as_f64().unwrap();
    assert_eq!(before["bottle"]["source"], "model", "{before}");

    // Writes need the token.
    let body = r#"{"threshold": 1000000.0}"#;
    assert_eq!(http_send("PUT", a.http_port, "/api/thresholds/bottle", &[("Content-Type", "application/json")], body).unwrap().0, 401);
    assert_eq!(
        http_send("PUT", a.http_port, "/api/thresholds/bottle", &[("Authorization", "Bearer wrong"), ("Content-Type", "application/json")], body).unwrap().0,
        401
    );
    assert_eq!(http_send("PUT", a.http_port, "/api/thresholds/no-such-class", &auth(), body).unwrap().0, 404);

    // Through replica a; replica b applies it from the control topic.
    let (code, answer) = http_send("PUT", a.http_port, "/api/thresholds/bottle", &auth(), body).unwrap();
    assert_eq!(code, 200, "{answer}");
    let changed_at = Instant::now();
    let on_b = loop {
        let t = thresholds(b.http_port);
        if t["bottle"]["source"] == "runtime" {
            break t;
        }
        assert!(changed_at.elapsed() < Duration::from_secs(10), "replica b never applied the change: {t}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let lag = changed_at.elapsed();
    eprintln!("threshold change visible on the other replica after {lag:?}");
    assert_eq!(on_b["bottle"]["threshold"], 1000000.0);
    // Dashboards and alerts see the threshold in force and the readiness as metrics.
    let metrics = b.metrics();
    let in_force = metrics.lines().find_map(|l| l.strip_prefix(r#"dcam_threshold{class="bottle",source="runtime"} "#)).and_then(|v| v.parse::<f64>().ok());
    assert_eq!(in_force, Some(1000000.0), "{metrics}");
    assert!(metrics.contains(r#"dcam_threshold{class="magnetic_tile",source="model"}"#), "{metrics}");
    assert!(!metrics.contains(r#"dcam_threshold{class="bottle",source="model"}"#), "one series per class: {metrics}");
    assert!(metrics.contains("dcam_ready 1"), "{metrics}");
    assert_eq!(thresholds(a.http_port)["bottle"]["threshold"], 1000000.0, "read-your-writes on the replica that took the request");

    // Scores say which threshold judged them (both replicas score: two partitions).
    let (records, ids) = image_records(8, "thr");
    publish(&broker.producer(), &input, &records);
    let out = read_topic(&broker.brokers, &scores, ids.len(), Duration::from_secs(300));
    assert_eq!(out.len(), ids.len());
    for r in out.iter().map(Record::json) {
        if r["class"] == "bottle" {
            assert_eq!((r["threshold"].as_f64(), r["threshold_source"].as_str()), (Some(1000000.0), Some("runtime")), "{r}");
            assert_eq!(r["is_anomaly"], false, "no image reaches a raw score of a million: {r}");
        } else {
            assert_eq!(r["threshold_source"], "model", "{r}");
        }
    }

    // A restarted replica comes back with it, before it scores anything.
    assert!(b.terminate(Duration::from_secs(60)).success());
    let mut b2 = cfg.spawn("b2");
    b2.wait_ready(READY);
    assert_eq!(thresholds(b2.http_port)["bottle"]["threshold"], 1000000.0);

    // The audit trail: who (the token's writer), when, old and new, on the audit topic.
    let audit_records = read_topic(&broker.brokers, &format!("{group}.control.audit"), 1, Duration::from_secs(30));
    let audit = audit_records.last().expect("an audit record").json();
    assert_eq!((audit["kind"].as_str(), audit["class"].as_str(), audit["by"].as_str()), (Some("threshold"), Some("bottle"), Some("operator")), "{audit}");
    assert_eq!(audit["threshold"], 1000000.0);
    assert!((audit["previous"].as_f64().unwrap() - model_threshold).abs() < 1e-4, "{audit}");
    assert!(audit["at"].as_str().is_some_and(|t| t.starts_with("20")), "{audit}");

    // Reset goes back to the model's calibration everywhere.
    let (code, _) = http_send("PUT", b2.http_port, "/api/thresholds/bottle", &auth(), r#"{"threshold": null}"#).unwrap();
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while thresholds(a.http_port)["bottle"]["source"] != "model" {
        assert!(Instant::now() < deadline, "reset not applied on a");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(a.terminate(Duration::from_secs(60)).success());
    assert!(b2.terminate(Duration::from_secs(60)).success());
}

#[test]
fn control_records_apply_only_when_signed_and_valid_and_the_api_names_and_audits_its_writers() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (broker, group) = (&s.broker, &s.group);
    let key_file = s.tmp.path().join("signing-key");
    std::fs::write(&key_file, format!("{SIGNING_KEY}\n")).unwrap();
    let tokens_file = s.tmp.path().join("tokens");
    std::fs::write(&tokens_file, "# writers of line 7\nalice:tok-alice-7\n").unwrap();
    let mut op = s
        .operator()
        .set("DCAM__TELEMETRY__API_TOKEN", TOKEN)
        .set("DCAM__TELEMETRY__TOKENS_FILE", tokens_file.display().to_string())
        .set("DCAM__CONTROL__SIGNING_KEY_FILE", key_file.display().to_string())
        .set("DCAM__HEATMAP__POLICY", "none")
        .spawn("op");
    op.wait_ready(READY);
    let version = json(&http_get(op.http_port, "/api/model").unwrap().1)["active"]["version"].as_str().unwrap().to_string();

    // Straight to the control topic, past the API: one signed valid record, then records that
    // must not apply, then a signed valid one for another class that says all were read.
    let control = format!("{group}.control");
    let bottle = format!("threshold/{version}/bottle");
    let records = [
        control_record(&bottle, &threshold_json(&version, "bottle", "4242.0"), Some(SIGNING_KEY)),
        control_record(&bottle, &threshold_json(&version, "bottle", "1.0"), None),
        control_record(&bottle, &threshold_json(&version, "bottle", "2.0"), None),
        control_record(&bottle, &threshold_json(&version, "bottle", "3.0"), Some("a-key-that-is-not-the-operators-key")),
        control_record(&bottle, &threshold_json(&version, "bottle", "1e39"), Some(SIGNING_KEY)),
        control_record(&bottle, &threshold_json(&version, "bottle", "NaN"), Some(SIGNING_KEY)),
        control_record(&format!("threshold/{version}/no-such-class"), &threshold_json(&version, "no-such-class", "5.0"), Some(SIGNING_KEY)),
        control_record(&format!("threshold/{version}/magnetic_tile"), &threshold_json(&version, "bottle", "6.0"), Some(SIGNING_KEY)),
        control_record(&format!("threshold/{version}/magnetic_tile"), &threshold_json(&version, "magnetic_tile", "99.0"), Some(SIGNING_KEY)),
    ];
    publish(&broker.producer(), &control, &records);
    wait_threshold(op.http_port, "magnetic_tile", 99.0);
    let in_force = thresholds(op.http_port);
    assert_eq!((in_force["bottle"]["threshold"].as_f64(), in_force["bottle"]["source"].as_str()), (Some(4242.0), Some("runtime")), "{in_force}");
    let metrics = op.metrics();
    for (reason, n) in [("unsigned", 2.0), ("bad_signature", 1.0), ("invalid_value", 1.0), ("unreadable", 1.0), ("unknown_class", 1.0), ("key_mismatch", 1.0)] {
        assert_eq!(metric(&metrics, &format!(r#"dcam_control_records_ignored_total{{reason="{reason}"}}"#)), Some(n), "{reason}: {metrics}");
    }
    let warnings = op.log_text().matches("ignoring a control record").count();
    assert_eq!(warnings, 6, "one warning per reason, not per record:\n{}", op.log_text());

    // Through the API: `by` is the token's writer, whatever X-Dcam-User says.
    let alice = [("Authorization", "Bearer tok-alice-7"), ("Content-Type", "application/json"), ("X-Dcam-User", "mallory")];
    let (code, answer) = http_send("PUT", op.http_port, "/api/thresholds/bottle", &alice, r#"{"threshold": 5.5}"#).unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(json(&answer)["by"], "alice", "{answer}");
    let (code, answer) = http_send("PUT", op.http_port, "/api/thresholds/bottle", &auth(), r#"{"threshold": null}"#).unwrap();
    assert_eq!(code, 200, "{answer}");
    assert_eq!(json(&answer)["by"], "operator", "{answer}");
    assert_eq!(thresholds(op.http_port)["bottle"]["source"], "model", "the signed API record applied");
    let (code, answer) = http_send("PUT", op.http_port, "/api/thresholds/bottle", &alice, r#"{"threshold": 1e39}"#).unwrap();
    assert_eq!(code, 400, "the API refuses what the replicas refuse: {answer}");

    // The audit topic holds each change made through the API, signed, and nothing else.
    let audit = read_topic(&broker.brokers, &format!("{group}.control.audit"), 3, Duration::from_secs(15));
    let changes: Vec<(String, serde_json::Value)> =
        audit.iter().map(|r| (r.json()["by"].as_str().unwrap().to_string(), r.json()["threshold"].clone())).collect();
    assert_eq!(changes, [("alice".to_string(), serde_json::json!(5.5)), ("operator".to_string(), serde_json::Value::Null)], "{changes:?}");
    for r in &audit {
        let (key, value) = (String::from_utf8(r.key.clone().unwrap()).unwrap(), String::from_utf8(r.value.clone().unwrap()).unwrap());
        assert_eq!(r.headers.get("dcam-signature").map(String::as_bytes), Some(signature(SIGNING_KEY, &key, &value).1.as_slice()), "{key}");
    }
    assert!(op.terminate(Duration::from_secs(60)).success());
}

/// A copy of the committed model with another version and one more class (`screw`, calibrated
/// like `_default`).
fn model_with_new_class(dir: &Path, version: &str) -> PathBuf {
    let out = dir.join(format!("dcam-{version}.onnx"));
    edited_model(
        &out,
        &format!(
            r#"props["dcam.version"].value = "{version}"
classes = json.loads(props["dcam.classes"].value)
props["dcam.classes"].value = json.dumps(classes + ["screw"])
cal = json.loads(props["dcam.calibration"].value)
cal["screw"] = cal["_default"]
props["dcam.calibration"].value = json.dumps(cal)"#
        ),
    );
    out
}

#[test]
fn a_swapped_in_model_brings_its_classes_to_metrics_and_its_waiting_thresholds() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (broker, input, scores, group) = (&s.broker, &s.input, &s.scores, &s.group);
    let v2 = model_with_new_class(s.tmp.path(), "9.9.9-screw");
    let mut op = s
        .operator()
        .set("DCAM__TELEMETRY__API_TOKEN", TOKEN)
        .set("DCAM__CONTROL__SIGNING_KEY", SIGNING_KEY)
        .set("DCAM__HEATMAP__POLICY", "none")
        .set("DCAM__MODEL__ALLOWED_SOURCES", s.tmp.path().display().to_string())
        .spawn("op");
    op.wait_ready(READY);

    // Thresholds for the model to come, signed, before it is announced: they wait for it.
    let control = format!("{group}.control");
    let records = [
        control_record("threshold/9.9.9-screw/screw", &threshold_json("9.9.9-screw", "screw", "5555.0"), Some(SIGNING_KEY)),
        control_record("threshold/9.9.9-screw/nope", &threshold_json("9.9.9-screw", "nope", "1.0"), Some(SIGNING_KEY)),
    ];
    publish(&broker.producer(), &control, &records);
    let (code, body) = http_send("POST", op.http_port, "/api/model", &auth(), &format!(r#"{{"uri": "{}"}}"#, v2.display())).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "9.9.9-screw");
    let in_force = thresholds(op.http_port);
    assert_eq!((in_force["screw"]["threshold"].as_f64(), in_force["screw"]["source"].as_str()), (Some(5555.0), Some("runtime")), "{in_force}");

    // Inputs of the new class are counted under its own label.
    let (mut records, ids) = image_records(2, "screw");
    for (_, _, headers) in &mut records {
        headers.retain(|(k, _)| k != "dcam-class");
        headers.push(("dcam-class".to_string(), b"screw".to_vec()));
    }
    publish(&broker.producer(), input, &records);
    let out = read_topic(&broker.brokers, scores, ids.len(), Duration::from_secs(120));
    assert_eq!(out.len(), ids.len());
    for r in out.iter().map(Record::json) {
        assert_eq!((r["class"].as_str(), r["threshold_source"].as_str(), r["is_anomaly"].as_bool()), (Some("screw"), Some("runtime"), Some(false)), "{r}");
    }
    let metrics = op.metrics();
    assert_eq!(metric(&metrics, r#"dcam_images_total{outcome="normal",class="screw"}"#), Some(2.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"dcam_control_records_ignored_total{reason="unknown_class"}"#), Some(1.0), "the one for a class the model lacks");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn writes_are_off_without_a_token() {
    let _serial = serial();
    let s = Scenario::start(1);
    let mut op = s.operator().set("DCAM__HEATMAP__POLICY", "none").spawn("op");
    op.wait_ready(READY);
    let (code, body) = http_send("PUT", op.http_port, "/api/thresholds/bottle", &auth(), r#"{"threshold": 1.0}"#).unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("api_token"), "the refusal says how to turn writes on: {body}");
    assert_eq!(http_send("POST", op.http_port, "/api/model", &auth(), r#"{"uri": "models/dcam.onnx"}"#).unwrap().0, 403);
    assert_eq!(http_get(op.http_port, "/api/thresholds").unwrap().0, 200, "reads stay open");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

/// 2000 events streaming; the model is swapped through the API when about a quarter is scored,
/// and a broken model is offered too. Every input has one score (exactly once) or at least one
/// (at least once); per partition, the scores go old version → new version, never back.
fn swap_under_load(mode: &str) {
    let _serial = serial();
    let n: usize = std::env::var("DCAM_TEST_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let s = Scenario::start(2);
    let (broker, input, scores) = (&s.broker, &s.input, &s.scores);
    let v2 = recalibrated_model(s.tmp.path(), "9.9.9-recal");
    let broken = s.tmp.path().join("broken.onnx");
    std::fs::write(&broken, b"this is not an ONNX model").unwrap();
    let fixed = fixed_batch_model(s.tmp.path(), 4);
    let mut op = s
        .operator()
        .set("DCAM__TELEMETRY__API_TOKEN", TOKEN)
        .set("DCAM__DELIVERY__MODE", mode)
        .set("DCAM__DELIVERY__INSTANCE_ID", unique("pod"))
        .set("DCAM__HEATMAP__POLICY", "none")
        .set("DCAM__PIPELINE__MAX_IN_FLIGHT", "64")
        .set("DCAM__BATCH__MAX_BATCH", "16")
        .set("DCAM__MODEL__ALLOWED_SOURCES", s.tmp.path().display().to_string())
        .spawn(mode);
    op.wait_ready(READY);
    let old_version = json(&http_get(op.http_port, "/api/model").unwrap().1)["active"]["version"].as_str().unwrap().to_string();

    let (records, ids) = small_image_records(n, mode);
    let producer = broker.producer();
    let publisher = {
        let input = input.clone();
        std::thread::spawn(move || publish(&producer, &input, &records))
    };
    read_topic(&broker.brokers, &scores, n / 4, Duration::from_secs(600));

    let (code, body) = http_send("POST", op.http_port, "/api/model", &auth(), &format!(r#"{{"uri": "{}"}}"#, broken.display())).unwrap();
    assert_eq!(code, 422, "a broken model is refused: {body}");
    let (code, body) = http_send("POST", op.http_port, "/api/model", &auth(), &format!(r#"{{"uri": "{}"}}"#, fixed.display())).unwrap();
    assert_eq!(code, 422, "a model fixed to batches of 4 is refused: {body}");
    assert!(op.log_text().contains("fixed batch dimension of 4"), "the operator's log says why");
    let (code, body) = http_send("POST", op.http_port, "/api/model", &auth(), &format!(r#"{{"uri": "{}"}}"#, v2.display())).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], "9.9.9-recal");
    publisher.join().unwrap();

    let out = read_topic_until(&broker.brokers, &scores, Duration::from_secs(900), |got| {
        let distinct: std::collections::HashSet<_> = got.iter().map(|r| r.key.clone()).collect();
        distinct.len() >= n
    });
    let mut per_id: HashMap<String, usize> = HashMap::new();
    let mut versions: BTreeMap<(i64, i64), String> = BTreeMap::new(); // (input partition, offset) -> version
    for r in out.iter().map(Record::json) {
        *per_id.entry(r["image_id"].as_str().unwrap().to_string()).or_default() += 1;
        versions
            .insert((r["source"]["partition"].as_i64().unwrap(), r["source"]["offset"].as_i64().unwrap()), r["model"]["version"].as_str().unwrap().to_string());
    }
    let lost = ids.iter().filter(|id| !per_id.contains_key(*id)).count();
    let duplicates: usize = per_id.values().map(|c| c - 1).sum();
    eprintln!("{mode}: {n} events, model swapped mid-stream: lost {lost}, duplicates {duplicates}");
    assert_eq!(lost, 0, "every input is scored");
    if mode == "exactly_once" {
        assert_eq!(duplicates, 0, "exactly once across the swap");
    }
    let mut seen_new = BTreeMap::new();
    for ((partition, offset), version) in &versions {
        let is_new = version == "9.9.9-recal";
        assert!(is_new || version == &old_version, "unexpected version {version}");
        if let Some(&(true, at)) = seen_new.get(partition) {
            assert!(is_new, "partition {partition}: offset {offset} scored by the old model after offset {at} was scored by the new one");
        }
        if is_new {
            seen_new.entry(*partition).or_insert((true, *offset));
        }
    }
    let counts = versions.values().fold(BTreeMap::<&str, usize>::new(), |mut m, v| {
        *m.entry(v.as_str()).or_default() += 1;
        m
    });
    eprintln!("{mode}: scores per model version {counts:?}");
    assert!(counts.len() == 2, "both models scored part of the stream: {counts:?}");

    let metrics = op.metrics();
    assert!(metrics.contains(r#"dcam_model_info{name="#) && metrics.contains(r#"version="9.9.9-recal"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"dcam_model_reloads_total{kind="rejected"}"#), "the broken model is counted");
    let ready = json(&http_get(op.http_port, "/readyz").unwrap().1);
    assert_eq!(ready["model"]["version"], "9.9.9-recal", "{ready}");

    // Rollback goes back to the previous model.
    let (code, body) = http_send("POST", op.http_port, "/api/model/rollback", &auth(), "").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["active"]["version"], old_version.as_str());
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn a_model_swap_under_load_scores_every_input_exactly_once() {
    swap_under_load("exactly_once");
}

#[test]
fn a_model_swap_under_load_scores_every_input_at_least_once() {
    swap_under_load("at_least_once");
}
