//! Delivery internals against librdkafka's in-process broker (fast, supports transactions and
//! injected request errors): an abortable transaction error leads to abort + rewind and a clean
//! retry, never to loss; an offset commit the broker refused is sent again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dcam_stream::internals as kafka;
use dcam_stream::internals as source;
use dcam_stream::internals::Metrics;
use dcam_stream::internals::OutRecord;
use dcam_stream::internals::Settings;
use dcam_stream::internals::{CommitOutcome, SourceContext};
use dcam_stream::internals::{Delivery, OffsetTracker};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;

fn settings(brokers: &str) -> Settings {
    settings_with(brokers, &[])
}

fn settings_with(brokers: &str, extra: &[(&str, &str)]) -> Settings {
    let env = [
        ("DCAM__KAFKA__BROKERS", brokers),
        ("DCAM__KAFKA__INPUT_TOPICS", "in"),
        ("DCAM__KAFKA__GROUP_ID", "g"),
        ("DCAM__KAFKA__SESSION_TIMEOUT_MS", "6000"),
        ("DCAM__TOPICS__SCORES", "out"),
        ("DCAM__DELIVERY__MODE", "exactly_once"),
        ("DCAM__DELIVERY__INSTANCE_ID", "unit-1"),
        ("DCAM__DELIVERY__TRANSACTION_TIMEOUT_MS", "10000"),
    ];
    Settings::load_with_env(None, env.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
}

/// Polls until `n` input records arrive; registers each and buffers one output per input.
fn consume_and_finish(consumer: &BaseConsumer<SourceContext>, rt: &tokio::runtime::Runtime, delivery: &Delivery, n: usize) -> Vec<i64> {
    let tracker = delivery.tracker();
    let mut offsets = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while offsets.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} inputs consumed", offsets.len());
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let job = source::job_from_message(&m, tracker);
            let out = OutRecord { topic: "out".into(), key: None, payload: Some(format!("scored {}", m.offset()).into_bytes()), headers: vec![] };
            assert!(rt.block_on(delivery.deliver(&job.ticket, vec![out])), "buffered and finished");
            offsets.push(m.offset());
        }
    }
    offsets
}

/// An in-process broker with topics `in` and `out`, a runtime and a plain producer.
fn mock_cluster() -> (MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String, tokio::runtime::Runtime, FutureProducer) {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("warn").try_init();
    let cluster = MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("in", 1, 1).unwrap();
    cluster.create_topic("out", 1, 1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let plain: FutureProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    (cluster, brokers, rt, plain)
}

/// `n` input records `image 0`, `image 1`, ... on topic `in`.
fn publish_inputs(rt: &tokio::runtime::Runtime, plain: &FutureProducer, n: usize) {
    rt.block_on(async {
        for i in 0..n {
            plain.send(FutureRecord::<(), _>::to("in").payload(&format!("image {i}")), Duration::from_secs(10)).await.unwrap();
        }
    });
}

/// A group member as the source builds it: tracker, delivery and a consumer subscribed to `in`.
struct Member {
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    delivery: Arc<Delivery>,
    consumer: BaseConsumer<SourceContext>,
}

fn member(s: &Settings) -> Member {
    let tracker = Arc::new(OffsetTracker::new());
    let metrics = Metrics::new();
    let delivery = Arc::new(Delivery::build(&s.delivery, &s.kafka, &s.topics.dead_letter, tracker.clone(), metrics.clone(), Default::default()).unwrap());
    let consumer: BaseConsumer<SourceContext> =
        kafka::consumer_config(&s.kafka, "g").create_with_context(SourceContext::new(delivery.clone(), Duration::from_secs(30))).unwrap();
    consumer.subscribe(&["in"]).unwrap();
    Member { tracker, metrics, delivery, consumer }
}

fn committed_out(brokers: &str) -> Vec<String> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    c.subscribe(&["out"]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
        }
    }
    out
}

