//! Who may call the HTTP API, and under which host name.
//!
//! Writes need the bearer token `telemetry.api_token` (a Kubernetes Secret in the chart); without
//! one every write is refused, so a fresh install is read-only. Reads of `/api` (images, ids,
//! attributes, scores) need `telemetry.read_token` once it is set, or the write token. Every
//! request's Host must be one of `telemetry.allowed_hosts` (when set), an IP address or
//! `localhost`: a page on another site that rebinds its own name to the pod cannot pass.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::ApiState;
use crate::config::Secret;

fn refuse(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({"error": message}))).into_response()
}

fn bearer(headers: &HeaderMap) -> &str {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default()
}

fn holds(token: &Secret, headers: &HeaderMap) -> bool {
    token.expose().is_some_and(|expected| constant_time_eq(bearer(headers).as_bytes(), expected.as_bytes()))
}

/// The writer's name for the audit trail (`X-Dcam-User`, else `api`), or the refusal to send.
pub(super) fn writer(token: &Secret, headers: &HeaderMap) -> Result<String, Response> {
    if token.expose().is_none() {
        return Err(refuse(StatusCode::FORBIDDEN, "writes are off: no telemetry.api_token is configured"));
    }
    if !holds(token, headers) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required for writes"));
    }
    let user = headers.get("x-dcam-user").and_then(|v| v.to_str().ok()).map(str::trim).filter(|u| !u.is_empty() && u.len() <= 128);
    Ok(user.unwrap_or("api").to_string())
}

/// Whether a read may go ahead: no read token configured, or the read or the write token given.
fn may_read(read_token: &Secret, write_token: &Secret, headers: &HeaderMap) -> bool {
    read_token.expose().is_none() || holds(read_token, headers) || holds(write_token, headers)
}

/// Middleware on the API's reads.
pub(super) async fn require_reader(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    if may_read(&s.settings.telemetry.read_token, &s.token, request.headers()) {
        next.run(request).await
    } else {
        refuse(StatusCode::UNAUTHORIZED, "a valid bearer token (telemetry.read_token) is required for reads")
    }
}

/// Whether a request's Host header names this server: any host when `allowed` is empty, else
/// one of `allowed`, an IP address or `localhost` (none of which a rebinding page can send).
fn known_host(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(authority) = headers.get(header::HOST).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<axum::http::uri::Authority>().ok()) else {
        return false;
    };
    let host = authority.host().trim_end_matches('.');
    host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.trim_end_matches('.').eq_ignore_ascii_case(host))
}

/// Middleware on every route: a request for another host name is refused (421).
pub(super) async fn require_known_host(State(s): State<ApiState>, request: Request, next: Next) -> Response {
    if known_host(&s.settings.telemetry.allowed_hosts, request.headers()) {
        next.run(request).await
    } else {
        refuse(StatusCode::MISDIRECTED_REQUEST, "this host name is not in telemetry.allowed_hosts")
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8;
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0 && a.len() == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, value.parse().unwrap());
        h
    }

    #[test]
    fn reads_need_the_read_token_once_it_is_set() {
        let (read, write) = (Secret::new("r34d"), Secret::new("wr1te"));
        assert!(may_read(&Secret::default(), &write, &headers(None)), "no read token: reads are open");
        assert!(may_read(&read, &write, &headers(Some("Bearer r34d"))));
        assert!(may_read(&read, &write, &headers(Some("Bearer wr1te"))), "the write token reads too");
        for wrong in [None, Some("Bearer nope"), Some("r34d"), Some("Bearer ")] {
            assert!(!may_read(&read, &write, &headers(wrong)), "{wrong:?}");
            assert!(!may_read(&read, &Secret::default(), &headers(wrong)), "no write token configured: an empty bearer is no token");
        }
    }

    #[test]
    fn only_listed_hosts_ips_and_localhost_pass_the_host_check() {
        let allowed = vec!["dcam.example.com".to_string()];
        for ok in ["dcam.example.com", "DCAM.example.com:443", "dcam.example.com.", "10.1.2.3:9464", "[::1]:9464", "localhost:9464"] {
            assert!(known_host(&allowed, &host(ok)), "{ok}");
        }
        for refused in ["evil.example", "dcam.example.com.evil.example", "evil.example:9464"] {
            assert!(!known_host(&allowed, &host(refused)), "{refused}");
        }
        assert!(!known_host(&allowed, &HeaderMap::new()), "no Host header");
        assert!(known_host(&[], &host("anything.example")), "no list: no check");
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn writes_need_the_configured_token() {
        let token = Secret::new("s3cret");
        assert!(writer(&token, &headers(Some("Bearer s3cret"))).is_ok());
        for wrong in [None, Some("Bearer nope"), Some("s3cret"), Some("Bearer s3cre"), Some("Bearer s3cret2")] {
            assert_eq!(writer(&token, &headers(wrong)).unwrap_err().status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
        assert_eq!(writer(&Secret::default(), &headers(Some("Bearer "))).unwrap_err().status(), StatusCode::FORBIDDEN, "no token configured: writes are off");
    }
}
