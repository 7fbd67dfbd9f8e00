//! Who may write: bearer tokens, each with a name that becomes the `by` of the changes made with
//! it. `telemetry.api_token` (a Kubernetes Secret in the chart) is the writer `operator`;
//! `telemetry.tokens_file` adds named writers, one `name:token` a line. Without any token every
//! write is refused, so a fresh install is read-only.

use anyhow::{bail, Context, Result};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::config::{Secret, TelemetrySettings};

/// The writer name of `telemetry.api_token`.
const API_TOKEN_WRITER: &str = "operator";

/// The tokens that may write, each with its writer's name.
#[derive(Default)]
pub struct Writers(Vec<(String, Secret)>);

impl Writers {
    /// `telemetry.api_token` and the writers of `telemetry.tokens_file` (read now).
    pub fn from_settings(t: &TelemetrySettings) -> Result<Self> {
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
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c)) {
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

/// The name of the writer whose bearer token the request carries, or the refusal to send.
pub(super) fn writer(writers: &Writers, headers: &HeaderMap) -> Result<String, Response> {
    let refuse = |code: StatusCode, message: &str| (code, Json(serde_json::json!({"error": message}))).into_response();
    if writers.0.is_empty() {
        return Err(refuse(StatusCode::FORBIDDEN, "writes are off: no telemetry.api_token or telemetry.tokens_file is configured"));
    }
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    // Every token is compared, so the time taken says nothing about which one (if any) matched.
    let mut found = None;
    for (name, token) in &writers.0 {
        if constant_time_eq(given.as_bytes(), token.expose().unwrap_or_default().as_bytes()) {
            found = Some(name);
        }
    }
    found.cloned().ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required for writes"))
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
