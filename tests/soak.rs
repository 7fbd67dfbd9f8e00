//! Soak: paced events for `DCAM_SOAK_MINUTES` (3 in the suite; `scripts/soak.sh` runs 20) against
//! a real broker, both delivery modes side by side on one broker, with a broker restart every
//! period (5 minutes, or half the run if shorter) and a member joining for 8 s and leaving half a
//! period after each. Prints events in/out, lost, duplicates, latency per window and the
//! operators' RSS; fails on any loss, on a duplicate in exactly-once mode, or if an operator exits.
//!
//! Lost and duplicated are counted against what the input topics really hold (the test producer
//! retries through the restarts and may write an event twice; each copy must be scored once).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};

const MODES: [&str; 2] = ["at_least_once", "exactly_once"];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One delivery mode's topics, group and running operator.
struct Lane {
    mode: &'static str,
    input: String,
    scores: String,
    config: OperatorConfig,
    op: OperatorProcess,
    rss_start_mb: u64,
}

fn rss_mb(op: &OperatorProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", op.child.id())).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0) / 1024
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Publishes one event per mode every `1 / rate` s until `stop`, cycling over small real images;
/// sends that fail while the broker is down are retried by librdkafka (message.timeout.ms).
fn spawn_producer(brokers: &str, inputs: Vec<String>, rate: f64, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<usize> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "false")
        .set("acks", "all")
        .set("message.timeout.ms", "120000")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let (records, _) = small_image_records(64, "soak");
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0usize;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (_, value, headers) = &records[sent % records.len()];
            let id = format!("soak-{sent:06}");
            for input in &inputs {
                let mut h = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header { key: "dcam-image-id", value: Some(id.as_bytes()) });
                for (k, v) in headers.iter().filter(|(k, _)| k != "dcam-image-id") {
                    h = h.insert(rdkafka::message::Header { key: k, value: Some(v.as_slice()) });
                }
                let mut record = BaseRecord::<[u8], [u8]>::to(input).key(id.as_bytes()).payload(value.as_slice()).headers(h);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, back)) => {
                            // Queue full while the broker is away: wait for room.
                            std::thread::sleep(Duration::from_millis(50));
                            record = back;
                        }
                    }
                }
            }
            sent += 1;
        }
        use rdkafka::producer::Producer;
        let _ = producer.flush(Duration::from_secs(120));
        sent
    })
}

