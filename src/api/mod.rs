//! The HTTP server on the telemetry port: `/metrics`, `/healthz`, `/readyz`, the inspection
//! page (`/ui`, assets compiled into the binary) and its API (`/api`). Reads of `/api` need
//! `telemetry.read_token` (or a writer's token) once it is set; every write (thresholds, model)
//! needs `Authorization: Bearer <token>` of a writer, whose name becomes the change's `by`, and is
//! refused when no token is configured; a Host outside `telemetry.allowed_hosts` is refused (`auth`). Connections and live streams are
//! capped and requests timed (`server`, `live`). Data never reaches HTML from here: the page
//! renders JSON with `textContent` only, under a Content-Security-Policy that allows no inline
//! script. No response may be framed or content-sniffed.

mod auth;
mod live;
mod server;

pub(crate) use auth::Writers;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, map_response, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::config::TelemetrySettings;
use crate::control::{check_threshold, Change, Control, ThresholdRefusal};
use crate::inference::active::{self, ModelSlot};
use crate::inference::model::RuntimeThresholds;
use crate::inspect::Recent;
use crate::telemetry::{Health, InternalEvent, Metrics, ThresholdLabels};

/// Everything the endpoints read or change.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub recent: Arc<Recent>,
    pub models: Arc<ModelSlot>,
    pub thresholds: Arc<RuntimeThresholds>,
    /// Off (`None`) when `topics.control` is empty: then nothing can be changed at runtime.
    pub control: Option<Arc<Control>>,
    pub writers: Arc<Writers>,
    /// The HTTP server's own section (limits, tokens, allowed hosts).
    pub telemetry: Arc<TelemetrySettings>,
}

/// Time to send a request body (the API's are small JSON documents).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the task is dropped.
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: ApiState) {
    let limits = &state.telemetry;
    let (max_connections, max_live_clients) = (limits.max_connections, limits.max_live_clients);
    let panel = live::LivePanel::start(state.clone(), max_live_clients);
    let probes_only = outer_layers(probes().fallback(too_busy), state.clone());
    server::run(listener, outer_layers(router(state.clone(), panel), state), probes_only, max_connections).await
}

fn probes() -> Router<ApiState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz))
}

fn router(state: ApiState, panel: Arc<live::LivePanel>) -> Router<ApiState> {
    let reads = Router::new()
        .route("/api/recent", get(recent))
        .route("/api/recent/{id}/thumbnail", get(thumbnail))
        .route("/api/scores", get(scores))
        .route("/api/live", get(live::stream))
        .route("/api/thresholds", get(thresholds))
        .route("/api/model", get(model))
        .route_layer(from_fn_with_state(state, require_reader));
    let writes = Router::new()
        .route("/api/thresholds/{class}", put(set_threshold))
        .route("/api/model", post(load_model))
        .route("/api/model/rollback", post(rollback_model));
    probes()
        .route("/metrics", get(metrics))
        .route("/", get(|| async { axum::response::Redirect::temporary("/ui") }))
        .route("/ui", get(ui_page))
        .route("/ui/app.js", get(ui_script))
        .merge(reads)
        .merge(writes)
        .layer(Extension(panel))
}

/// On every response of both routers: the Host check, the body timeout, the security headers.
fn outer_layers(routes: Router<ApiState>, state: ApiState) -> Router {
    routes
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(from_fn_with_state(state.clone(), require_known_host))
        .with_state(state)
        .layer(map_response(security_headers))
}

/// Middleware on the API's reads.
async fn require_reader(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    if auth::may_read(&s.telemetry.read_token, &s.writers, request.headers()) {
        next.run(request).await
    } else {
        auth::refuse(StatusCode::UNAUTHORIZED, "a valid bearer token (telemetry.read_token) is required for reads")
    }
}

/// Middleware on every route: a request for another host name is refused (421).
async fn require_known_host(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    if auth::known_host(&s.telemetry.allowed_hosts, request.headers()) {
        next.run(request).await
    } else {
        auth::refuse(StatusCode::MISDIRECTED_REQUEST, "this host name is not in telemetry.allowed_hosts")
    }
}

/// What a connection past `telemetry.max_connections` gets for anything but a probe.
async fn too_busy() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CONNECTION, "close"), (header::RETRY_AFTER, "10")], "too many connections\n").into_response()
}

/// On every response, errors and 404s included: no page of ours can be framed (clickjacking of
/// the write buttons), and no body is sniffed into another type (JSON or text run as HTML).
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    refresh_scrape_gauges(&s);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

