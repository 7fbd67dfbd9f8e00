//! Heatmaps in an S3-compatible bucket: the real operator against a real broker and a real S3
//! HTTP server (moto), read back with an S3 client. A store that fails never holds back scores.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use object_store::ObjectStore;

const READY: Duration = Duration::from_secs(120);
const READ: Duration = Duration::from_secs(180);

fn with_s3(cfg: OperatorConfig, s3: &S3Server, store: &str) -> OperatorConfig {
    cfg.set("DCAM__HEATMAP__POLICY", "all")
        .set("DCAM__HEATMAP__STORE", store)
        .set("DCAM__S3__ENDPOINT", s3.endpoint.as_str())
        .set("DCAM__S3__ALLOW_HTTP", "true")
        .set("DCAM__S3__ACCESS_KEY_ID", "test")
        .set("DCAM__S3__SECRET_ACCESS_KEY", "test")
}

fn heatmap_count(op: &OperatorProcess, result: &str) -> usize {
    let line = format!("dcam_heatmaps_total{{kind=\"{result}\"}} ");
    op.metrics().lines().find_map(|l| l.strip_prefix(line.as_str())?.parse::<f64>().ok()).unwrap_or(0.0) as usize
}

#[test]
fn heatmaps_land_in_the_bucket_and_a_broken_store_never_holds_back_scores() {
    let _serial = serial();
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(tmp.path());
    s3.create_bucket("inspection");
    let input = unique("images");
    broker.create_topic(&input, 2);
    let (records, ids) = image_records(6, "s3");
    publish(&broker.producer(), &input, &records);

    // Each run reads the same input in its own group and writes to its own output topics.
    let run = |store: &str, name: &str| -> (OperatorProcess, Vec<Record>) {
        let (scores, dlq) = (unique("scores"), unique("dlq"));
        broker.create_topic(&scores, 1);
        broker.create_topic(&dlq, 1);
        let cfg = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path());
        let mut op = with_s3(cfg, &s3, store).spawn(name);
        op.wait_ready(READY);
        let got = read_topic(&broker.brokers, &scores, ids.len(), READ);
        assert_eq!(got.len(), ids.len(), "{}", op.log_text());
        (op, got)
    };
    // A working bucket: every score carries the URI of a heatmap PNG that is really there.
    let (op, got) = run("s3://inspection/line-7", "s3");
    let client = s3.client("inspection");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut keys = HashSet::new();
    for r in &got {
        let v = r.json();
        let (partition, offset) = (v["source"]["partition"].as_i64().unwrap() as i32, v["source"]["offset"].as_i64().unwrap());
        let key = dcam_stream::internals::heatmap_key("line-7", v["model"]["version"].as_str().unwrap(), &input, partition, offset);
        assert_eq!(v["heatmap_uri"].as_str(), Some(format!("s3://inspection/{key}").as_str()), "deterministic key: {v}");
        let bytes = rt.block_on(async { client.get(&object_store::path::Path::from(key.as_str())).await.unwrap().bytes().await.unwrap() });
        let png = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).expect("the object is a PNG").to_rgb8();
        assert_eq!(png.dimensions(), (256, 256), "{key}");
        // The map is coloured on the score's scale: an anomaly's hot region stands out; a normal image,
        // whose every pixel is far below the threshold, may be one colour.
        let colours: HashSet<_> = png.pixels().map(|p| p.0).collect();
        if v["is_anomaly"].as_bool().unwrap() {
            assert!(colours.len() > 10, "{key} is a colour-mapped heatmap, not a blank image");
        }
        keys.insert(key);
    }
    assert_eq!(keys.len(), ids.len(), "one object per input");
    let listed = rt.block_on(async {
        use futures::TryStreamExt;
        client.list(Some(&object_store::path::Path::from("line-7"))).try_collect::<Vec<_>>().await.unwrap()
    });
    assert_eq!(listed.len(), ids.len(), "nothing else written under the prefix");
    assert_eq!(heatmap_count(&op, "written"), ids.len());
    assert_eq!(heatmap_count(&op, "failed"), 0);
    assert!(op.terminate(Duration::from_secs(60)).success());

    // A bucket that does not exist: every write fails after its retries, yet every input is
    // still scored (with `heatmap_uri: null`), and the failures are counted and logged.
    let (broken, got) = run("s3://no-such-bucket", "broken");
    let scored: HashSet<_> = got.iter().map(|r| r.json()["image_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(scored, ids.iter().cloned().collect::<HashSet<_>>());
    for r in &got {
        assert!(r.json()["heatmap_uri"].is_null(), "{:?}", r.json());
    }
    assert_eq!(heatmap_count(&broken, "failed"), ids.len());
    assert!(broken.log_text().contains("heatmap not stored; publishing the score without it"));
    assert!(broken.terminate(Duration::from_secs(60)).success());
}

/// A store that accepts connections and never answers (slow, not down): each heatmap is given
/// up after heatmap.write_timeout_ms and its score still goes out, so scoring never stalls.
#[test]
fn a_store_that_never_answers_costs_each_heatmap_at_most_the_write_timeout() {
    let _serial = serial();
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let _accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming().flatten() {
            held.push(conn); // read nothing, answer nothing
        }
    });
    let (input, scores, dlq) = (unique("images"), unique("scores"), unique("dlq"));
    broker.create_topic(&input, 1);
    broker.create_topic(&scores, 1);
    broker.create_topic(&dlq, 1);
    let (records, ids) = small_image_records(4, "slow");
    publish(&broker.producer(), &input, &records);
    let mut op = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path())
        .set("DCAM__HEATMAP__POLICY", "all")
        .set("DCAM__HEATMAP__STORE", "s3://inspection/slow")
        .set("DCAM__S3__ENDPOINT", format!("http://127.0.0.1:{port}"))
        .set("DCAM__S3__ALLOW_HTTP", "true")
        .set("DCAM__S3__ACCESS_KEY_ID", "test")
        .set("DCAM__S3__SECRET_ACCESS_KEY", "test")
        .set("DCAM__HEATMAP__WRITE_TIMEOUT_MS", "2000")
        .spawn("slow");
    op.wait_ready(READY);
    let started = std::time::Instant::now();
    let got = read_topic(&broker.brokers, &scores, ids.len(), Duration::from_secs(60));
    assert_eq!(got.len(), ids.len(), "{}", op.log_text());
    for r in &got {
        assert!(r.json()["heatmap_uri"].is_null());
    }
    eprintln!("{} scores in {:.1}s with a silent store", got.len(), started.elapsed().as_secs_f64());
    assert_eq!(heatmap_count(&op, "failed"), ids.len());
}

