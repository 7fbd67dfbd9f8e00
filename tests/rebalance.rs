//! Broker restarts and rebalances against a real broker process (issue: keep consuming through
//! them; never stall, never die). 600 small events on 3 partitions, small batches and a small
//! in-flight window so partitions are paused by back-pressure most of the time; scores are read
//! back with `read_committed`. Each scenario asserts counts and liveness, not timings.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const EVENTS: usize = 600;
const PARTITIONS: i32 = 3;
const READY: Duration = Duration::from_secs(120);
/// Every event must be scored within this after the last disruption.
const CATCH_UP: Duration = Duration::from_secs(120);

struct Run {
    scenario: Scenario,
    ids: Vec<String>,
    config: OperatorConfig,
}

/// Topics with `EVENTS` published events and the operator's settings for `mode`, back-pressure
/// tight enough that partitions are paused whenever a rebalance or restart hits.
fn prepare(mode: &str) -> Run {
    let scenario = Scenario::start_with_score_partitions(PARTITIONS, 2);
    let (records, ids) = small_image_records(EVENTS, mode);
    publish(&scenario.broker.producer(), &scenario.input, &records);
    let mut config = scenario
        .operator()
        .set("DCAM__DELIVERY__MODE", mode)
        .set("DCAM__DELIVERY__INSTANCE_ID", "pod-0")
        .set("DCAM__HEATMAP__POLICY", "none")
        .set("DCAM__BATCH__MAX_BATCH", "8")
        .set("DCAM__PIPELINE__MAX_IN_FLIGHT", "16");
    // DCAM_TEST_REBALANCE_PROTOCOL=eager measures the other protocol on the same scenarios.
    if let Ok(protocol) = std::env::var("DCAM_TEST_REBALANCE_PROTOCOL") {
        config = config.set("DCAM__KAFKA__REBALANCE_PROTOCOL", protocol);
    }
    Run { scenario, ids, config }
}

/// Waits until `n` distinct events are scored; fails with the operator's log if they are not
/// within `timeout` (a stall) or if the operator exited.
fn wait_scored(run: &Run, op: &mut OperatorProcess, n: usize, timeout: Duration, what: &str) -> Vec<Record> {
    let seen = read_topic_until(&run.scenario.broker.brokers, &run.scenario.scores, timeout, |got| unique_keys(got) >= n);
    if let Some(status) = op.child.try_wait().unwrap() {
        panic!("{what}: the operator exited ({status}) with {} of {n} scored:\n{}", unique_keys(&seen), op.log_text());
    }
    if unique_keys(&seen) < n {
        let gap = isolation_gap(&run.scenario.broker.brokers, &run.scenario.scores);
        panic!(
            "{what}: stalled at {} of {n} scored; score partitions (partition, read_committed, read_uncommitted): {gap:?}\n{}",
            unique_keys(&seen),
            op.log_text()
        );
    }
    seen
}

/// Reads every score once all events are in, a little later so late duplicates show too, and
/// returns (lost, duplicates).
fn final_audit(run: &Run) -> (usize, usize) {
    std::thread::sleep(Duration::from_secs(3));
    let all = read_topic_until(&run.scenario.broker.brokers, &run.scenario.scores, Duration::from_secs(15), |got| got.len() > 10 * EVENTS);
    audit(&all, &run.ids)
}