/// Readiness and the thresholds in force, read when scraped so they are never stale: a threshold
/// changes through the API, the control topic or a model swap, readiness with the source loop.
fn refresh_scrape_gauges(s: &ApiState) {
    s.metrics.ready.set(i64::from(s.health.is_ready()));
    s.metrics.threshold.clear();
    if let serde_json::Value::Object(table) = threshold_table(s) {
        for (class, entry) in table {
            let (Some(threshold), Some(source)) = (entry["threshold"].as_f64(), entry["source"].as_str()) else { continue };
            s.metrics.threshold.get_or_create(&ThresholdLabels { class, source: source.to_string() }).set(threshold);
        }
    }
}

async fn healthz(State(s): State<ApiState>) -> impl IntoResponse {
    if s.health.is_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "source loop stalled\n")
    }
}

async fn readyz(State(s): State<ApiState>) -> impl IntoResponse {
    let (ready, mut body) = s.health.report();
    if let serde_json::Value::Object(o) = &mut body {
        o.insert("model".into(), s.models.current().describe());
    }
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

/// Thumbnails are fetched with the read token and shown from `blob:` URLs.
const PAGE_CSP: &str =
    "default-src 'self'; img-src 'self' blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// The page's headers: no inline script, nothing from elsewhere, never framed, never cached stale.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 3] {
    [(header::CONTENT_TYPE, content_type), (header::CONTENT_SECURITY_POLICY, PAGE_CSP), (header::CACHE_CONTROL, "no-cache")]
}

async fn ui_page() -> impl IntoResponse {
    (page_headers("text/html; charset=utf-8"), include_str!("ui/index.html"))
}

async fn ui_script() -> impl IntoResponse {
    (page_headers("text/javascript; charset=utf-8"), include_str!("ui/app.js"))
}

/// `GET /api/recent?class=&anomalies=&limit=`; values that do not parse fall back to the default.
#[derive(serde::Deserialize)]
struct RecentQuery {
    class: Option<String>,
    anomalies: Option<String>,
    limit: Option<String>,
}

async fn recent(State(s): State<ApiState>, Query(q): Query<RecentQuery>) -> impl IntoResponse {
    s.recent.watched();
    let limit = q.limit.and_then(|l| l.parse().ok()).unwrap_or(60).min(500);
    let anomalies = q.anomalies.is_some_and(|a| a == "true" || a == "1");
    Json(s.recent.list(q.class.as_deref().filter(|c| !c.is_empty()), anomalies, limit))
}

/// An id names one image for good (`inspect`), so the browser may keep its thumbnail; only the
/// browser (`private`): the response needed the read token.
async fn thumbnail(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.recent.thumbnail(&id) {
        Some(jpeg) => ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=3600, immutable")], jpeg).into_response(),
        None => (StatusCode::NOT_FOUND, "no such thumbnail (it may have left the ring buffer)\n").into_response(),
    }
}

/// Per class: recent raw scores with labels, and the threshold in force with where it came from.
async fn scores(State(s): State<ApiState>) -> impl IntoResponse {
    s.recent.watched();
    Json(serde_json::json!({"classes": s.recent.scores(), "thresholds": threshold_table(&s)}))
}

fn threshold_table(s: &ApiState) -> serde_json::Value {
    let active = s.models.current();
    let mut classes = active.engine.info.classes.clone();
    classes.push(crate::inference::model::DEFAULT_CLASS.into());
    let table: serde_json::Map<String, serde_json::Value> = classes
        .into_iter()
        .map(|class| {
            let (c, source) = active.scorer.calibration_in_force(Some(&class), s.thresholds.get(&active.model.version, &class));
            (class, serde_json::json!({"threshold": c.threshold, "source": source, "model_version": active.model.version}))
        })
        .collect();
    table.into()
}

async fn thresholds(State(s): State<ApiState>) -> impl IntoResponse {
    Json(threshold_table(&s))
}

#[derive(Deserialize)]
struct ThresholdRequest {
    /// Raw-score units; `null` goes back to the model's calibration.
    threshold: Option<f32>,
}

fn error(code: StatusCode, message: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({"error": message.to_string()}))).into_response()
}

