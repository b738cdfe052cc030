//! The envelope: an event with everything needed to order, deduplicate and trace it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use ulid::Ulid;

/// Who and what caused an event; carried from the HTTP request (or saga step) into the log
/// and on to JetStream headers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The trace the event was recorded in (W3C trace id, 32 hex digits).
    pub trace_id: Option<String>,
    /// The span that recorded it (W3C parent-id, 16 hex digits), so that whatever handles the
    /// event continues that span. Optional in the schema: older events do not carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// The id shared by everything one outside request set off.
    pub correlation_id: Option<String>,
    /// The id of the request or event that directly caused this one.
    pub causation_id: Option<String>,
    /// The Idempotency-Key of the request that appended it, if any.
    pub idempotency_key: Option<String>,
    /// Who acted: `operator`, `user:<id>`, `payment_provider` or a role like `saga:order`.
    pub actor: Option<String>,
    /// On the event that records its request's Idempotency-Key (the first its request
    /// appended), the SHA-256 of that request in hex: a retry with the key is the same request
    /// exactly when its hash is this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
}

/// An event as read back from the log, with its position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Unique id of the event; the dedupe key everywhere.
    pub event_id: Ulid,
    /// `<category>-<aggregate id>`.
    pub stream_id: String,
    /// 1-based version of the event within its stream.
    pub stream_version: u64,
    /// Position in the global log (unique, increasing with insertion, not with commit).
    pub global_position: u64,
    /// The event type, as in the schema registry.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// When the log recorded it.
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    /// Tracing and causation.
    pub metadata: Metadata,
    /// The payload.
    pub data: Value,
}

impl Envelope {
    /// The stream's category: the part of the stream id before the first `-`.
    pub fn category(&self) -> &str {
        self.head().category()
    }

    /// What a consumer looks at to tell whether it wants the event.
    pub fn head(&self) -> EventHead<'_> {
        EventHead {
            stream_id: &self.stream_id,
            event_type: &self.event_type,
        }
    }
}

/// What a consumer looks at to tell whether it wants an event, before reading it whole: a
/// consumer reads the data and metadata only of the events it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHead<'a> {
    /// `<category>-<aggregate id>`.
    pub stream_id: &'a str,
    /// The event type, as in the schema registry.
    pub event_type: &'a str,
}

impl<'a> EventHead<'a> {
    /// The stream's category: the part of the stream id before the first `-`.
    pub fn category(&self) -> &'a str {
        self.stream_id
            .split_once('-')
            .map_or(self.stream_id, |(category, _)| category)
    }
}
