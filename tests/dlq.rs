//! Dead-letter inspect and redrive against a real broker and operator: dead letters of three
//! kinds; the cause of one (a claim-check file that was missing) is fixed; redriving that kind
//! scores each of its inputs exactly once, and a rerun sends nothing again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(120);
const READ: Duration = Duration::from_secs(60);

fn dlq_cli(scenario: &Scenario, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dcam-stream"))
        .arg("dlq")
        .args(args)
        .env("DCAM__KAFKA__BROKERS", &scenario.broker.brokers)
        .env("DCAM__KAFKA__INPUT_TOPICS", &scenario.input)
        .env("DCAM__TOPICS__DEAD_LETTER", &scenario.dlq)
        .env("DCAM__KAFKA__SESSION_TIMEOUT_MS", "6000")
        .current_dir(repo_root())
        .output()
        .expect("running dcam-stream dlq")
}

fn scores_for(records: &[Record], id: &str) -> usize {
    records.iter().filter(|r| r.key.as_deref() == Some(id.as_bytes())).count()
}

#[test]
fn a_fixed_kind_is_redriven_and_scored_exactly_once() {
    let _serial = serial();
    let scenario = Scenario::start(1);
    let claims = scenario.tmp.path().join("claims");
    std::fs::create_dir_all(&claims).unwrap();
    let image = std::fs::read(&sample_images(1)[0].path).unwrap();
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let uri = |name: &str| format!("file://{}", claims.join(name).display());
    let records = vec![
        (Some(b"late-1".to_vec()), json(serde_json::json!({"image_id": "late-1", "image_uri": uri("late-1.png")})), vec![("line".to_string(), b"3".to_vec())]),
        (Some(b"late-2".to_vec()), json(serde_json::json!({"image_id": "late-2", "image_uri": uri("late-2.png")})), vec![]),
        (Some(b"garbled-1".to_vec()), b"{not json".to_vec(), vec![]),
        (Some(b"garbled-2".to_vec()), b"{still not json".to_vec(), vec![]),
        (Some(b"broken-1".to_vec()), image[..image.len() / 3].to_vec(), vec![("dcam-image-id".to_string(), b"broken-1".to_vec())]),
    ];
    publish(&scenario.broker.producer(), &scenario.input, &records);
    let mut op = scenario.operator().set("DCAM__DECODE__FILE_URI_ROOT", claims.display().to_string()).set("DCAM__HEATMAP__POLICY", "none").spawn("op");
    op.wait_ready(READY);
    let dead = read_topic(&scenario.broker.brokers, &scenario.dlq, records.len(), READ);
    assert_eq!(dead.len(), records.len(), "every input dead-lettered:\n{}", op.log_text());

    let inspect = dlq_cli(&scenario, &["inspect"]);
    let table = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    for (kind, count) in [("fetch", 2), ("schema", 2), ("decode", 1)] {
        let row = table.lines().find(|l| l.starts_with(kind)).unwrap_or_else(|| panic!("no {kind} row:\n{table}"));
        assert_eq!(row.split_whitespace().nth(1), Some(count.to_string().as_str()), "{kind} count:\n{table}");
    }
    let dry = dlq_cli(&scenario, &["redrive", "--kind", "fetch", "--dry-run"]);
    assert_eq!(String::from_utf8_lossy(&dry.stdout).trim(), "2", "{}", String::from_utf8_lossy(&dry.stderr));

    // The fix: the claim-check files arrive. Then only the fetch dead letters go back.
    for name in ["late-1.png", "late-2.png"] {
        std::fs::write(claims.join(name), &image).unwrap();
    }
    let redrive = dlq_cli(&scenario, &["redrive", "--kind", "fetch"]);
    assert!(redrive.status.success(), "{}", String::from_utf8_lossy(&redrive.stderr));
    assert_eq!(String::from_utf8_lossy(&redrive.stdout).trim(), "2");
    let again = dlq_cli(&scenario, &["redrive", "--kind", "fetch"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "0", "a rerun continues where the last stopped: {}", String::from_utf8_lossy(&again.stderr));

    let scores = read_topic(&scenario.broker.brokers, &scenario.scores, 2, READ);
    std::thread::sleep(Duration::from_secs(3));
    let scores = read_topic_until(&scenario.broker.brokers, &scenario.scores, Duration::from_secs(8), |got| got.len() > scores.len() + 10);
    for id in ["late-1", "late-2"] {
        assert_eq!(scores_for(&scores, id), 1, "{id} scored once after the redrive:\n{}", op.log_text());
    }
    assert_eq!(scores.len(), 2, "nothing else was redriven");
    let redriven = read_topic(&scenario.broker.brokers, &scenario.input, records.len() + 2, READ);
    let copy = redriven
        .iter()
        .find(|r| r.key.as_deref() == Some(b"late-1".as_slice()) && r.headers.iter().any(|(k, _)| k == "dcam-redriven-from"))
        .expect("the redriven copy");
    assert!(copy.headers.iter().any(|(k, v)| k == "line" && v == "3"), "original headers kept: {:?}", copy.headers);
    assert!(!copy.headers.iter().any(|(k, _)| k.starts_with("dcam-error") || k == "dcam-source"), "error headers dropped: {:?}", copy.headers);
    assert_eq!(read_topic(&scenario.broker.brokers, &scenario.dlq, records.len() + 1, Duration::from_secs(5)).len(), records.len(), "no new dead letters");
    assert!(op.terminate(Duration::from_secs(60)).success());
}