/// `s3://` claim-check image URIs are fetched with the S3 settings (docs/DESIGN.md §2).
#[test]
fn s3_image_uris_are_fetched_and_scored() {
    let _serial = serial();
    let broker = Broker::start();
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(tmp.path());
    s3.create_bucket("camera");
    let files = sample_images(2);
    let client = s3.client("camera");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut records = Vec::new();
    for f in &files {
        let key = format!("line 7/{}.img", f.image_id);
        rt.block_on(client.put(&object_store::path::Path::from(key.as_str()), std::fs::read(&f.path).unwrap().into())).unwrap();
        let uri = format!("s3://camera/line%207/{}.img", f.image_id);
        let value = serde_json::to_vec(&serde_json::json!({"image_id": f.image_id, "class": f.class, "image_uri": uri})).unwrap();
        records.push((Some(f.image_id.clone().into_bytes()), value, vec![]));
    }
    records.push((None, br#"{"image_id": "missing", "image_uri": "s3://camera/nope.png"}"#.to_vec(), vec![]));
    let (input, scores, dlq) = (unique("images"), unique("scores"), unique("dlq"));
    broker.create_topic(&input, 1);
    broker.create_topic(&scores, 1);
    broker.create_topic(&dlq, 1);
    publish(&broker.producer(), &input, &records);
    let cfg = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &unique("group"), tmp.path());
    let mut op = with_s3(cfg, &s3, &format!("file://{}", tmp.path().join("heat").display())).spawn("s3uri");
    op.wait_ready(READY);
    let got = read_topic(&broker.brokers, &scores, files.len(), READ);
    assert_eq!(got.len(), files.len(), "{}", op.log_text());
    let dead = read_topic(&broker.brokers, &dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers["dcam-error-kind"], "fetch");
}
