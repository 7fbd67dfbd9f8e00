//! The inspection page in a real browser (headless Chromium) against a real `dcam-stream run`
//! on a real broker: the grid shows the latest scored images with thumbnails, the live panel
//! and the threshold histograms render, and input text (here a class crafted as HTML) reaches
//! the page as text, never as markup.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const READY: Duration = Duration::from_secs(120);
const XSS_CLASS: &str = r#"<img src=x onerror="document.title='pwned'">"#;

fn chromium() -> PathBuf {
    let bin = std::env::var("DCAM_CHROMIUM").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/bin/chromium"));
    assert!(bin.exists(), "no Chromium at {} (scripts/test.sh installs Debian's chromium; or set DCAM_CHROMIUM)", bin.display());
    bin
}

/// The page's DOM after its scripts ran, as headless Chromium serialises it.
fn rendered_dom(url: &str, profile: &std::path::Path) -> String {
    let out = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=15000",
            "--run-all-compositor-stages-before-draw",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            url,
        ])
        .output()
        .expect("running chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first server-sent event of `/api/live`.
fn first_live_event(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").unwrap();
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
    let mut op = s.operator().set("DCAM__HEATMAP__POLICY", "none").spawn("op");
    op.wait_ready(READY);
    let port = op.http_port;

    // Someone opens the page: from now on normal images get thumbnails too.
    let (code, page) = http_get(port, "/ui").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("/ui/app.js") && !page.contains("onerror"), "{page}");
    let (mut records, mut ids) = image_records(5, "page");
    let tile = std::fs::read(&sample_images(20).into_iter().find(|f| f.class.as_deref() == Some("magnetic_tile")).unwrap().path).unwrap();
    records.push((Some(b"xss-1".to_vec()), tile, vec![("dcam-image-id".into(), b"xss-1".to_vec()), ("dcam-class".into(), XSS_CLASS.as_bytes().to_vec())]));
    ids.push("xss-1".into());
    publish(&s.broker.producer(), &s.input, &records);
    assert_eq!(read_topic(&s.broker.brokers, &s.scores, ids.len(), Duration::from_secs(300)).len(), ids.len());

    // The API behind the page.
    let recent: serde_json::Value = serde_json::from_str(&http_get(port, "/api/recent?limit=50").unwrap().1).unwrap();
    let items = recent.as_array().unwrap();
    assert_eq!(items.len(), ids.len(), "{recent}");
    assert_eq!(items[0]["record"]["image_id"], "xss-1", "newest first");
    assert!(items.iter().all(|i| i["has_thumbnail"] == true), "the page is open: every image has a thumbnail");
    let (code, _) = http_get(port, &format!("/api/recent/{}/thumbnail", items[0]["id"])).unwrap();
    assert_eq!(code, 200);
    let only_bottles: serde_json::Value = serde_json::from_str(&http_get(port, "/api/recent?class=bottle").unwrap().1).unwrap();
    assert!(only_bottles.as_array().unwrap().iter().all(|i| i["record"]["class"] == "bottle"), "{only_bottles}");
    let live = first_live_event(port);
    assert!(live.contains("event: stats") && live.contains("images_per_second") && live.contains("consumer_lag"), "{live}");

    // The page itself, in a browser.
    let profile = tempfile::tempdir().unwrap();
    let dom = rendered_dom(&format!("http://127.0.0.1:{port}/ui"), profile.path());
    for id in &ids {
        assert!(dom.contains(id.as_str()), "{id} not on the page:\n{dom}");
    }
    assert!(dom.contains("/api/recent/") && dom.contains("/thumbnail"), "thumbnails are shown:\n{dom}");
    assert!(dom.contains("<canvas") && dom.contains("threshold from model"), "the threshold histograms render:\n{dom}");
    assert!(dom.contains("&lt;img src=x onerror="), "the crafted class is shown as text:\n{dom}");
    assert!(!dom.contains(r#"<img src="x""#) && !dom.contains("pwned</title>"), "the crafted class became markup:\n{dom}");
    assert!(op.terminate(Duration::from_secs(60)).success());
}