// Opt-in (scripts/soak.sh, or DCAM_SOAK=1 scripts/test.sh) until the intermittent exactly-once
// stall after a broker restart is fixed: one 3-minute run left 1 of 1081 exactly-once inputs
// unscored (tests/rebalance.rs has the same stall, ignored there too).
#[test]
#[ignore = "opt-in: scripts/soak.sh; exactly-once can stall after a broker restart (open)"]
fn soak_with_broker_restarts_and_members_coming_and_going() {
    let _serial = serial();
    let minutes: f64 = env_or("DCAM_SOAK_MINUTES", 3.0);
    let rate: f64 = env_or("DCAM_SOAK_RATE", 6.0);
    let total = Duration::from_secs_f64(minutes * 60.0);
    let period = total.div_f64(2.0).min(Duration::from_secs(300));
    let window = total.div_f64(3.0).min(Duration::from_secs(300));
    let mut broker = Broker::start();
    if broker.is_external() {
        eprintln!("skipped: DCAM_TEST_BROKERS points at an external cluster we cannot restart");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut lanes: Vec<Lane> = MODES
        .iter()
        .map(|mode| {
            let (input, scores, dlq, group) = (unique("images"), unique("scores"), unique("dlq"), unique("group"));
            broker.create_topic(&input, 3);
            broker.create_topic(&scores, 2);
            broker.create_topic(&dlq, 1);
            let config = OperatorConfig::new(&broker.brokers, &input, &scores, &dlq, &group, tmp.path())
                .set("DCAM__DELIVERY__MODE", *mode)
                .set("DCAM__DELIVERY__INSTANCE_ID", "pod-0")
                .set("DCAM__HEATMAP__POLICY", "none")
                .set("DCAM__PIPELINE__MAX_IN_FLIGHT", "32");
            let mut op = config.spawn(&format!("soak-{mode}"));
            op.wait_ready(Duration::from_secs(120));
            let rss_start_mb = rss_mb(&op);
            Lane { mode, input, scores, config, op, rss_start_mb }
        })
        .collect();

    // The schedule: restarts at every period, a member joining half a period before each.
    let mut events: Vec<(Duration, &str)> = Vec::new();
    let mut at = period / 2;
    while at + Duration::from_secs(10) < total {
        events.push((at, if (at.as_millis() / (period / 2).as_millis()) % 2 == 1 { "member" } else { "restart" }));
        at += period / 2;
    }
    eprintln!(
        "soak: {minutes} min, {rate} events/s per mode, schedule {:?}",
        events.iter().map(|(t, what)| format!("{what}@{}s", t.as_secs())).collect::<Vec<_>>()
    );

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let producer = spawn_producer(&broker.brokers, lanes.iter().map(|l| l.input.clone()).collect(), rate, stop.clone());
    for (at, what) in &events {
        if let Some(wait) = (started + *at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match *what {
            "restart" => {
                broker.restart(Duration::from_secs(3));
                eprintln!("soak: broker restarted at {}s", started.elapsed().as_secs());
            }
            _ => {
                // A member that leaves for good leaves at once (no static membership; see tests/rebalance.rs).
                let mut seconds: Vec<OperatorProcess> = lanes
                    .iter()
                    .map(|l| {
                        l.config
                            .clone()
                            .set("DCAM__DELIVERY__INSTANCE_ID", "pod-1")
                            .set("DCAM__KAFKA__STATIC_MEMBERSHIP", "false")
                            .spawn(&format!("soak-{}-second", l.mode))
                    })
                    .collect();
                for s in &mut seconds {
                    s.wait_ready(Duration::from_secs(120));
                }
                std::thread::sleep(Duration::from_secs(8));
                for s in seconds {
                    assert!(s.terminate(Duration::from_secs(60)).success(), "a second member stopped cleanly");
                }
                eprintln!("soak: a member joined and left at {}s", started.elapsed().as_secs());
            }
        }
        for l in &mut lanes {
            assert!(l.op.child.try_wait().unwrap().is_none(), "{}: the operator exited:\n{}", l.mode, l.op.log_text());
        }
    }
    if let Some(wait) = (started + total).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = producer.join().unwrap();

    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for l in &mut lanes {
        let inputs = read_topic_until(&broker.brokers, &l.input, Duration::from_secs(60), |got| got.len() >= sent);
        let input_ts: HashMap<(i32, i64), i64> = inputs.iter().map(|r| ((r.partition, r.offset), r.timestamp.unwrap_or_default())).collect();
        // The audit counts against what the input topic holds: reading less than was sent would
        // make "lost" meaningless (the producer retries, so the topic holds at least every event).
        assert!(input_ts.len() >= sent, "{}: read back {} of {sent} published events from {}", l.mode, input_ts.len(), l.input);
        let source_of = |r: &Record| -> Option<(i32, i64)> {
            let mut parts = r.headers.get("dcam-source")?.rsplitn(3, '/');
            let offset = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            Some((partition, offset))
        };
        let all_scored = |got: &[Record]| got.iter().filter_map(source_of).collect::<std::collections::HashSet<_>>().len() >= input_ts.len();
        let scores = read_topic_until(&broker.brokers, &l.scores, Duration::from_secs(180), all_scored);
        std::thread::sleep(Duration::from_secs(3));
        let scores = read_topic_until(&broker.brokers, &l.scores, Duration::from_secs(15), |got| got.len() > scores.len() + 100_000);
        let mut times: HashMap<(i32, i64), Vec<i64>> = HashMap::new();
        for r in &scores {
            if let Some(src) = source_of(r) {
                times.entry(src).or_default().push(r.timestamp.unwrap_or_default());
            }
        }
        let lost = input_ts.keys().filter(|k| !times.contains_key(*k)).count();
        let dups: usize = times.values().map(|v| v.len() - 1).sum();
        let first_ts = input_ts.values().min().copied().unwrap_or_default();
        let mut by_window: std::collections::BTreeMap<u128, (usize, usize, Vec<i64>)> = Default::default();
        for (src, ts) in &input_ts {
            let w = (ts - first_ts).max(0) as u128 / window.as_millis().max(1);
            let entry = by_window.entry(w).or_default();
            entry.0 += 1;
            if let Some(scored) = times.get(src) {
                entry.1 += 1;
                entry.2.push(scored.iter().min().unwrap() - ts);
            }
        }
        eprintln!("\n{} | window | events in | scored | p50 ms | p99 ms", l.mode);
        for (w, (n_in, n_out, mut lat)) in by_window {
            lat.sort();
            let from = w * window.as_secs() as u128;
            eprintln!("{} | {from}-{}s | {n_in} | {n_out} | {} | {}", l.mode, from + window.as_secs() as u128, percentile(&lat, 0.5), percentile(&lat, 0.99));
        }
        let alive = l.op.child.try_wait().unwrap().is_none();
        let rss_end = rss_mb(&l.op);
        summary.push(format!(
            "{} | {} | {} | {lost} | {dups} | {} | {rss_end} | {}",
            l.mode,
            input_ts.len(),
            scores.len(),
            l.rss_start_mb,
            if alive { "running" } else { "EXITED" }
        ));
        if lost > 0 || !alive || (l.mode == "exactly_once" && dups > 0) {
            failed.push(format!("{}: lost {lost}, duplicates {dups}, running {alive}", l.mode));
        }
    }
    eprintln!("\nmode | events in | scores out | lost | duplicates | RSS start MB | RSS end MB | operator");
    for line in &summary {
        eprintln!("{line}");
    }
    for mut l in lanes {
        if l.op.child.try_wait().unwrap().is_none() {
            assert!(l.op.terminate(Duration::from_secs(60)).success());
        }
    }
    assert!(failed.is_empty(), "soak failed: {failed:?}");
}
