//! Event schemas (docs/DESIGN.md §2, §3): parsing input events and the records we publish.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Why an input went to the dead-letter topic; the wire value of `dcam-error-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Schema,
    Decode,
    TooLarge,
    UnsupportedFormat,
    Fetch,
    Inference,
    /// The model ran but its score for this image is not a finite number (NaN or infinite).
    ModelOutput,
    /// A bug (a caught panic) on this input; the operator keeps running.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] =
        [Self::Schema, Self::Decode, Self::TooLarge, Self::UnsupportedFormat, Self::Fetch, Self::Inference, Self::ModelOutput, Self::Internal];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schema => "schema",
            Self::Decode => "decode",
            Self::TooLarge => "too_large",
            Self::UnsupportedFormat => "unsupported_format",
            Self::Fetch => "fetch",
            Self::Inference => "inference",
            Self::ModelOutput => "model_output",
            Self::Internal => "internal",
        }
    }
}

/// A failure that sends the input to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: ErrorKind,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

/// Where an input came from; copied into every output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker or producer timestamp, milliseconds since the epoch.
    pub timestamp: Option<i64>,
}

/// `topic/partition/offset`: how a record is named in the `dcam-source` header and in logs.
pub(crate) fn record_name(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// Where the image bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The record value itself is the image (a raw-bytes event): decoded from the record's bytes,
    /// which stay with the job for a dead letter, rather than from a copy of them.
    RecordValue,
    /// Decoded from the envelope's base64.
    Inline(Vec<u8>),
    Uri(String),
}

/// An input event after schema parsing, before the image is decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEvent {
    pub image_id: String,
    pub class: Option<String>,
    pub image: ImageSource,
    pub content_type: Option<String>,
    pub captured_at: Option<String>,
    pub attributes: serde_json::Value,
}

// Unknown top-level fields are ignored so producers can add fields without breaking us.
#[serde_with::serde_as]
#[derive(Deserialize)]
struct Envelope<'a> {
    image_id: Option<serde_json::Value>,
    class: Option<String>,
    /// Borrowed from the record value when it has nothing to unescape (base64 rarely has: only a
    /// `\/` some encoders write), so the payload's text is not copied before it is decoded.
    #[serde(borrow)]
    #[serde_as(as = "Option<serde_with::BorrowCow>")]
    image: Option<std::borrow::Cow<'a, str>>,
    image_uri: Option<String>,
    content_type: Option<String>,
    captured_at: Option<String>,
    #[serde(default)]
    attributes: Option<serde_json::Value>,
}

/// `dcam-error-kind` of a dead letter that replaces an output the broker refused.
pub(crate) const TOO_LARGE_OUTPUT: &str = "too_large_output";
pub(crate) const HEADER_IMAGE_ID: &str = "dcam-image-id";
pub(crate) const HEADER_CLASS: &str = "dcam-class";
/// A dead letter's error kind and message (docs/DESIGN.md, dead-letter headers).
pub(crate) const HEADER_ERROR_KIND: &str = "dcam-error-kind";
pub(crate) const HEADER_ERROR: &str = "dcam-error";
/// The input an output or dead letter is for, `topic/partition/offset` (`record_name`).
pub(crate) const HEADER_SOURCE: &str = "dcam-source";

/// What an image id may hold besides ASCII letters and digits (docs/DESIGN.md §2).
pub(crate) const ID_PUNCTUATION: &str = "._:-";
/// What a heatmap key segment, group or transactional id may hold besides letters and digits.
pub(crate) const NAME_PUNCTUATION: &str = "._-";

/// An ASCII letter or digit, or one of `punctuation`.
pub(crate) fn is_safe_char(c: char, punctuation: &str) -> bool {
    c.is_ascii_alphanumeric() || punctuation.contains(c)
}

/// `s` with every character that is not safe (`is_safe_char`) replaced by `_`.
pub(crate) fn replace_unsafe(s: &str, punctuation: &str) -> String {
    s.chars().map(|c| if is_safe_char(c, punctuation) { c } else { '_' }).collect()
}

/// Checks an id against docs/DESIGN.md §2: 1–256 chars of `[A-Za-z0-9._:-]`.
pub fn validate_image_id(id: &str) -> Result<(), Rejection> {
    let ok_len = (1..=256).contains(&id.len());
    let ok_chars = id.chars().all(|c| is_safe_char(c, ID_PUNCTUATION));
    if ok_len && ok_chars {
        Ok(())
    } else {
        let shown: String = id.chars().take(64).collect();
        Err(Rejection::new(ErrorKind::Schema, format!("invalid image_id {shown:?}: need 1-256 chars of [A-Za-z0-9._:-]")))
    }
}

