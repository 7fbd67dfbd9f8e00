//! The telemetry port under load and across replicas, against a real `dcam-stream run` on a real
//! broker: a flood of `/api/live` clients neither starves the probes nor stops scoring, and the
//! inspection page's image ids never collide between two operator processes (a load-balanced
//! Ingress, or a restart, would otherwise show one image's heatmap for another).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const READY: Duration = Duration::from_secs(120);
/// `telemetry.max_live_clients` in config/default.toml.
const DEFAULT_MAX_LIVE_CLIENTS: usize = 16;

/// Caps the operator's open files, as a container's `ulimit -n` would.
fn limit_open_files(op: &OperatorProcess, limit: u64) {
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    let rc = unsafe { libc::prlimit(op.child.id() as libc::pid_t, libc::RLIMIT_NOFILE, &rlimit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_files(op: &OperatorProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", op.child.id())).map(|d| d.count()).unwrap_or(0)
}

/// A client that asks for the live stream and then never reads it.
fn idle_live_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    s
}

/// What a client got first: a status code, `Closed` (the server closed it: a connection past the
/// cap), or `Hanging` (nothing within the timeout).
#[derive(Debug, PartialEq)]
enum Answer {
    Status(u16),
    Closed,
    Hanging,
}

fn answer_of(s: &mut TcpStream) -> Answer {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 12];
    match s.read_exact(&mut buf) {
        Ok(()) => std::str::from_utf8(&buf[9..12]).ok().and_then(|c| c.parse().ok()).map_or(Answer::Hanging, Answer::Status),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Answer::Hanging,
        Err(_) => Answer::Closed,
    }
}

#[test]
fn probes_answer_and_scoring_goes_on_under_a_flood_of_live_clients() {
    let _serial = serial();
    let s = Scenario::start(1);
    let mut op = s.operator().set("DCAM__HEATMAP__POLICY", "none").spawn("op");
    op.wait_ready(READY);
    let port = op.http_port;
    // Room for what the operator holds now and a few hundred more: 500 clients would not fit.
    let baseline = open_files(&op);
    limit_open_files(&op, (baseline + 300) as u64);

    let mut flood: Vec<TcpStream> = (0..500).map(|_| idle_live_client(port)).collect();
    let (records, ids) = small_image_records(30, "flood");
    publish(&s.broker.producer(), &s.input, &records);

    // The kubelet's probes keep answering, promptly, for as long as the flood lasts.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        for path in ["/healthz", "/readyz"] {
            let asked = Instant::now();
            let answer = http_get(port, path);
            assert!(answer.as_ref().is_some_and(|(code, _)| *code == 200), "{path} under the flood: {answer:?}\n{}", op.log_text());
            assert!(asked.elapsed() < Duration::from_secs(2), "{path} took {:?}", asked.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Scoring went on: every image has its score.
    assert_eq!(read_topic(&s.broker.brokers, &s.scores, ids.len(), Duration::from_secs(120)).len(), ids.len());
    // Exactly `max_live_clients` streams were served; the rest were refused (503) or, past the
    // connection cap, closed: none was left hanging.
    let answers: Vec<Answer> = flood.iter_mut().map(answer_of).collect();
    let served = answers.iter().filter(|a| **a == Answer::Status(200)).count();
    let refused = answers.iter().filter(|a| matches!(a, Answer::Status(503) | Answer::Closed)).count();
    assert_eq!((served, refused), (DEFAULT_MAX_LIVE_CLIENTS, 500 - DEFAULT_MAX_LIVE_CLIENTS), "{answers:?}");
    drop(flood);
    assert!(op.terminate(Duration::from_secs(60)).success());
}

#[test]
fn image_ids_differ_between_two_operator_processes() {
    let _serial = serial();
    let s = Scenario::start(1);
    // Two groups: each operator scores every image, as two replicas behind one Ingress (or one
    // operator before and after a restart) would show the same stream.
    let mut a = s.operator().set("DCAM__HEATMAP__POLICY", "none").spawn("a");
    let mut b = s.operator().set("DCAM__HEATMAP__POLICY", "none").set("DCAM__KAFKA__GROUP_ID", unique("group-b")).spawn("b");
    a.wait_ready(READY);
    b.wait_ready(READY);
    let (records, ids) = small_image_records(4, "ids");
    publish(&s.broker.producer(), &s.input, &records);
    assert_eq!(read_topic(&s.broker.brokers, &s.scores, 2 * ids.len(), Duration::from_secs(180)).len(), 2 * ids.len());

    let listed = |op: &OperatorProcess| -> Vec<String> {
        let (code, body) = http_get(op.http_port, "/api/recent").unwrap();
        assert_eq!(code, 200, "{body}");
        let items: serde_json::Value = serde_json::from_str(&body).unwrap();
        items.as_array().unwrap().iter().map(|i| i["id"].to_string()).collect()
    };
    let (ids_a, ids_b) = (listed(&a), listed(&b));
    assert_eq!((ids_a.len(), ids_b.len()), (ids.len(), ids.len()));
    let shared: Vec<&String> = ids_a.iter().filter(|id| ids_b.contains(id)).collect();
    assert!(shared.is_empty(), "the same id names different images on two operators: {shared:?}");
    assert!(a.terminate(Duration::from_secs(60)).success());
    assert!(b.terminate(Duration::from_secs(60)).success());
}
