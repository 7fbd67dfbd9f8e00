//! Who may write: a bearer token from `telemetry.api_token` (a Kubernetes Secret in the chart).
//! Without a configured token every write is refused, so a fresh install is read-only.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::config::Secret;

/// The writer's name for the audit trail (`X-Dcam-User`, else `api`), or the refusal to send.
pub(super) fn writer(token: &Secret, headers: &HeaderMap) -> Result<String, Response> {
    let refuse = |code: StatusCode, message: &str| (code, Json(serde_json::json!({"error": message}))).into_response();
    let Some(expected) = token.expose() else {
        return Err(refuse(StatusCode::FORBIDDEN, "writes are off: no telemetry.api_token is configured"));
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required for writes"));
    }
    let user = headers.get("x-dcam-user").and_then(|v| v.to_str().ok()).map(str::trim).filter(|u| !u.is_empty() && u.len() <= 128);
    Ok(user.unwrap_or("api").to_string())
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
        let token = Secret::new("s3cret");
        assert!(writer(&token, &headers(Some("Bearer s3cret"))).is_ok());
        for wrong in [None, Some("Bearer nope"), Some("s3cret"), Some("Bearer s3cre"), Some("Bearer s3cret2")] {
            assert_eq!(writer(&token, &headers(wrong)).unwrap_err().status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
        assert_eq!(writer(&Secret::default(), &headers(Some("Bearer "))).unwrap_err().status(), StatusCode::FORBIDDEN, "no token configured: writes are off");
    }
}