/// docs/DESIGN.md §2: 1–128 characters (not bytes, as the schema's `maxLength` counts), none a control character.
fn validate_class(class: &str) -> Result<(), Rejection> {
    if class.is_empty() || class.chars().count() > 128 || class.chars().any(|c| c.is_control()) {
        return Err(Rejection::new(ErrorKind::Schema, "class must be 1-128 printable characters"));
    }
    Ok(())
}

/// Parses a Kafka record value (plus id/class headers) into an event.
/// A value starting with `{` is a JSON envelope; anything else is raw image bytes.
pub fn parse_event(value: Option<&[u8]>, header_id: Option<&str>, header_class: Option<&str>, source: &SourceRef) -> Result<ImageEvent, Rejection> {
    let value = value.unwrap_or_default();
    if value.is_empty() {
        return Err(Rejection::new(ErrorKind::Schema, "empty payload"));
    }
    let first = value.iter().copied().find(|b| !b.is_ascii_whitespace());
    if first == Some(b'{') {
        parse_envelope(value)
    } else {
        let image_id = match header_id {
            Some(id) => id.to_string(),
            None => format!("{}-{}-{}", source.topic, source.partition, source.offset),
        };
        validate_image_id(&image_id)?;
        if let Some(c) = header_class {
            validate_class(c)?;
        }
        Ok(ImageEvent {
            image_id,
            class: header_class.map(str::to_string),
            image: ImageSource::RecordValue,
            content_type: None,
            captured_at: None,
            attributes: serde_json::Value::Null,
        })
    }
}

fn parse_envelope(value: &[u8]) -> Result<ImageEvent, Rejection> {
    let env: Envelope = serde_json::from_slice(value).map_err(|e| Rejection::new(ErrorKind::Schema, format!("not a valid JSON envelope: {e}")))?;
    let image_id = match env.image_id {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => return Err(Rejection::new(ErrorKind::Schema, format!("image_id must be a string, got {other}"))),
        None => return Err(Rejection::new(ErrorKind::Schema, "missing required field image_id")),
    };
    validate_image_id(&image_id)?;
    if let Some(c) = &env.class {
        validate_class(c)?;
    }
    let image = match (env.image, env.image_uri) {
        (Some(b64), None) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| Rejection::new(ErrorKind::Decode, format!("image is not valid base64: {e}")))?;
            if bytes.is_empty() {
                return Err(Rejection::new(ErrorKind::Schema, "image is empty"));
            }
            ImageSource::Inline(bytes)
        }
        (None, Some(uri)) => ImageSource::Uri(uri),
        (Some(_), Some(_)) => return Err(Rejection::new(ErrorKind::Schema, "exactly one of image and image_uri is allowed, got both")),
        (None, None) => return Err(Rejection::new(ErrorKind::Schema, "one of image (base64) or image_uri is required")),
    };
    let attributes = env.attributes.unwrap_or(serde_json::Value::Null);
    if !(attributes.is_null() || attributes.is_object()) {
        return Err(Rejection::new(ErrorKind::Schema, "attributes must be a JSON object"));
    }
    Ok(ImageEvent { image_id, class: env.class, image, content_type: env.content_type, captured_at: env.captured_at, attributes })
}

/// Headers of a raw input event (the image bytes are the record value): its id and class.
pub(crate) fn raw_event_headers(image_id: &str, class: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let mut headers = vec![(HEADER_IMAGE_ID.to_string(), image_id.as_bytes().to_vec())];
    if let Some(c) = class {
        headers.push((HEADER_CLASS.to_string(), c.as_bytes().to_vec()));
    }
    headers
}