/// The stall must not hide: lag and progress are exported for every assigned partition.
fn assert_watchable(op: &OperatorProcess) {
    let metrics = op.metrics();
    for p in 0..PARTITIONS {
        assert!(metrics.contains(&format!("partition=\"{p}\"")), "no consumer_lag series for partition {p}:\n{metrics}");
    }
    for name in ["dcam_partitions_paused", "dcam_seconds_since_progress"] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

/// The broker is stopped (its whole process group, as a rolling restart does) and started again
/// on the same port and data dir, twice, while partitions are paused and commits in flight.
fn broker_restarts_twice(mode: &str) -> (usize, usize) {
    let mut run = prepare(mode);
    let mut op = run.config.spawn(&format!("{mode}-restarts"));
    op.wait_ready(READY);
    // A subscriber that reads the score topic all along, as a user's read_committed consumer
    // does: it must see every score, not only a reader started after the restarts.
    let stop_subscriber = Arc::new(AtomicBool::new(false));
    let subscriber = {
        let (brokers, scores, stop) = (run.scenario.broker.brokers.clone(), run.scenario.scores.clone(), stop_subscriber.clone());
        std::thread::spawn(move || {
            read_topic_until(&brokers, &scores, Duration::from_secs(900), |got| unique_keys(got) >= EVENTS || stop.load(Ordering::SeqCst))
        })
    };
    wait_scored(&run, &mut op, EVENTS / 5, Duration::from_secs(300), "before the first restart");
    run.scenario.broker.restart(Duration::from_secs(3));
    eprintln!("{mode}: broker restarted once");
    wait_scored(&run, &mut op, 2 * EVENTS / 5, CATCH_UP, "after the first restart");
    run.scenario.broker.restart(Duration::from_secs(3));
    eprintln!("{mode}: broker restarted twice");
    wait_scored(&run, &mut op, EVENTS, CATCH_UP, "after the second restart");
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    while !subscriber.is_finished() && std::time::Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_subscriber.store(true, Ordering::SeqCst);
    let subscribed = subscriber.join().unwrap();
    assert!(unique_keys(&subscribed) >= EVENTS, "a subscriber reading through the restarts saw {} of {EVENTS} scores", unique_keys(&subscribed));
    let (lost, dups) = final_audit(&run);
    eprintln!("{mode}: two broker restarts, {EVENTS} events: lost {lost}, duplicates {dups}");
    assert!(op.child.try_wait().unwrap().is_none(), "the operator kept running:\n{}", op.log_text());
    assert_watchable(&op);
    assert!(op.terminate(Duration::from_secs(60)).success());
    (lost, dups)
}

/// A second member joins the group for 8 s and leaves (scale-out and in under back-pressure, as
/// an autoscaler does). Static membership is off here: a static member that leaves for good keeps
/// its partitions until the broker's session timeout evicts it, and noida-db never evicts one
/// (docs/DESIGN.md §5), so with it this scenario measures the broker, not the operator.
fn member_joins_and_leaves(mode: &str) -> (usize, usize) {
    let mut run = prepare(mode);
    run.config = run.config.clone().set("DCAM__KAFKA__STATIC_MEMBERSHIP", "false");
    let mut op = run.config.spawn(&format!("{mode}-first"));
    op.wait_ready(READY);
    wait_scored(&run, &mut op, EVENTS / 5, Duration::from_secs(300), "before the second member joined");
    let joined = chrono::Utc::now().timestamp_millis();
    let mut second = run.config.clone().set("DCAM__DELIVERY__INSTANCE_ID", "pod-1").spawn(&format!("{mode}-second"));
    second.wait_ready(READY);
    std::thread::sleep(Duration::from_secs(8));
    assert!(second.terminate(Duration::from_secs(60)).success(), "the second member stopped cleanly");
    eprintln!("{mode}: second member joined and left");
    let scored = wait_scored(&run, &mut op, EVENTS, CATCH_UP, "after the second member left");
    let (lost, dups) = final_audit(&run);
    // Time without progress: the longest gap between consecutive scores from the join on.
    let mut times: Vec<i64> = scored.iter().filter_map(|r| r.timestamp).filter(|t| *t >= joined).collect();
    times.sort();
    let longest_gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let protocol = std::env::var("DCAM_TEST_REBALANCE_PROTOCOL").unwrap_or_else(|_| "cooperative".into());
    eprintln!("{mode} ({protocol}): member joined and left, {EVENTS} events: lost {lost}, duplicates {dups}, longest time without a score {longest_gap} ms");
    assert!(op.child.try_wait().unwrap().is_none(), "the operator kept running:\n{}", op.log_text());
    assert!(op.terminate(Duration::from_secs(60)).success());
    (lost, dups)
}

#[test]
fn at_least_once_keeps_scoring_through_two_broker_restarts() {
    let _serial = serial();
    let (lost, dups) = broker_restarts_twice("at_least_once");
    assert_eq!(lost, 0, "lost inputs");
    eprintln!("at_least_once duplicates after two broker restarts: {dups}");
}

// Failed in about half the runs before transactions that lived through a broker disconnect were
// distrusted (src/delivery/transaction.rs, TxnProducerContext): readers stalled at the lost one.
#[test]
fn exactly_once_keeps_scoring_through_two_broker_restarts_without_duplicates() {
    let _serial = serial();
    let (lost, dups) = broker_restarts_twice("exactly_once");
    assert_eq!(lost, 0, "lost inputs");
    assert_eq!(dups, 0, "duplicate scores under exactly-once");
}

#[test]
fn at_least_once_keeps_scoring_when_a_member_joins_and_leaves_while_paused() {
    let _serial = serial();
    let (lost, dups) = member_joins_and_leaves("at_least_once");
    assert_eq!(lost, 0, "lost inputs");
    eprintln!("at_least_once duplicates after a member joined and left: {dups}");
}

#[test]
fn exactly_once_keeps_scoring_when_a_member_joins_and_leaves_while_paused() {
    let _serial = serial();
    let (lost, dups) = member_joins_and_leaves("exactly_once");
    assert_eq!(lost, 0, "lost inputs");
    assert_eq!(dups, 0, "duplicate scores under exactly-once");
}
