//! Who may call the HTTP API, and under which host name.
//!
//! Writes need a writer's bearer token; each writer has a name that becomes the `by` of the changes
//! made with it. `telemetry.api_token` (a Kubernetes Secret in the chart) is the writer `operator`;
//! `telemetry.tokens_file` adds named writers, one `name:token` a line. Without any token every write
//! is refused, so a fresh install is read-only. Reads of `/api` (images, ids, attributes, scores) need
//! `telemetry.read_token` once it is set, or a writer's token. Every request's Host must be one of
//! `telemetry.allowed_hosts` (when set), an IP address or `localhost`: a page on another site that
//! rebinds its own name to the pod cannot pass.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use subtle::ConstantTimeEq;

use crate::config::{Secret, TelemetrySettings};

/// The writer name of `telemetry.api_token`.
const API_TOKEN_WRITER: &str = "operator";

/// The tokens that may write, each with its writer's name.
#[derive(Default)]
pub(crate) struct Writers(Vec<(String, Secret)>);

impl Writers {
    /// `telemetry.api_token` and the writers of `telemetry.tokens_file` (read now).
    pub(crate) fn from_settings(t: &TelemetrySettings) -> Result<Self> {
        let file = match &t.tokens_file {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading telemetry.tokens_file {path}"))?,
            None => String::new(),
        };
        Self::parse(&file, &t.api_token).with_context(|| format!("telemetry.tokens_file {}", t.tokens_file.as_deref().unwrap_or_default()))
    }

    /// Errors name the line, never the token.
    fn parse(file: &str, api_token: &Secret) -> Result<Self> {
        let mut writers: Vec<(String, Secret)> = api_token.expose().map(|_| (API_TOKEN_WRITER.to_string(), api_token.clone())).into_iter().collect();
        for (n, line) in file.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((name, token)) = line.split_once(':').map(|(n, t)| (n.trim(), t.trim())) else {
                bail!("line {n} is not name:token");
            };
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| crate::event::is_safe_char(c, "._@-")) {
                bail!("line {n}: a writer name is 1-64 of [A-Za-z0-9._@-]");
            }
            if token.is_empty() {
                bail!("line {n}: the token of {name} is empty");
            }
            if writers.iter().any(|(known, t)| known == name || t.expose() == Some(token)) {
                bail!("line {n}: {name} or its token is given twice (\"{API_TOKEN_WRITER}\" is telemetry.api_token's)");
            }
            writers.push((name.to_string(), Secret::new(token)));
        }
        Ok(Self(writers))
    }

    #[cfg(test)]
    fn single(token: &str) -> Self {
        Self::parse("", &Secret::new(token)).expect("a valid token")
    }
}

pub(super) fn refuse(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({"error": message}))).into_response()
}

fn bearer(headers: &HeaderMap) -> &str {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default()
}

fn holds(token: &Secret, headers: &HeaderMap) -> bool {
    // Compared without an early exit, so the time taken says nothing about the token.
    token.expose().is_some_and(|expected| bool::from(bearer(headers).as_bytes().ct_eq(expected.as_bytes())))
}

/// The name of the writer whose bearer token the request carries, or the refusal to send.
#[allow(clippy::result_large_err)] // the refusal is the handler's response, returned as it is
pub(super) fn writer(writers: &Writers, headers: &HeaderMap) -> Result<String, Response> {
    if writers.0.is_empty() {
        return Err(refuse(StatusCode::FORBIDDEN, "writes are off: no telemetry.api_token or telemetry.tokens_file is configured"));
    }
    // Every token is compared, so the time taken says nothing about which one (if any) matched.
    let mut found = None;
    for (name, token) in &writers.0 {
        if holds(token, headers) {
            found = Some(name);
        }
    }
    found.cloned().ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required for writes"))
}

/// Whether a read may go ahead: no read token configured, or the read token or a writer's given.
pub(super) fn may_read(read_token: &Secret, writers: &Writers, headers: &HeaderMap) -> bool {
    // `|` rather than `||`: every token is compared whatever matched first.
    read_token.expose().is_none() | holds(read_token, headers) | writers.0.iter().fold(false, |any, (_, t)| any | holds(t, headers))
}

/// Whether a request's Host header names this server: any host when `allowed` is empty, else
/// one of `allowed`, an IP address or `localhost` (none of which a rebinding page can send).
pub(super) fn known_host(allowed: &[String], headers: &HeaderMap) -> bool {
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
        let (read, write) = (Secret::new("r34d"), Writers::parse("alice:al1ce\n", &Secret::new("wr1te")).unwrap());
        assert!(may_read(&Secret::default(), &write, &headers(None)), "no read token: reads are open");
        assert!(may_read(&read, &write, &headers(Some("Bearer r34d"))));
        assert!(may_read(&read, &write, &headers(Some("Bearer wr1te"))), "the write token reads too");
        assert!(may_read(&read, &write, &headers(Some("Bearer al1ce"))), "and a named writer's");
        for wrong in [None, Some("Bearer nope"), Some("r34d"), Some("Bearer ")] {
            assert!(!may_read(&read, &write, &headers(wrong)), "{wrong:?}");
            assert!(!may_read(&read, &Writers::default(), &headers(wrong)), "no write token configured: an empty bearer is no token");
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
        let writers = Writers::single("s3cret");
        assert_eq!(writer(&writers, &headers(Some("Bearer s3cret"))).ok().as_deref(), Some("operator"));
        for wrong in [None, Some("Bearer nope"), Some("s3cret"), Some("Bearer s3cre"), Some("Bearer s3cret2")] {
            assert_eq!(writer(&writers, &headers(wrong)).unwrap_err().status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
        assert_eq!(writer(&Writers::default(), &headers(Some("Bearer "))).unwrap_err().status(), StatusCode::FORBIDDEN, "no token configured: writes are off");
    }

    #[test]
    fn each_token_names_its_writer() {
        let file = "# line 7\nalice: tok-alice-1\n\nbob@line7:tok:with:colons\n";
        let writers = Writers::parse(file, &Secret::new("ops-token")).unwrap();
        let mut with_user = headers(Some("Bearer tok-alice-1"));
        with_user.insert("x-dcam-user", "mallory".parse().unwrap());
        assert_eq!(writer(&writers, &with_user).ok().as_deref(), Some("alice"), "the header names nobody");
        assert_eq!(writer(&writers, &headers(Some("Bearer tok:with:colons"))).ok().as_deref(), Some("bob@line7"));
        assert_eq!(writer(&writers, &headers(Some("Bearer ops-token"))).ok().as_deref(), Some("operator"));
        assert_eq!(writer(&writers, &headers(Some("Bearer tok-alice"))).unwrap_err().status(), StatusCode::UNAUTHORIZED);
        let only_file = Writers::parse("carol:c-token\n", &Secret::default()).unwrap();
        assert_eq!(writer(&only_file, &headers(Some("Bearer c-token"))).ok().as_deref(), Some("carol"));
        for (bad, why) in [
            ("alice\n", "line 1 is not name:token"),
            ("a b:x\n", "line 1: a writer name"),
            ("alice:\n", "token of alice is empty"),
            ("alice:x\nalice:y\n", "line 2"),
            ("alice:ops-token\n", "line 1"),
            ("operator:x\n", "line 1"),
        ] {
            let err = Writers::parse(bad, &Secret::new("ops-token")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(!err.contains("ops-token") && !err.contains(":x"), "errors never show a token: {err}");
        }
    }
}
