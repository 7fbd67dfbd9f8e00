//! End-to-end tests of `dcam-stream run` against a real Kafka-protocol broker process, with the
//! committed trained model and real images. Every assertion is on records read back from topics.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use base64::Engine as _;
use common::*;

const READY: Duration = Duration::from_secs(120);
const READ: Duration = Duration::from_secs(300);

#[test]
fn scores_every_image_with_the_documented_schema_and_heatmaps() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, tmp, .. } = Scenario::start(3);
    let heat = tmp.path().join("heatmaps");

    // Both wire forms, two classes.
    let files = sample_images(5);
    let classes: HashSet<_> = files.iter().filter_map(|f| f.class.clone()).collect();
    assert!(classes.len() >= 2, "need several classes, got {classes:?}");
    let mut records = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let bytes = std::fs::read(&f.path).unwrap();
        let r = dcam_stream::internals::event_record(&input, f, bytes, i % 2 == 0);
        records.push((r.key, r.payload.unwrap(), r.headers));
    }
    let positions = publish(&broker.producer(), &input, &records);
    let expected: HashMap<String, (i32, i64, Option<String>)> =
        files.iter().zip(&positions).map(|(f, (p, o))| (f.image_id.clone(), (*p, *o, f.class.clone()))).collect();

    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path())
        .set("DCAM__HEATMAP__POLICY", "all")
        .set("DCAM__HEATMAP__STORE", format!("file://{}", heat.display()))
        .spawn("op");
    op.wait_ready(READY);
    let (code, body) = http_get(op.http_port, "/readyz").unwrap();
    assert_eq!(code, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["provider"], "cpu", "{body}");

    let got = read_topic(&broker.brokers, &scores, files.len() + 1, Duration::from_secs(60));
    assert_eq!(got.len(), files.len(), "exactly one score per input\n{}", op.log_text());
    let mut seen = HashSet::new();
    for r in &got {
        let v = r.json();
        let id = v["image_id"].as_str().unwrap().to_string();
        assert!(seen.insert(id.clone()), "duplicate score for {id}");
        let (partition, offset, class) = expected.get(&id).unwrap_or_else(|| panic!("unexpected id {id}"));
        assert_eq!(r.key.as_deref(), Some(id.as_bytes()), "key is the image id");
        assert_eq!(v["class"].as_str().map(str::to_string), *class);
        assert_eq!(v["source"]["topic"], input.as_str());
        assert_eq!(v["source"]["partition"], *partition);
        assert_eq!(v["source"]["offset"], *offset);
        assert!(v["source"]["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
        let score = v["score"].as_f64().unwrap();
        let raw = v["raw_score"].as_f64().unwrap();
        let threshold = v["threshold"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        assert_eq!(v["is_anomaly"].as_bool().unwrap(), raw >= threshold);
        assert_eq!(v["is_anomaly"].as_bool().unwrap(), score >= 0.5);
        assert!(v["model"]["name"].as_str().unwrap().len() > 0 && v["model"]["version"].as_str().unwrap().len() > 0);
        chrono::DateTime::parse_from_rfc3339(v["scored_at"].as_str().unwrap()).unwrap();
        for k in ["queue", "inference", "total"] {
            assert!(v["latency_ms"][k].as_f64().unwrap() >= 0.0, "latency_ms.{k}");
        }
        assert!(v.get("attributes").is_some());
        // Heatmap at the deterministic key, a real PNG of the model's size.
        let uri = v["heatmap_uri"].as_str().expect("policy all: every score has a heatmap");
        let suffix = format!("/{}/{input}/{partition}/{offset}.png", v["model"]["version"].as_str().unwrap());
        assert!(uri.starts_with("file://") && uri.ends_with(&suffix), "{uri} should end with {suffix}");
        let png = image::open(uri.trim_start_matches("file://")).expect("heatmap is a PNG");
        assert_eq!(png.width(), png.height());
        assert_eq!(r.headers.get("dcam-source").unwrap(), &format!("{input}/{partition}/{offset}"));
    }
    assert_eq!(seen.len(), files.len());
    assert!(read_topic(&broker.brokers, &dlq, 1, Duration::from_secs(2)).is_empty(), "no dead letters for valid input");
    let metrics = op.metrics();
    assert!(metrics.contains("dcam_images_total{"), "{metrics}");
    assert!(metrics.contains("dcam_batch_size_bucket"), "{metrics}");
    assert!(metrics.contains("dcam_execution_provider{provider=\"cpu\"} 1"), "{metrics}");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn heatmap_policy_anomalies_writes_only_anomalies() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, tmp, .. } = Scenario::start(1);
    let heat = tmp.path().join("heat");
    let (records, ids) = image_records(12, "pol");
    publish(&broker.producer(), &input, &records);
    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path())
        .set("DCAM__HEATMAP__STORE", format!("file://{}", heat.display()))
        .spawn("op");
    op.wait_ready(READY);
    let got = read_topic(&broker.brokers, &scores, ids.len(), READ);
    assert_eq!(got.len(), ids.len());
    let anomalies: Vec<_> = got.iter().map(|r| r.json()).filter(|v| v["is_anomaly"].as_bool().unwrap()).collect();
    for v in got.iter().map(|r| r.json()) {
        assert_eq!(v["heatmap_uri"].is_string(), v["is_anomaly"].as_bool().unwrap(), "{v}");
    }
    let files = walk_files(&heat);
    assert_eq!(files, anomalies.len(), "one PNG per anomaly and no others");
    op.terminate(Duration::from_secs(60));
}