#[test]
fn abortable_transaction_error_aborts_and_rewinds_without_loss() {
    let (cluster, brokers, rt, plain) = mock_cluster();
    publish_inputs(&rt, &plain, 5);

    let Member { tracker, metrics, delivery, consumer } = member(&settings(&brokers));

    // First pass: every output buffered, then the transaction's produce fails (abortable).
    assert_eq!(consume_and_finish(&consumer, &rt, &delivery, 5), vec![0, 1, 2, 3, 4]);
    // Finished but uncommitted: back-pressure still counts them (they hold memory).
    assert_eq!(tracker.in_flight(), 0);
    assert_eq!(delivery.held().0, 5);
    let err = rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &[err]);
    let outcome = source::handle_commit(&consumer, CommitMode::Sync).unwrap();
    assert_eq!(outcome, CommitOutcome::Rewound);
    assert_eq!(delivery.held(), (0, 0), "buffered outputs of the aborted transaction are dropped");
    assert_eq!(tracker.in_flight(), 0);
    assert!(metrics.encode().contains("dcam_transactions_total{kind=\"aborted\"} 1"));
    cluster.clear_request_errors(rdkafka::types::RDKafkaApiKey::Produce);

    // Each rewind re-delivers the same inputs from the committed position (none: the start).
    // librdkafka may need one more abort to bump the producer epoch after the failed produce
    // (the mock broker then reports skipped sequence numbers); that path is a rewind too.
    let mut tries = 0;
    loop {
        tries += 1;
        assert_eq!(consume_and_finish(&consumer, &rt, &delivery, 5), vec![0, 1, 2, 3, 4], "try {tries}");
        match source::handle_commit(&consumer, CommitMode::Sync).unwrap() {
            CommitOutcome::Committed => break,
            CommitOutcome::Rewound => assert!(tries < 3, "still aborting after {tries} tries"),
            CommitOutcome::Recovering => panic!("an abortable error needs no new producer"),
        }
    }

    let out = committed_out(&brokers);
    assert_eq!(out, (0..5).map(|i| format!("scored {i}")).collect::<Vec<_>>(), "each input exactly once, nothing from the aborted transaction");
    // (librdkafka's mock broker acknowledges TxnOffsetCommit without storing it, so the group's
    // committed offsets are checked against the real broker in tests/exactly_once.rs.)
}

/// A group that never committed, reading from `latest`: an aborted transaction goes back to
/// where this member started reading, not to the beginning of the topic (which would score
/// records from before the group existed).
#[test]
fn rewind_without_committed_offsets_goes_back_to_where_reading_started() {
    let (cluster, brokers, rt, plain) = mock_cluster();
    let send = |text: String| rt.block_on(async { plain.send(FutureRecord::<(), _>::to("in").payload(&text), Duration::from_secs(10)).await.unwrap() });
    for i in 0..3 {
        send(format!("before the group {i}"));
    }

    let s = settings_with(&brokers, &[("DCAM__KAFKA__AUTO_OFFSET_RESET", "latest")]);
    let tracker = Arc::new(OffsetTracker::new());
    let metrics = Metrics::new();
    let delivery = Arc::new(Delivery::build(&s.delivery, &s.kafka, &s.topics.dead_letter, tracker.clone(), metrics, Default::default()).unwrap());
    let consumer: BaseConsumer<SourceContext> =
        kafka::consumer_config(&s.kafka, "g").create_with_context(SourceContext::new(delivery.clone(), Duration::from_secs(30))).unwrap();
    consumer.subscribe(&["in"]).unwrap();

    // Publish until the member (positioned at the end when it joined) reads something.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        assert!(Instant::now() < deadline, "the consumer never read a new record");
        send("after the group joined".into());
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let job = source::job_from_message(&m, &tracker);
            let offset = m.offset();
            drop(m);
            let out = OutRecord { topic: "out".into(), key: None, payload: Some(format!("scored {offset}").into_bytes()), headers: vec![] };
            assert!(rt.block_on(delivery.deliver(&job.ticket, vec![out])));
            break offset;
        }
    };
    assert!(first >= 3, "latest: the records from before the group are not read (first = {first})");
    cluster.request_errors(rdkafka::types::RDKafkaApiKey::Produce, &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED]);
    assert_eq!(source::handle_commit(&consumer, CommitMode::Sync).unwrap(), CommitOutcome::Rewound);
    cluster.clear_request_errors(rdkafka::types::RDKafkaApiKey::Produce);
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        assert!(Instant::now() < deadline, "nothing re-read after the rewind");
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            break m.offset();
        }
    };
    assert_eq!(again, first, "re-read from where this member started, not from offset 0");
}