async fn set_threshold(State(s): State<ApiState>, headers: HeaderMap, Path(class): Path<String>, body: Option<Json<ThresholdRequest>>) -> Response {
    let who = match auth::writer(&s.writers, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let Some(control) = &s.control else {
        return error(StatusCode::CONFLICT, "runtime changes are off: topics.control is empty");
    };
    let Some(Json(request)) = body else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON: {\"threshold\": <number or null>}");
    };
    let active = s.models.current();
    // The checks every replica makes again when it reads the change from the control topic.
    match check_threshold(&active.engine.info.classes, &class, request.threshold) {
        Ok(()) => {}
        Err(ThresholdRefusal::NotFinite) => return error(StatusCode::BAD_REQUEST, "threshold must be a finite number"),
        Err(ThresholdRefusal::UnknownClass) => {
            return error(StatusCode::NOT_FOUND, format!("the active model has no class {class:?} (classes: {:?})", active.engine.info.classes))
        }
    }
    let previous = Some(active.scorer.calibration_in_force(Some(&class), s.thresholds.get(&active.model.version, &class)).0.threshold);
    let change = Change::Threshold { class, model_version: active.model.version.clone(), threshold: request.threshold, previous, by: who, at: Change::now() };
    match control.publish(&change).await {
        Ok(()) => {
            s.metrics.emit(InternalEvent::ControlChange { kind: "threshold" });
            Json(change).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

async fn model(State(s): State<ApiState>) -> Response {
    Json(serde_json::json!({"active": s.models.current().describe(), "previous": s.models.previous().map(|p| p.describe())})).into_response()
}

#[derive(Deserialize)]
struct ModelRequest {
    /// A path on the pods or an `s3://` URI.
    uri: String,
}

async fn load_model(State(s): State<ApiState>, headers: HeaderMap, body: Option<Json<ModelRequest>>) -> Response {
    let who = match auth::writer(&s.writers, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let Some(Json(request)) = body else { return error(StatusCode::BAD_REQUEST, "body must be JSON: {\"uri\": \"<path or s3:// URI>\"}") };
    announce_model(&s, request.uri, who).await
}

async fn rollback_model(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let who = match auth::writer(&s.writers, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let Some(previous) = s.models.previous() else {
        return error(StatusCode::CONFLICT, "there is no previous model to roll back to");
    };
    announce_model(&s, previous.source.clone(), format!("{who} (rollback)")).await
}

/// Checks the model here first (a broken file is refused before any replica sees it), then
/// announces it on the control topic; every replica, this one included, loads and swaps it.
/// Every refusal gets the same answer, so the API cannot be used to probe the host's files.
async fn announce_model(s: &ApiState, uri: String, who: String) -> Response {
    let Some(control) = &s.control else {
        return error(StatusCode::CONFLICT, "runtime changes are off: topics.control is empty");
    };
    let sha256 = match s.models.check(&uri).await {
        Ok(sha256) => sha256,
        Err(e) => {
            s.metrics.emit(InternalEvent::ModelRejected { source: &uri, error: &format!("{e:#}") });
            return error(StatusCode::UNPROCESSABLE_ENTITY, active::REFUSED);
        }
    };
    let change = Change::Model { uri: uri.clone(), by: who, at: Change::now() };
    if let Err(e) = control.publish(&change).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"));
    }
    s.metrics.emit(InternalEvent::ControlChange { kind: "model" });
    // This replica loads it from the control topic; answer once the bytes checked serve (or failed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline {
        if s.models.serves(&uri, &sha256) {
            return Json(serde_json::json!({"announced": change, "active": s.models.current().describe()})).into_response();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    error(StatusCode::ACCEPTED, "announced; this replica has not swapped it in yet (see /api/model and the logs)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn state() -> ApiState {
        state_with(&[])
    }

    /// With settings from `DCAM__...` variables.
    fn state_with(env: &[(&str, &str)]) -> ApiState {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let settings = crate::config::Settings::load_with_env(None, env).unwrap();
        // Loading the model is the slow part; the env variables these tests set do not touch it.
        static ENGINE: std::sync::OnceLock<Arc<crate::inference::engine::Engine>> = std::sync::OnceLock::new();
        let engine = ENGINE.get_or_init(|| crate::inference::engine::load_configured(&settings).unwrap()).clone();
        ApiState {
            metrics: Metrics::new(),
            health: Health::new(),
            recent: Arc::new(Recent::new(1 << 20, 64)),
            models: Arc::new(ModelSlot::configured(engine, &settings).unwrap()),
            thresholds: Arc::new(RuntimeThresholds::default()),
            control: None,
            writers: Arc::default(),
            telemetry: Arc::new(settings.telemetry.clone()),
        }
    }

    async fn start(state: ApiState) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (listener.local_addr().unwrap(), tokio::spawn(serve(listener, state)))
    }

    /// A GET's status line and header lines, lower-cased.
    async fn head(addr: std::net::SocketAddr, path: &str) -> Vec<String> {
        get(addr, path, "127.0.0.1", None).await
    }

    /// A GET for `host`, with a bearer token if given: the status line and header lines, lower-cased.
    async fn get(addr: std::net::SocketAddr, path: &str, host: &str, token: Option<&str>) -> Vec<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        text.split("\r\n\r\n").next().unwrap_or_default().lines().map(str::to_string).collect()
    }

    fn status(lines: &[String]) -> u16 {
        lines[0].split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn reads_need_the_read_token_and_every_request_a_known_host() {
        let (addr, server) = start(state_with(&[("DCAM__TELEMETRY__READ_TOKEN", "r34d"), ("DCAM__TELEMETRY__ALLOWED_HOSTS", "dcam.example.com")])).await;
        let host = "dcam.example.com";
        for path in ["/api/recent", "/api/scores", "/api/thresholds", "/api/live", "/api/recent/0123-0/thumbnail"] {
            assert_eq!(status(&get(addr, path, host, None).await), 401, "{path} without a token");
            assert_eq!(status(&get(addr, path, host, Some("wrong")).await), 401, "{path} with a wrong token");
        }
        for path in ["/api/recent", "/api/scores", "/api/thresholds"] {
            assert_eq!(status(&get(addr, path, host, Some("r34d")).await), 200, "{path} with the read token");
        }
        assert_eq!(status(&get(addr, "/api/recent/0123-0/thumbnail", host, Some("r34d")).await), 404, "no such image, but allowed to ask");
        // The page's assets carry no data; the probes and metrics answer the kubelet and Prometheus by IP.
        for path in ["/ui", "/ui/app.js"] {
            assert_eq!(status(&get(addr, path, host, None).await), 200, "{path}");
        }
        for path in ["/healthz", "/metrics"] {
            assert_eq!(status(&get(addr, path, "10.0.0.7:9464", None).await), 200, "{path}");
        }
        // A page on another site that rebinds its name to this server is refused, token or not.
        let rebound = get(addr, "/api/recent", "evil.example:9464", Some("r34d")).await;
        assert_eq!(status(&rebound), 421, "{rebound:?}");
        assert!(rebound.iter().any(|h| h == "x-frame-options: deny"), "refusals carry the security headers too");
        assert_eq!(status(&get(addr, "/ui", "evil.example", None).await), 421);
        server.abort();
    }

    #[tokio::test]
    async fn past_the_connection_cap_only_the_probes_answer_and_idle_connections_are_closed() {
        let (addr, server) = start(state_with(&[("DCAM__TELEMETRY__MAX_CONNECTIONS", "4"), ("DCAM__TELEMETRY__MAX_LIVE_CLIENTS", "1")])).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(status(&head(addr, "/healthz").await), 200, "the probes still answer");
        let busy = head(addr, "/ui").await;
        assert_eq!(status(&busy), 503, "{busy:?}");
        // Connections that never send a request are closed after the head timeout.
        let started = tokio::time::Instant::now();
        for mut s in idle {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await.expect("closed within 15 s");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        assert!(started.elapsed() >= Duration::from_secs(5), "not before the timeout: {:?}", started.elapsed());
        assert_eq!(status(&head(addr, "/ui").await), 200, "seats free again");
        server.abort();
    }

    /// Opens `/api/live` and returns the stream (kept open) with its status.
    async fn live_client(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, u16) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /api/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        let code = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
        (s, code)
    }

    #[tokio::test]
    async fn live_streams_beyond_the_cap_are_refused_until_a_seat_frees() {
        let (addr, server) = start(state_with(&[("DCAM__TELEMETRY__MAX_LIVE_CLIENTS", "2")])).await;
        let (first, a) = live_client(addr).await;
        let (mut second, b) = live_client(addr).await;
        let (_, c) = live_client(addr).await;
        assert_eq!((a, b, c), (200, 200, 503));
        // The streams get the panel that one task computes each second.
        let mut text = Vec::new();
        while !String::from_utf8_lossy(&text).contains("images_per_second") {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await.expect("an event within 5 s").unwrap();
            text.extend_from_slice(&buf[..n]);
        }
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if live_client(addr).await.1 == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the closed stream's seat never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.abort();
    }

    #[tokio::test]
    async fn every_response_forbids_framing_and_sniffing() {
        let (addr, server) = start(state()).await;
        let paths = [
            ("/ui", 200),
            ("/ui/app.js", 200),
            ("/api/recent", 200),
            ("/api/thresholds", 200),
            ("/api/model", 200),
            ("/healthz", 200),
            ("/metrics", 200),
            ("/no-such-page", 404),
        ];
        for (path, status) in paths {
            let lines = head(addr, path).await;
            assert!(lines[0].starts_with(&format!("http/1.1 {status}")), "{path}: {lines:?}");
            assert!(lines.iter().any(|h| h == "x-frame-options: deny"), "{path}: {lines:?}");
            assert!(lines.iter().any(|h| h == "x-content-type-options: nosniff"), "{path}: {lines:?}");
        }
        let csp = head(addr, "/ui").await.into_iter().find(|h| h.starts_with("content-security-policy:")).expect("the page has a CSP");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        server.abort();
    }
}