fn walk_files(dir: &std::path::Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        n += if p.is_dir() { walk_files(&p) } else { 1 };
    }
    n
}

#[test]
fn malformed_inputs_go_to_the_dead_letter_topic_and_valid_ones_are_still_scored() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, tmp, .. } = Scenario::start(1);
    let claims = tmp.path().join("claims");
    std::fs::create_dir_all(&claims).unwrap();
    // Small real images (magnetic tile JPEGs) keep every valid record far below the limits.
    let files: Vec<_> = sample_images(4).into_iter().filter(|f| f.class.as_deref() == Some("magnetic_tile")).collect();
    let good_png = dcam_stream::testing::encode_png(&image::open(&files[0].path).unwrap().to_rgb8());
    assert!(good_png.starts_with(b"\x89PNG") && good_png.len() < 250_000);
    std::fs::copy(&files[1].path, claims.join("present.img")).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let max_bytes = 300_000usize;

    // (key, value, expected outcome): "score" or the dcam-error-kind.
    let mut png_truncated = good_png.clone();
    png_truncated.truncate(good_png.len() / 3);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not-json", b"{this is not json".to_vec(), "schema"),
        ("no-id", json(serde_json::json!({"image": b64(&good_png)})), "schema"),
        ("bad-id", json(serde_json::json!({"image_id": "has spaces/and slashes", "image": b64(&good_png)})), "schema"),
        ("bad-base64", json(serde_json::json!({"image_id": "x1", "image": "***not base64***"})), "decode"),
        ("empty", Vec::new(), "schema"),
        ("random", (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(), "unsupported_format"),
        ("truncated-png", png_truncated, "decode"),
        ("png-bomb", dcam_stream::testing::png_header_claiming(100_000, 100_000), "too_large"),
        (
            "over-limit",
            {
                let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
                v.resize(max_bytes + 10, 0);
                v
            },
            "too_large",
        ),
        (
            "ico",
            {
                let mut v = vec![0u8, 0, 1, 0, 1, 0, 16, 16];
                v.resize(300, 7);
                v
            },
            "unsupported_format",
        ),
        ("missing-uri", json(serde_json::json!({"image_id": "x2", "image_uri": format!("file://{}", claims.join("missing.png").display())})), "fetch"),
        ("both-image-and-uri", json(serde_json::json!({"image_id": "x3", "image": b64(&good_png), "image_uri": "file:///x"})), "schema"),
        ("no-image", json(serde_json::json!({"image_id": "x4"})), "schema"),
        ("outside-root-uri", json(serde_json::json!({"image_id": "x5", "image_uri": "file:///etc/hostname"})), "fetch"),
        ("ok-json", json(serde_json::json!({"image_id": "ok-json", "class": "bottle", "image": b64(&good_png), "attributes": {"line": 3}})), "score"),
        ("ok-uri", json(serde_json::json!({"image_id": "ok-uri", "image_uri": format!("file://{}", claims.join("present.img").display())})), "score"),
    ];
    // Valid raw images between every malformed one.
    let mut records = Vec::new();
    let mut expect: BTreeMap<String, String> = BTreeMap::new();
    for (i, (key, value, outcome)) in cases.iter().enumerate() {
        records.push((Some(key.as_bytes().to_vec()), value.clone(), vec![("trace-me".to_string(), b"yes".to_vec())]));
        expect.insert(key.to_string(), outcome.to_string());
        let id = format!("between-{i}");
        records.push((Some(id.clone().into_bytes()), good_png.clone(), vec![("dcam-image-id".to_string(), id.clone().into_bytes())]));
        expect.insert(id, "score".into());
    }
    let positions = publish(&broker.producer(), &input, &records);

    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path())
        .set("DCAM__DECODE__MAX_PAYLOAD_BYTES", max_bytes.to_string())
        .set("DCAM__DECODE__FILE_URI_ROOT", claims.display().to_string())
        .set("DCAM__HEATMAP__POLICY", "none")
        .spawn("op");
    op.wait_ready(READY);
    let n_dead = expect.values().filter(|o| *o != "score").count();
    let n_scored = expect.len() - n_dead;
    assert!(n_dead >= 10);
    let dead = read_topic(&broker.brokers, &dlq, n_dead, READ);
    let scored = read_topic(&broker.brokers, &scores, n_scored, READ);
    assert_eq!(dead.len(), n_dead, "{}", op.log_text());
    assert_eq!(scored.len(), n_scored, "{}", op.log_text());

    let by_key: HashMap<Vec<u8>, usize> = records.iter().enumerate().map(|(i, r)| (r.0.clone().unwrap(), i)).collect();
    for d in &dead {
        let key = String::from_utf8(d.key.clone().unwrap()).unwrap();
        let i = by_key[key.as_bytes()];
        assert_eq!(d.headers.get("dcam-error-kind").map(String::as_str), Some(expect[&key].as_str()), "{key}: {:?}", d.headers.get("dcam-error"));
        assert!(!d.headers["dcam-error"].is_empty());
        assert_eq!(d.headers["dcam-source"], format!("{input}/{}/{}", positions[i].0, positions[i].1));
        assert_eq!(d.headers.get("trace-me").map(String::as_str), Some("yes"), "original headers kept");
        assert_eq!(d.value.clone().unwrap_or_default(), records[i].1, "original value kept for {key}");
    }
    let scored_ids: HashSet<String> = scored.iter().map(|r| r.json()["image_id"].as_str().unwrap().to_string()).collect();
    let expected_scored: HashSet<String> = expect.iter().filter(|(_, o)| *o == "score").map(|(k, _)| k.clone()).collect();
    assert_eq!(scored_ids, expected_scored);
    let with_attrs = scored.iter().map(|r| r.json()).find(|v| v["image_id"] == "ok-json").unwrap();
    assert_eq!(with_attrs["attributes"]["line"], 3, "attributes pass through");

    // Still up and ready after all that; metrics count dead letters by kind.
    assert_eq!(http_get(op.http_port, "/readyz").unwrap().0, 200);
    let metrics = op.metrics();
    assert!(metrics.contains("dcam_dead_letters_total{kind=\"too_large\"} 2"), "{metrics}");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn sigterm_mid_stream_then_restart_loses_nothing() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, group, tmp } = Scenario::start(2);
    let (records, ids) = small_image_records(400, "term");
    publish(&broker.producer(), &input, &records);
    // A small in-flight bound: SIGTERM drains only what was taken in (and exercises pausing).
    let cfg = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &group, tmp.path())
        .set("DCAM__HEATMAP__POLICY", "none")
        .set("DCAM__PIPELINE__MAX_IN_FLIGHT", "16");

    let mut first = cfg.spawn("first");
    first.wait_ready(READY);
    let partial = read_topic(&broker.brokers, &scores, 10, READ);
    assert!(partial.len() >= 10, "{}", first.log_text());
    let status = first.terminate(Duration::from_secs(60));
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let after_stop = read_topic_until(&broker.brokers, &scores, Duration::from_secs(3), |_| false).len();
    assert!(after_stop < ids.len(), "stopped mid-stream ({after_stop} of {} scored)", ids.len());
    let committed: i64 = committed_offsets(&broker.brokers, &group, &input, 2).iter().map(|o| (*o).max(0)).sum();
    assert!(committed as usize >= 10, "shutdown committed the drained work ({committed})");
    assert_eq!(committed as usize, after_stop, "committed exactly what was scored before the stop");

    let mut second = cfg.spawn("second");
    second.wait_ready(READY);
    let all = read_topic_until(&broker.brokers, &scores, READ, |got| got.iter().map(|r| r.key.clone()).collect::<HashSet<_>>().len() >= ids.len());
    let scored: HashSet<String> = all.iter().map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap()).collect();
    let missing: Vec<_> = ids.iter().filter(|id| !scored.contains(*id)).collect();
    assert!(missing.is_empty(), "lost {} inputs: {missing:?}\nsecond instance log:\n{}", missing.len(), second.log_text());
    // At-least-once with a drained shutdown: nothing is scored twice either.
    assert_eq!(all.len(), ids.len(), "duplicates after a clean SIGTERM");
    assert!(second.terminate(Duration::from_secs(60)).success());
}

