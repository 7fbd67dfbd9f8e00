//! Poison records, hostile input and dependencies that are slow or gone, against the real
//! `dcam-stream run` on a real broker process: nothing stuck, nothing lost, memory bounded.
//! One test per row of the README's failure-modes table.

mod common;

use std::time::{Duration, Instant};

use common::*;

const READY: Duration = Duration::from_secs(120);

/// Row A: a dead letter bigger than the dead-letter topic allows. It must not be retried
/// forever: a truncated stand-in goes out, the partition's offset moves on, SIGTERM works.
#[test]
fn a_dead_letter_too_large_for_its_topic_is_replaced_and_the_offset_moves_on() {
    too_large_dead_letter("at_least_once");
}

/// Row A in exactly-once mode: the refused output fails its transaction once; the retry after
/// the rewind carries its stand-in.
#[test]
fn exactly_once_a_dead_letter_too_large_for_its_topic_is_replaced_and_the_offset_moves_on() {
    too_large_dead_letter("exactly_once");
}

fn too_large_dead_letter(mode: &str) {
    let _serial = serial();
    // The dead-letter topic keeps the broker's default limit: 1 MB.
    let s = Scenario::start_with(1, &[("max.message.bytes", "5242880")], &[]);
    let Scenario { broker, input, scores, dlq, group, .. } = &s;

    let junk: Vec<u8> = (0..1_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (mut records, ids) = small_image_records(20, "after");
    records.insert(0, (Some(b"junk".to_vec()), junk, vec![("dcam-image-id".into(), b"junk-1".to_vec())]));
    publish(&broker.producer(), input, &records);

    let mut op = s.operator().set("DCAM__DELIVERY__MODE", mode).set("DCAM__DELIVERY__INSTANCE_ID", unique("i")).spawn("op");
    op.wait_ready(READY);
    let got = read_topic(&broker.brokers, scores, ids.len(), Duration::from_secs(120));
    assert_eq!(got.len(), ids.len(), "{}", op.log_text());
    let dead = read_topic(&broker.brokers, dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1, "{}", op.log_text());
    let d = &dead[0];
    assert_eq!(d.headers["dcam-error-kind"], "too_large_output");
    assert_eq!(d.headers["dcam-original-error-kind"], "unsupported_format");
    assert_eq!(d.headers["dcam-source"], format!("{input}/0/0"));
    assert!(d.headers["dcam-error"].contains(dlq.as_str()), "{:?}", d.headers);
    assert!(d.value.as_ref().unwrap().len() <= 16 * 1024);
    // The committed offset passes the poison record (it stayed at 0 before).
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_offsets(&broker.brokers, group, input, 1) != vec![21] {
        assert!(Instant::now() < deadline, "committed {:?}\n{}", committed_offsets(&broker.brokers, group, input, 1), op.log_text());
        std::thread::sleep(Duration::from_millis(300));
    }
    if mode == "at_least_once" {
        assert!(op.metrics().contains(r#"dcam_dead_letters_total{kind="too_large_output"} 1"#));
    }
    assert!(op.terminate(Duration::from_secs(40)).success());
}

/// Row A, second half: when not even the truncated stand-in fits the dead-letter topic, the
/// operator stops with an error naming the topic, and commits nothing past the record.
#[test]
fn an_output_that_can_never_be_published_stops_the_operator_without_committing_past_it() {
    let _serial = serial();
    let s = Scenario::start_with(1, &[], &[("max.message.bytes", "2048")]);
    let (records, _) = small_image_records(3, "ok");
    let mut all = records.clone();
    all.insert(1, (None, vec![b'x'; 100_000], vec![]));
    publish(&s.broker.producer(), &s.input, &all);
    let mut op = s.operator().spawn("op");
    op.wait_ready(READY);
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = op.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "operator kept running:\n{}", op.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!status.success());
    let log = op.log_text();
    assert!(log.contains(&s.dlq) && log.contains("max.message.bytes"), "{log}");
    let committed = committed_offsets(&s.broker.brokers, &s.group, &s.input, 1)[0];
    assert!(committed <= 1, "committed {committed}, past the record at offset 1");
}

/// Row B: class strings from input never become metric labels (no injected series).
#[test]
fn metrics_labels_never_come_from_input() {
    let _serial = serial();
    let s = Scenario::start(1);
    let (mut records, ids) = small_image_records(2, "m");
    let hostile = "x\"} 1\ndcam_injected_total 42\n#";
    records.push((None, records[0].1.clone(), vec![("dcam-class".into(), hostile.as_bytes().to_vec())]));
    records.push((None, records[0].1.clone(), vec![("dcam-class".into(), b"a-class-the-model-never-saw".to_vec())]));
    publish(&s.broker.producer(), &s.input, &records);
    let mut op = s.operator().spawn("op");
    op.wait_ready(READY);
    let got = read_topic(&s.broker.brokers, &s.scores, ids.len() + 1, Duration::from_secs(60));
    assert_eq!(got.len(), ids.len() + 1, "{}", op.log_text());
    let dead = read_topic(&s.broker.brokers, &s.dlq, 1, Duration::from_secs(30));
    assert_eq!(dead.len(), 1);
    let metrics = op.metrics();
    assert!(!metrics.contains("injected"), "{metrics}");
    assert!(!metrics.contains("never-saw"), "{metrics}");
    assert!(metrics.contains(r#"class="_other""#), "{metrics}");
    assert!(metrics.contains(r#"class="magnetic_tile""#), "{metrics}");
}

/// Row C: a flood of images that are small on the wire but huge decoded (16-bit RGBA, just
/// under max_pixels). The decode budget keeps them from being decoded all at once.
#[test]
fn a_flood_of_worst_case_images_stays_within_the_decode_budget() {
    let _serial = serial();
    let s = Scenario::start(1);
    let input = unique("huge");
    s.broker.create_topic_with(&input, 1, &[("max.message.bytes", "5242880")]);
    let side = 6324u32;
    // Flat colour: compresses well on the wire, 320 MB of 16-bit RGBA decoded.
    let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(side, side, image::Rgba([1000, 30000, 40000, 65535]));
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba16(img).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let records: Vec<_> = (0..4).map(|i| (None, png.clone(), vec![("dcam-image-id".to_string(), format!("huge-{i}").into_bytes())])).collect();
    eprintln!("worst-case PNG: {} bytes on the wire", png.len());
    publish(&s.broker.producer(), &input, &records);
    let budget: u64 = 512 << 20; // one decode at a time: each needs 40 MP x (8 + 3) bytes = 440 MB
    let mut op = s
        .operator()
        .set("DCAM__KAFKA__INPUT_TOPICS", input.as_str())
        .set("DCAM__DECODE__WORKERS", "3")
        .set("DCAM__DECODE__MAX_DECODE_BYTES", budget.to_string())
        .set("DCAM__BATCH__MAX_BATCH", "1")
        .spawn("op");
    op.wait_ready(READY);
    let got = read_topic(&s.broker.brokers, &s.scores, 4, Duration::from_secs(300));
    assert_eq!(got.len(), 4, "all are scored, one after another\n{}", op.log_text());
    let peak = peak_rss_bytes(op.child.id());
    eprintln!("peak RSS with 3 decode workers and a {budget} byte decode budget: {} MB", peak >> 20);
    // Without the budget (max_decode_bytes = 16 GiB) the same run peaked at 1241 MB.
    assert!(peak < budget + (600 << 20), "peak RSS {} MB", peak >> 20);
}

fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Bounded shutdown: with the broker gone, SIGTERM still ends the process within
/// pipeline.shutdown_timeout_ms (what was not committed is read again after a restart).
#[test]
fn sigterm_finishes_within_the_shutdown_timeout_when_the_broker_is_gone() {
    let _serial = serial();
    let mut s = Scenario::start(1);
    if s.broker.is_external() {
        return;
    }
    let (records, ids) = small_image_records(5, "s");
    publish(&s.broker.producer(), &s.input, &records);
    let mut op = s.operator().set("DCAM__PIPELINE__SHUTDOWN_TIMEOUT_MS", "5000").spawn("op");
    op.wait_ready(READY);
    assert_eq!(read_topic(&s.broker.brokers, &s.scores, ids.len(), Duration::from_secs(60)).len(), ids.len());
    s.broker.stop();
    let started = Instant::now();
    let _ = op.terminate(Duration::from_secs(30));
    eprintln!("stopped {:.1}s after SIGTERM", started.elapsed().as_secs_f64());
}

/// Finding 6: a replay of a topic written in transactions ends, although the last offset of
/// each partition is a commit marker that is never delivered.
#[test]
fn replay_of_a_transactional_topic_ends() {
    let _serial = serial();
    let s = Scenario::start(2);
    let (records, ids) = small_image_records(6, "t");
    let producer: rdkafka::producer::BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &s.broker.brokers).set("transactional.id", unique("camera")).create().unwrap();
    use rdkafka::producer::Producer;
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    for (key, value, headers) in &records {
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(rdkafka::message::Header { key: k, value: Some(v.as_slice()) });
        }
        let mut r = rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&s.input).payload(value.as_slice()).headers(h);
        if let Some(k) = key {
            r = r.key(k.as_slice());
        }
        producer.send(r).map_err(|(e, _)| e).unwrap();
    }
    producer.commit_transaction(Duration::from_secs(30)).unwrap();
    let out = unique("replayed");
    s.broker.create_topic(&out, 1);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dcam-stream"))
        .args(["replay", "--input-topic", &s.input, "--from", "2000-01-01T00:00:00Z", "--output-topic", &out])
        .env("DCAM__KAFKA__BROKERS", &s.broker.brokers)
        .env("DCAM__MODEL__PATH", model_path())
        .env("DCAM__HEATMAP__POLICY", "none")
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("replay did not end (waiting for an offset behind a commit marker)");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("replayed {} records", ids.len())), "{stderr}");
}