/// A sink task that finishes after its partition was rewound (a slow heatmap write) must not put
/// its outputs into the new generation's transaction: they would be committed twice.
#[test]
fn outputs_of_a_rewound_generation_are_not_buffered() {
    let tracker = Arc::new(OffsetTracker::new());
    let buffer = dcam_stream::internals::TxnBuffer::new(tracker.clone());
    let ticket = tracker.register("in", 0, 7, 100);
    let out = || vec![OutRecord { topic: "out".into(), key: None, payload: Some(b"scored 7".to_vec()), headers: vec![] }];
    tracker.assign("in", 0); // the rewind
    buffer.clear(&("in".to_string(), 0));
    assert!(!buffer.push(&ticket, out()), "a stale ticket's outputs are refused");
    assert!(buffer.is_empty());
    let fresh = tracker.register("in", 0, 7, 100);
    assert!(buffer.push(&fresh, out()));
    assert_eq!(buffer.size(), (1, out()[0].size()));
}

/// At-least-once: an asynchronous offset commit the broker refuses (a coordinator restarting) must
/// not count as done. The partition then stays idle (no new input), and the next commit turns must
/// still bring its committed offset to the end.
#[test]
fn a_refused_commit_goes_again_for_an_idle_partition() {
    let (cluster, brokers, rt, plain) = mock_cluster();
    publish_inputs(&rt, &plain, 5);
    let s = settings_with(&brokers, &[("DCAM__DELIVERY__MODE", "at_least_once")]);
    let tracker = Arc::new(OffsetTracker::new());
    let delivery = Arc::new(Delivery::build(&s.delivery, &s.kafka, &s.topics.dead_letter, tracker.clone(), Metrics::new(), Default::default()).unwrap());
    let consumer: BaseConsumer<SourceContext> =
        kafka::consumer_config(&s.kafka, "g").create_with_context(SourceContext::new(delivery.clone(), Duration::from_secs(30))).unwrap();
    consumer.subscribe(&["in"]).unwrap();
    assert_eq!(consume_and_finish(&consumer, &rt, &delivery, 5), vec![0, 1, 2, 3, 4]);

    let committed = || {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition("in", 0);
        let c = consumer.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
        let offset = c.elements()[0].offset().to_raw();
        drop(c);
        offset
    };
    // One commit turn while the broker refuses commits; its callback arrives with the error.
    cluster.request_errors(rdkafka::types::RDKafkaApiKey::OffsetCommit, &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE]);
    assert_eq!(source::handle_commit(&consumer, CommitMode::Async).unwrap(), CommitOutcome::Committed);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(consumer.poll(Duration::from_millis(100)).is_none(), "no new input");
    }
    assert_ne!(committed(), Some(5), "the refused commit did not land");
    cluster.clear_request_errors(rdkafka::types::RDKafkaApiKey::OffsetCommit);

    // A few ordinary commit turns, no new input: the position must be sent again.
    for _ in 0..3 {
        source::handle_commit(&consumer, CommitMode::Async).unwrap();
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            consumer.poll(Duration::from_millis(100));
        }
    }
    assert_eq!(committed(), Some(5), "the idle partition's committed offset caught up");
}

/// Exactly-once: a transaction during which the broker connection dropped is not trusted, even
/// when its commit reports success. A restarted noida-db acknowledges the commit of a transaction
/// whose state it lost: its outputs never become visible and a read_committed subscriber that was
/// reading stops there for good (docs/DESIGN.md §5). The producer is renewed (which ends the
/// transaction for every reader) and the consumer goes back to the committed offsets.
#[test]
fn a_transaction_that_lived_through_a_broker_disconnect_is_not_trusted() {
    let (cluster, brokers, rt, plain) = mock_cluster();
    publish_inputs(&rt, &plain, 5);
    let Member { metrics, delivery, consumer, .. } = member(&settings(&brokers));
    assert_eq!(consume_and_finish(&consumer, &rt, &delivery, 5), vec![0, 1, 2, 3, 4]);

    // Slow round trips keep the transaction open long enough for the broker to drop every
    // connection in the middle of it and come back.
    cluster.broker_round_trip_time(1, Duration::from_millis(400)).unwrap();
    let outcome = std::thread::scope(|scope| {
        let commit = scope.spawn(|| source::handle_commit(&consumer, CommitMode::Sync).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        cluster.broker_down(1).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
        cluster.broker_up(1).unwrap();
        commit.join().unwrap()
    });
    assert_eq!(outcome, CommitOutcome::Recovering, "the transaction's outcome is unknown: renew and rewind");
    assert!(delivery.recovery_due());
    assert_eq!(delivery.held(), (0, 0), "its buffered outputs are not kept for another try");
    delivery.renew().unwrap();
    assert!(metrics.encode().contains("dcam_transactions_total{kind=\"producer_renewed\"} 1"), "{}", metrics.encode());
}
