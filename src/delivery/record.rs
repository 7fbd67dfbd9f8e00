//! A record ready to publish, and what happens when the broker refuses one for good
//! (docs/DESIGN.md §4): it is replaced by a small dead letter that says why.

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::event::{HEADER_ERROR, HEADER_ERROR_KIND};

/// A record ready to publish.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// Bytes on the wire, roughly: what the in-flight and transaction budgets count.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }

    /// The dead letter that stands in for this record when the broker refuses it for good.
    pub fn stand_in(&self, error: &dyn std::fmt::Display, dead_letter_topic: &str) -> OutRecord {
        stand_in(self, error, dead_letter_topic)
    }

    /// Whether this is already a stand-in (refusing it too leaves nothing to publish).
    pub fn is_stand_in(&self) -> bool {
        self.headers.iter().any(|(k, v)| k == HEADER_ERROR_KIND && v == TOO_LARGE_OUTPUT.as_bytes())
    }

    /// The input it came from (`topic/partition/offset`), from its `dcam-source` header.
    pub fn source(&self) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == crate::event::HEADER_SOURCE).map(|(_, v)| v.as_slice())
    }

    pub fn to_future_record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            headers = headers.insert(Header { key: k, value: Some(v.as_slice()) });
        }
        let mut r = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &self.key {
            r = r.key(k.as_slice());
        }
        if let Some(p) = &self.payload {
            r = r.payload(p.as_slice());
        }
        r
    }
}

pub(crate) use crate::event::TOO_LARGE_OUTPUT;
/// How much of a refused record's payload its stand-in dead letter keeps.
const STAND_IN_PAYLOAD_BYTES: usize = 16 * 1024;

/// The dead letter that stands in for a refused output: same key and headers, the payload cut
/// to `STAND_IN_PAYLOAD_BYTES`, and the reason. A refused dead letter keeps its original kind
/// in `dcam-original-error-kind`.
pub(crate) fn stand_in(record: &OutRecord, error: &dyn std::fmt::Display, dead_letter_topic: &str) -> OutRecord {
    let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(record.headers.len() + 3);
    for (k, v) in &record.headers {
        match k.as_str() {
            HEADER_ERROR_KIND => headers.push(("dcam-original-error-kind".into(), v.clone())),
            HEADER_ERROR => headers.push(("dcam-original-error".into(), v.clone())),
            _ => headers.push((k.clone(), v.clone())),
        }
    }
    let payload = record.payload.as_ref().map(|p| p[..p.len().min(STAND_IN_PAYLOAD_BYTES)].to_vec());
    let message =
        format!("{} refused the {} byte record: {error}; payload truncated to {} bytes", record.topic, record.size(), payload.as_ref().map_or(0, Vec::len));
    headers.push((HEADER_ERROR_KIND.into(), TOO_LARGE_OUTPUT.as_bytes().to_vec()));
    headers.push((HEADER_ERROR.into(), message.into_bytes()));
    OutRecord { topic: dead_letter_topic.to_string(), key: record.key.clone(), payload, headers }
}

/// Whether the broker will never accept this record, however often it is sent (docs/DESIGN.md §8).
/// librdkafka has already refreshed metadata and retried within `message.timeout.ms` before an
/// unknown topic comes back here.
pub(crate) fn is_permanent(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidMessage
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
        )
    )
}