/// With the whole backlog taken in and plenty left to score, the source stops fetching (a
/// broker that answers empty fetches at once would otherwise spin against it), and records
/// published meanwhile are still read once the pipeline runs low: nothing waits forever.
#[test]
fn a_caught_up_source_stops_fetching_and_still_reads_what_arrives_later() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, group, tmp } = Scenario::start(2);
    let (records, mut ids) = small_image_records(150, "early");
    publish(&broker.producer(), &input, &records);
    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &group, tmp.path()).set("DCAM__HEATMAP__POLICY", "none").spawn("op");
    op.wait_ready(READY);
    let first = read_topic(&broker.brokers, &scores, 10, READ);
    assert!(first.len() >= 10, "{}", op.log_text());
    let (late, late_ids) = small_image_records(30, "late");
    publish(&broker.producer(), &input, &late);
    ids.extend(late_ids);
    let all = read_topic_until(&broker.brokers, &scores, READ, |got| unique_keys(got) >= ids.len());
    let scored: HashSet<String> = all.iter().map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap()).collect();
    let missing: Vec<_> = ids.iter().filter(|id| !scored.contains(*id)).collect();
    assert!(missing.is_empty(), "never scored: {missing:?}\n{}", op.log_text());
    assert_eq!(all.len(), ids.len(), "one score per input");
    let metrics = op.metrics();
    let pauses: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dcam_caught_up_pauses_total "))
        .unwrap_or_else(|| panic!("no dcam_caught_up_pauses_total:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(pauses >= 1.0, "the source never stopped fetching while caught up with a backlog to score:\n{metrics}");
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn two_instances_in_one_group_share_the_partitions() {
    let _serial = serial();
    let Scenario { broker, input, scores, dlq, group, tmp } = Scenario::start(4);
    let cfg = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &group, tmp.path()).set("DCAM__HEATMAP__POLICY", "none");
    let mut a = cfg.spawn("a");
    let mut b = cfg.spawn("b");
    a.wait_ready(READY);
    b.wait_ready(READY);
    std::thread::sleep(Duration::from_secs(8)); // let the group settle on both members
    let (records, ids) = image_records(80, "pair");
    publish(&broker.producer(), &input, &records);
    let all = read_topic_until(&broker.brokers, &scores, READ, |got| got.iter().map(|r| r.key.clone()).collect::<HashSet<_>>().len() >= ids.len());
    let scored: HashSet<String> = all.iter().map(|r| String::from_utf8(r.key.clone().unwrap()).unwrap()).collect();
    assert_eq!(scored.len(), ids.len(), "every input scored");
    let count = |op: &OperatorProcess| -> f64 {
        op.metrics().lines().filter(|l| l.starts_with("dcam_images_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    let (na, nb) = (count(&a), count(&b));
    assert!(na > 0.0 && nb > 0.0, "both instances scored: a={na} b={nb}");
    assert!(na + nb >= ids.len() as f64);
    a.terminate(Duration::from_secs(60));
    b.terminate(Duration::from_secs(60));
}
