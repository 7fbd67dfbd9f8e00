//! The HTTP server on the telemetry port: `/metrics`, `/healthz`, `/readyz`, the inspection
//! page (`/ui`, assets compiled into the binary) and its API. Reads are open; every write
//! (thresholds, model) needs `Authorization: Bearer <telemetry.api_token>` and is refused when no
//! token is configured. Data never reaches HTML from here: the page renders JSON with
//! `textContent` only, under a Content-Security-Policy that allows no inline script. No response
//! may be framed or content-sniffed.

mod auth;
mod live;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::config::{Secret, Settings};
use crate::control::{Change, Control};
use crate::inference::active::{self, ModelSlot};
use crate::inference::model::RuntimeThresholds;
use crate::inspect::Recent;
use crate::telemetry::{Health, InternalEvent, Metrics, ThresholdLabels};

/// Everything the endpoints read or change.
#[derive(Clone)]
pub struct ApiState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub recent: Arc<Recent>,
    pub models: Option<Arc<ModelSlot>>,
    pub thresholds: Arc<RuntimeThresholds>,
    /// Off (`None`) when `topics.control` is empty: then nothing can be changed at runtime.
    pub control: Option<Arc<Control>>,
    pub token: Secret,
    pub settings: Arc<Settings>,
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> Result<()> {
    axum::serve(listener, router(state)).await.context("http server")
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(|| async { axum::response::Redirect::temporary("/ui") }))
        .route("/ui", get(ui_page))
        .route("/ui/app.js", get(ui_script))
        .route("/api/recent", get(recent))
        .route("/api/recent/{id}/thumbnail", get(thumbnail))
        .route("/api/scores", get(scores))
        .route("/api/live", get(live::stream))
        .route("/api/thresholds", get(thresholds))
        .route("/api/thresholds/{class}", put(set_threshold))
        .route("/api/model", get(model).post(load_model))
        .route("/api/model/rollback", post(rollback_model))
        .with_state(state)
        .layer(axum::middleware::map_response(security_headers))
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
    if let (Some(models), serde_json::Value::Object(o)) = (&s.models, &mut body) {
        o.insert("model".into(), models.current().describe());
    }
    (if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

const PAGE_CSP: &str = "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// The page's headers: no inline script, nothing from elsewhere, never framed, never cached stale.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 3] {
    [(header::CONTENT_TYPE, content_type), (header::CONTENT_SECURITY_POLICY, PAGE_CSP), (header::CACHE_CONTROL, "no-cache")]
}

async fn ui_page(State(s): State<ApiState>) -> impl IntoResponse {
    s.recent.watched();
    (page_headers("text/html; charset=utf-8"), include_str!("ui/index.html"))
}

async fn ui_script() -> impl IntoResponse {
    (page_headers("text/javascript; charset=utf-8"), include_str!("ui/app.js"))
}

fn query(raw: &Option<String>) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(raw.as_deref().unwrap_or_default().as_bytes()).into_owned().collect()
}

async fn recent(State(s): State<ApiState>, RawQuery(raw): RawQuery) -> impl IntoResponse {
    s.recent.watched();
    let q = query(&raw);
    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(60).min(500);
    let anomalies = q.get("anomalies").is_some_and(|a| a == "true" || a == "1");
    Json(s.recent.list(q.get("class").map(String::as_str).filter(|c| !c.is_empty()), anomalies, limit))
}

async fn thumbnail(State(s): State<ApiState>, Path(id): Path<u64>) -> Response {
    match s.recent.thumbnail(id) {
        Some(jpeg) => ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=3600")], jpeg).into_response(),
        None => (StatusCode::NOT_FOUND, "no such thumbnail (it may have left the ring buffer)\n").into_response(),
    }
}

/// Per class: recent raw scores with labels, and the threshold in force with where it came from.
async fn scores(State(s): State<ApiState>) -> impl IntoResponse {
    s.recent.watched();
    Json(serde_json::json!({"classes": s.recent.scores(), "thresholds": threshold_table(&s)}))
}

fn threshold_table(s: &ApiState) -> serde_json::Value {
    let Some(models) = &s.models else { return serde_json::json!({}) };
    let active = models.current();
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
    let who = match auth::writer(&s.token, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let (Some(control), Some(models)) = (&s.control, &s.models) else {
        return error(StatusCode::CONFLICT, "runtime changes are off: topics.control is empty");
    };
    let Some(Json(request)) = body else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON: {\"threshold\": <number or null>}");
    };
    if request.threshold.is_some_and(|t| !t.is_finite()) {
        return error(StatusCode::BAD_REQUEST, "threshold must be a finite number");
    }
    let active = models.current();
    if class != crate::inference::model::DEFAULT_CLASS && !active.engine.info.classes.contains(&class) {
        return error(StatusCode::NOT_FOUND, format!("the active model has no class {class:?} (classes: {:?})", active.engine.info.classes));
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
    let Some(models) = &s.models else { return error(StatusCode::NOT_FOUND, "no model in this process") };
    Json(serde_json::json!({"active": models.current().describe(), "previous": models.previous().map(|p| p.describe())})).into_response()
}

#[derive(Deserialize)]
struct ModelRequest {
    /// A path on the pods or an `s3://` URI.
    uri: String,
}

async fn load_model(State(s): State<ApiState>, headers: HeaderMap, body: Option<Json<ModelRequest>>) -> Response {
    let who = match auth::writer(&s.token, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let Some(Json(request)) = body else { return error(StatusCode::BAD_REQUEST, "body must be JSON: {\"uri\": \"<path or s3:// URI>\"}") };
    announce_model(&s, request.uri, who).await
}

async fn rollback_model(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let who = match auth::writer(&s.token, &headers) {
        Ok(who) => who,
        Err(refusal) => return refusal,
    };
    let Some(previous) = s.models.as_ref().and_then(|m| m.previous()) else {
        return error(StatusCode::CONFLICT, "there is no previous model to roll back to");
    };
    announce_model(&s, previous.source.clone(), format!("{who} (rollback)")).await
}

/// Checks the model here first (a broken file is refused before any replica sees it), then
/// announces it on the control topic; every replica, this one included, loads and swaps it.
/// Every refusal gets the same answer, so the API cannot be used to probe the host's files.
async fn announce_model(s: &ApiState, uri: String, who: String) -> Response {
    let (Some(control), Some(models)) = (&s.control, &s.models) else {
        return error(StatusCode::CONFLICT, "runtime changes are off: topics.control is empty");
    };
    let sha256 = match models.check(&uri).await {
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
        if models.serves(&uri, &sha256) {
            return Json(serde_json::json!({"announced": change, "active": models.current().describe()})).into_response();
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
        ApiState {
            metrics: Metrics::new(),
            health: Health::new(),
            recent: Arc::new(Recent::new(1 << 20, 64)),
            models: None,
            thresholds: Arc::new(RuntimeThresholds::default()),
            control: None,
            token: Secret::default(),
            settings: Arc::new(Settings::load_with_env(None, std::iter::empty()).unwrap()),
        }
    }

    /// A GET's status line and header lines, lower-cased.
    async fn head(addr: std::net::SocketAddr, path: &str) -> Vec<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        text.split("\r\n\r\n").next().unwrap_or_default().lines().map(str::to_string).collect()
    }

    #[tokio::test]
    async fn every_response_forbids_framing_and_sniffing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, state()));
        let paths = [
            ("/ui", 200),
            ("/ui/app.js", 200),
            ("/api/recent", 200),
            ("/api/thresholds", 200),
            ("/api/model", 404),
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
