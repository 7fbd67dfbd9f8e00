//! Operating it live, against a real broker process and real `dcam-stream run` replicas:
//! thresholds changed at runtime reach every replica and survive restarts; a model swapped in
//! mid-stream scores every input (exactly once in exactly-once mode) and labels each score with
//! the model that produced it; a broken model is refused while scoring goes on; writes need the
//! bearer token.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;

const READY: Duration = Duration::from_secs(120);
const TOKEN: &str = "line-7-token";

fn auth() -> [(&'static str, &'static str); 3] {
    [("Authorization", "Bearer line-7-token"), ("Content-Type", "application/json"), ("X-Dcam-User", "qe-alice")]
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

    // The audit trail: who, when, old and new, on the compacted control topic.
    let control = read_topic(&broker.brokers, &format!("{group}.control"), 1, Duration::from_secs(30));
    let audit = control.last().expect("a control record").json();
    assert_eq!((audit["kind"].as_str(), audit["class"].as_str(), audit["by"].as_str()), (Some("threshold"), Some("bottle"), Some("qe-alice")), "{audit}");
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