/// Builds a JSON envelope (used by `produce` and the tests).
pub(crate) fn envelope_json(image_id: &str, class: Option<&str>, bytes: &[u8], content_type: &str) -> Vec<u8> {
    let mut v = serde_json::json!({
        "image_id": image_id,
        "image": base64::engine::general_purpose::STANDARD.encode(bytes),
        "content_type": content_type,
        "captured_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(c) = class {
        v["class"] = serde_json::Value::String(c.to_string());
    }
    serde_json::to_vec(&v).expect("json")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ModelRef {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Latency {
    /// From the record's timestamp to the moment we consumed it.
    pub queue: f64,
    /// The batch's model run.
    pub inference: f64,
    /// From consume to publish.
    pub total: f64,
}

/// The major version of the score record's schema (`schemas/score.json`; the compatibility policy
/// is in `schemas/README.md`): fields may be added within it, never removed, renamed or retyped.
pub(crate) const SCORE_SCHEMA_VERSION: u32 = 1;

/// One record on the scores topic (docs/DESIGN.md §3, `schemas/score.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScoreRecord {
    /// `SCORE_SCHEMA_VERSION`; records written before it existed read as 1.
    #[serde(default = "first_schema_version")]
    pub schema_version: u32,
    pub image_id: String,
    pub class: Option<String>,
    pub score: f32,
    pub raw_score: f32,
    pub threshold: f32,
    /// Where `threshold` came from: the model's calibration, the configuration, or a runtime change.
    #[serde(default)]
    pub threshold_source: ThresholdSource,
    pub is_anomaly: bool,
    pub heatmap_uri: Option<String>,
    pub model: ModelRef,
    pub source: SourceRef,
    pub scored_at: String,
    pub latency_ms: Latency,
    pub attributes: serde_json::Value,
}

fn first_schema_version() -> u32 {
    1
}

/// Where the threshold an image was judged with came from (it is on every score record).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ThresholdSource {
    /// The model's own calibration (`dcam.calibration`).
    #[default]
    Model,
    /// `model.thresholds` in the configuration.
    Config,
    /// Set at runtime through the API / control topic.
    Runtime,
}

/// Headers carried over to outputs and to dead letters.
pub(crate) type Headers = Vec<(String, Vec<u8>)>;

pub(crate) fn header_str<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// Whether a header is one the operator writes on a dead letter (`dcam-error*`,
/// `dcam-original-error*`, `dcam-source`): a new dead letter and a redrive drop the incoming ones,
/// so a record that fails again carries only its current error.
pub(crate) fn is_dead_letter_header(name: &str) -> bool {
    name.starts_with("dcam-error") || name.starts_with("dcam-original-error") || name == HEADER_SOURCE
}

/// Dead-letter headers: the originals (less stale dead-letter headers) plus the error description.
pub(crate) fn dead_letter_headers(original: &Headers, rejection: &Rejection, source: &SourceRef) -> Headers {
    let mut h: Headers = original.iter().filter(|(k, _)| !is_dead_letter_header(k)).cloned().collect();
    h.push((HEADER_ERROR_KIND.into(), rejection.kind.as_str().as_bytes().to_vec()));
    h.push((HEADER_ERROR.into(), rejection.message.as_bytes().to_vec()));
    h.push((HEADER_SOURCE.into(), record_name(&source.topic, source.partition, source.offset).into_bytes()));
    h
}

/// Keeps a copy of just the W3C trace headers, to continue the trace on outputs.
pub(crate) fn trace_headers(headers: &Headers) -> BTreeMap<String, String> {
    headers.iter().filter(|(k, _)| k == "traceparent" || k == "tracestate").filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.clone()).ok()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> SourceRef {
        SourceRef { topic: "images".into(), partition: 2, offset: 41, timestamp: None }
    }

    #[test]
    fn the_base64_payload_is_borrowed_from_the_record_not_copied() {
        let value = envelope_json("cam-1", Some("bottle"), &[7u8; 3000], "image/png");
        let env: Envelope = serde_json::from_slice(&value).unwrap();
        assert!(matches!(env.image, Some(std::borrow::Cow::Borrowed(_))), "the image text is a slice of the record value");
        let escaped = br#"{"image_id": "x", "image": "iVBO\/w=="}"#;
        let env: Envelope = serde_json::from_slice(escaped).unwrap();
        assert_eq!(env.image.as_deref(), Some("iVBO/w=="), "an escaped slash still reads (owned)");
    }

    #[test]
    fn raw_bytes_take_id_from_header_or_position() {
        let e = parse_event(Some(b"\x89PNG...."), Some("cam-1"), Some("bottle"), &src()).unwrap();
        assert_eq!(e.image_id, "cam-1");
        assert_eq!(e.class.as_deref(), Some("bottle"));
        let e = parse_event(Some(b"\xff\xd8\xff"), None, None, &src()).unwrap();
        assert_eq!(e.image_id, "images-2-41");
        assert_eq!(e.image, ImageSource::RecordValue, "raw bytes are decoded from the record itself, not copied");
        assert_eq!(e.class, None);
    }

    #[test]
    fn envelope_round_trip() {
        let v = envelope_json("a:b.c-1", Some("tile"), b"abc", "image/png");
        let e = parse_event(Some(&v), None, None, &src()).unwrap();
        assert_eq!(e.image_id, "a:b.c-1");
        assert_eq!(e.image, ImageSource::Inline(b"abc".to_vec()));
        assert_eq!(e.class.as_deref(), Some("tile"));
    }

    #[test]
    fn malformed_envelopes_are_rejected_with_kind() {
        let cases: Vec<(&[u8], ErrorKind, &str)> = vec![
            (b"", ErrorKind::Schema, "empty"),
            (b"{not json", ErrorKind::Schema, "JSON"),
            (br#"{"image": "AAAA"}"#, ErrorKind::Schema, "image_id"),
            (br#"{"image_id": "bad id!", "image": "AAAA"}"#, ErrorKind::Schema, "invalid image_id"),
            (br#"{"image_id": 7, "image": "AAAA"}"#, ErrorKind::Schema, "string"),
            (br#"{"image_id": "x", "image": "@@@"}"#, ErrorKind::Decode, "base64"),
            (br#"{"image_id": "x"}"#, ErrorKind::Schema, "required"),
            (br#"{"image_id": "x", "image": "AAAA", "image_uri": "file:///a"}"#, ErrorKind::Schema, "both"),
            (br#"{"image_id": "x", "image": "AAAA", "attributes": [1]}"#, ErrorKind::Schema, "attributes"),
        ];
        for (value, kind, needle) in cases {
            let err = parse_event(Some(value), None, None, &src()).unwrap_err();
            assert_eq!(err.kind, kind, "{}", String::from_utf8_lossy(value));
            assert!(err.message.contains(needle), "{} -> {}", String::from_utf8_lossy(value), err.message);
        }
        let long = "x".repeat(257);
        assert!(validate_image_id(&long).is_err());
        assert!(validate_image_id(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn class_length_counts_characters_not_bytes() {
        let envelope = |class: &str| serde_json::to_vec(&serde_json::json!({"image_id": "x", "class": class, "image": "AAAA"})).unwrap();
        // 128 two-byte characters are 256 bytes: within the limit, as the schema's maxLength says.
        let e = parse_event(Some(&envelope(&"é".repeat(128))), None, None, &src()).unwrap();
        assert_eq!(e.class.unwrap().chars().count(), 128);
        assert!(parse_event(Some(b"\x89PNG"), None, Some(&"é".repeat(128)), &src()).is_ok(), "the dcam-class header too");
        let err = parse_event(Some(&envelope(&"é".repeat(129))), None, None, &src()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Schema);
        assert!(err.message.contains("1-128"), "{}", err.message);
    }

    #[test]
    fn dead_letter_headers_keep_originals() {
        let orig: Headers = vec![("traceparent".into(), b"00-abc".to_vec()), ("dcam-error".into(), b"old".to_vec())];
        let h = dead_letter_headers(&orig, &Rejection::new(ErrorKind::TooLarge, "12 MB"), &src());
        assert_eq!(header_str(&h, "traceparent"), Some("00-abc"));
        assert_eq!(header_str(&h, "dcam-error-kind"), Some("too_large"));
        assert_eq!(header_str(&h, "dcam-error"), Some("12 MB"));
        assert_eq!(header_str(&h, "dcam-source"), Some("images/2/41"));
        assert_eq!(h.iter().filter(|(k, _)| k == "dcam-error").count(), 1);
    }

    /// A redriven record that fails again arrives with the headers of its earlier dead letter (and
    /// a stand-in's dcam-original-error*): its new dead letter carries only the current ones.
    #[test]
    fn dead_letter_headers_replace_stale_error_headers() {
        let stale: Headers = [
            ("dcam-error-kind", "fetch"),
            ("dcam-error", "no such file"),
            ("dcam-original-error-kind", "decode"),
            ("dcam-original-error", "bad base64"),
            ("dcam-source", "images/0/3"),
            ("dcam-redriven-from", "images.dlq/0/7"),
            ("line", "3"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let h = dead_letter_headers(&stale, &Rejection::new(ErrorKind::Decode, "truncated PNG"), &src());
        let names: Vec<&str> = h.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["dcam-redriven-from", "line", "dcam-error-kind", "dcam-error", "dcam-source"], "{h:?}");
        assert_eq!(header_str(&h, "dcam-error-kind"), Some("decode"));
        assert_eq!(header_str(&h, "dcam-source"), Some("images/2/41"));
        assert_eq!(header_str(&h, "dcam-redriven-from"), Some("images.dlq/0/7"), "what dlq redrive added stays: it says where the record came from");
    }
}
