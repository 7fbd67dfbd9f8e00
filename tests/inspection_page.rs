//! The inspection page in a real browser (headless Chromium, driven over the DevTools protocol)
//! against a real `dcam-stream run`
//! on a real broker: the grid shows the latest scored images with thumbnails, the live panel
//! and the threshold histograms render, and input text (here a class crafted as HTML) reaches
//! the page as text, never as markup. The API's reads need the read token, which the page takes
//! from the user.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(120);
const XSS_CLASS: &str = r#"<img src=x onerror="document.title='pwned'">"#;
const READ_TOKEN: &str = "page-read-token";
const READ_AUTH: (&str, &str) = ("Authorization", "Bearer page-read-token");

fn chromium() -> PathBuf {
    let bin = std::env::var("DCAM_CHROMIUM").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    assert!(bin.exists(), "no Chromium at {} (scripts/test.sh installs Debian's chromium; or set DCAM_CHROMIUM)", bin.display());
    bin
}

/// Headless Chromium on a page, driven over the DevTools protocol (a WebSocket): the test runs
/// JavaScript in the page as a user's browser would and reads the answers.
struct Browser {
    child: std::process::Child,
    socket: tungstenite::WebSocket<std::net::TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = std::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--remote-debugging-port={port}"),
                &format!("--user-data-dir={}", profile.path().display()),
                url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting chromium");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let ws_url = loop {
            let pages = devtools_targets(port);
            let found = pages
                .as_ref()
                .and_then(|p| p.as_array())
                .and_then(|p| p.iter().find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url))));
            if let Some(ws) = found.and_then(|t| t["webSocketDebuggerUrl"].as_str()) {
                break ws.to_string();
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill(); // not left behind by a failing test
                let _ = child.wait();
                panic!("chromium's DevTools endpoint did not list the page");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let (socket, _) = tungstenite::client(ws_url.as_str(), stream).expect("DevTools WebSocket");
        Browser { child, socket, next_id: 0, _profile: profile }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its JSON value.
    fn eval(&mut self, expression: &str) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let call =
            serde_json::json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": expression, "returnByValue": true, "awaitPromise": true}});
        self.socket.send(tungstenite::Message::text(call.to_string())).unwrap();
        loop {
            let msg = self.socket.read().expect("DevTools answer");
            let Ok(text) = msg.to_text() else { continue };
            let answer: serde_json::Value = serde_json::from_str(text).unwrap();
            if answer["id"] == id {
                assert!(answer["result"]["exceptionDetails"].is_null(), "{expression} threw: {answer}");
                return answer["result"]["result"]["value"].clone();
            }
        }
    }

    /// Waits until `condition` (a JS expression) is true.
    fn wait_for(&mut self, condition: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.eval(condition) != serde_json::Value::Bool(true) {
            assert!(std::time::Instant::now() < deadline, "the page never showed {condition}:\n{}", self.eval("document.documentElement.outerHTML"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chromium's list of DevTools targets. Its HTTP server keeps the connection open after the
/// answer, so the body is read by its Content-Length, not to the end of the stream.
fn devtools_targets(port: u16) -> Option<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok())?;
        if raw.len() >= end + 4 + length {
            return serde_json::from_slice(&raw[end + 4..end + 4 + length]).ok();
        }
    }
}

/// A GET with the read token whose body is binary: (status line and headers, body).
fn http_get_bytes(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {READ_TOKEN}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
    (String::from_utf8_lossy(&raw[..split]).into_owned(), raw[split + 4..].to_vec())
}

/// The first server-sent event of `/api/live`.
fn first_live_event(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {READ_TOKEN}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("\n\n") || !text.contains("data:") {
        let n = s.read(&mut buf).expect("an event within 10 s");
        assert!(n > 0, "stream closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text
}

#[test]
fn the_inspection_page_shows_scored_images_and_never_renders_input_as_html() {
    let _serial = serial();
    let s = Scenario::start(1);
    let mut op = s.operator().set("DCAM__HEATMAP__POLICY", "none").set("DCAM__TELEMETRY__READ_TOKEN", READ_TOKEN).spawn("op");
    op.wait_ready(READY);
    let port = op.http_port;

    // Someone opens the page and it reads the API with the token: from now on normal images get
    // thumbnails too (the page alone, which anyone may load, does not turn them on).
    let (code, page) = http_get(port, "/ui").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("/ui/app.js") && !page.contains("onerror"), "{page}");
    assert_eq!(http_send("GET", port, "/api/recent", &[READ_AUTH], "").unwrap().0, 200);
    let (mut records, mut ids) = image_records(5, "page");
    let tile = std::fs::read(&sample_images(20).into_iter().find(|f| f.class.as_deref() == Some("magnetic_tile")).unwrap().path).unwrap();
    records.push((Some(b"xss-1".to_vec()), tile, vec![("dcam-image-id".into(), b"xss-1".to_vec()), ("dcam-class".into(), XSS_CLASS.as_bytes().to_vec())]));
    ids.push("xss-1".into());
    publish(&s.broker.producer(), &s.input, &records);
    assert_eq!(read_topic(&s.broker.brokers, &s.scores, ids.len(), Duration::from_secs(300)).len(), ids.len());

    // The API behind the page: its reads need the read token.
    assert_eq!(http_get(port, "/api/recent").unwrap().0, 401);
    let recent: serde_json::Value = serde_json::from_str(&http_send("GET", port, "/api/recent?limit=50", &[READ_AUTH], "").unwrap().1).unwrap();
    let items = recent.as_array().unwrap();
    assert_eq!(items.len(), ids.len(), "{recent}");
    // Ids are `<per-process prefix>-<counter>`: one prefix, the counter in the order scored.
    let (prefixes, order): (Vec<&str>, Vec<u64>) =
        items.iter().map(|i| i["id"].as_str().unwrap().rsplit_once('-').map(|(p, n)| (p, n.parse::<u64>().unwrap())).unwrap()).unzip();
    assert!(prefixes.iter().all(|p| *p == prefixes[0]), "{prefixes:?}");
    assert!(order.windows(2).all(|w| w[0] > w[1]), "newest (last scored) first: {order:?}");
    let mut listed: Vec<&str> = items.iter().map(|i| i["record"]["image_id"].as_str().unwrap()).collect();
    listed.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert!(items.iter().all(|i| i["has_thumbnail"] == true), "the page is open: every image has a thumbnail");
    let (head, jpeg) = http_get_bytes(port, &format!("/api/recent/{}/thumbnail", items[0]["id"].as_str().unwrap()));
    assert!(head.starts_with("HTTP/1.1 200") && head.to_ascii_lowercase().contains("content-type: image/jpeg"), "{head}");
    let overlay = image::load_from_memory(&jpeg).expect("the overlay is a JPEG");
    assert_eq!((overlay.width(), overlay.height()), (256, 256), "kept at the model's input size (inspect.thumbnail_px = 256)");
    let (head, _) = http_get_bytes(port, "/ui");
    assert!(head.to_ascii_lowercase().contains("content-security-policy: default-src 'self'"), "{head}");
    let only_bottles: serde_json::Value = serde_json::from_str(&http_send("GET", port, "/api/recent?class=bottle", &[READ_AUTH], "").unwrap().1).unwrap();
    assert!(only_bottles.as_array().unwrap().iter().all(|i| i["record"]["class"] == "bottle"), "{only_bottles}");
    let live = first_live_event(port);
    assert!(live.contains("event: stats") && live.contains("images_per_second") && live.contains("consumer_lag"), "{live}");

    // The page itself, in a browser: it asks for the read token, then shows the images.
    let mut browser = Browser::open(&format!("http://127.0.0.1:{port}/ui"));
    browser.wait_for("document.getElementById('read-note')?.textContent.includes('read token') === true");
    browser.eval(&format!("(() => {{ const t = document.getElementById('read-token'); t.value = '{READ_TOKEN}'; t.dispatchEvent(new Event('change')); }})()"));
    browser.wait_for(&format!("document.querySelectorAll('#grid .card').length === {}", ids.len()));
    let dom = browser.eval("document.documentElement.outerHTML").as_str().unwrap().to_string();
    for id in &ids {
        assert!(dom.contains(id.as_str()), "{id} not on the page:\n{dom}");
    }
    // Overlays are shown, fetched with the token (an <img> cannot send it) from blob: URLs.
    browser.wait_for(&format!(
        "[...document.querySelectorAll('#grid .card img')].filter(i => i.src.startsWith('blob:') && i.naturalWidth === 256).length === {}",
        ids.len()
    ));
    browser.wait_for("document.querySelectorAll('#histograms canvas').length >= 2");
    assert!(browser.eval("document.getElementById('histograms').textContent").as_str().unwrap().contains("threshold from model"));
    // The crafted class is text on the page, never an element, and its script never ran.
    assert!(dom.contains("&lt;img src=x onerror="), "the crafted class is shown as text:\n{dom}");
    assert_eq!(browser.eval("document.querySelectorAll('img[src=\"x\"]').length"), 0, "the crafted class became markup");
    assert_eq!(browser.eval("document.title"), "dcam-stream inspection");
    // Clicking an image shows its score record.
    let clicked = browser.eval("(() => { const c = [...document.querySelectorAll('#grid .card')].find(c => c.textContent.includes('xss-1')); c.click(); return document.querySelector('#detail pre').textContent; })()");
    let record: serde_json::Value = serde_json::from_str(clicked.as_str().unwrap()).expect("the detail panel shows the record as JSON");
    assert_eq!((record["image_id"].as_str(), record["class"].as_str()), (Some("xss-1"), Some(XSS_CLASS)));
    // The live panel updates from the event stream; filtering by class narrows the grid.
    browser.wait_for("document.getElementById('lag').textContent !== '–'");
    browser.wait_for("document.getElementById('class-filter').options.length >= 3");
    let filtered = browser.eval("(async () => { const f = document.getElementById('class-filter'); f.value = 'bottle'; f.dispatchEvent(new Event('change')); await new Promise(r => setTimeout(r, 1500)); return [...document.querySelectorAll('#grid .card')].map(c => c.querySelector('.muted').textContent); })()");
    let shown = filtered.as_array().unwrap();
    assert!(!shown.is_empty() && shown.iter().all(|t| t.as_str().unwrap().starts_with("bottle")), "{filtered}");
    drop(browser);
    assert!(op.terminate(Duration::from_secs(60)).success());
}
