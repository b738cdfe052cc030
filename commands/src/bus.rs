//! The mirror of the event log that sagas and projections consume.
//!
//! The Postgres log is the source of truth; the bus is how the rest of the system hears about
//! it. The [`crate::relay`] publishes every event of the log, in global order, and
//! [`crate::subscription`] runs durable consumers over it. Two implementations sit behind the
//! [`Bus`] trait:
//!
//! - [`jetstream::JetStreamBus`]: NATS JetStream, the production mirror;
//! - [`memory::MemoryBus`]: in process, the embedded default, with the same delivery
//!   semantics (durable consumers, explicit acks, redelivery after a negative ack).
//!
//! Delivery is at least once on both: a consumer sees an event again after a crash, a lost
//! ack or a relay that republished past JetStream's duplicate window. Consumers deduplicate
//! (see [`crate::subscription::Dedupe`]).

pub mod jetstream;
pub mod memory;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use schemas::Envelope;

use crate::log::{LogCursor, RecordedEvent};

/// The headers every published event carries, beside its JSON envelope as the body.
pub mod header {
    /// JetStream's dedupe key: the event id (`async_nats::header::NATS_MESSAGE_ID`).
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The event type.
    pub const EVENT_TYPE: &str = "Groupbuy-Event-Type";
    /// The stream id.
    pub const STREAM: &str = "Groupbuy-Stream";
    /// The version of the event in its stream.
    pub const STREAM_VERSION: &str = "Groupbuy-Stream-Version";
    /// The event's global position.
    pub const GLOBAL_POSITION: &str = "Groupbuy-Global-Position";
    /// The log cursor, `<transaction id>:<global position>`; the relay resumes from it.
    pub const LOG_CURSOR: &str = "Groupbuy-Log-Cursor";
    /// The trace the event was recorded in, when it has one.
    pub const TRACE_ID: &str = "Groupbuy-Trace-Id";
    /// W3C trace context: the trace and the span that recorded the event, when it has both, so
    /// any consumer that speaks W3C Trace Context continues that span.
    pub const TRACEPARENT: &str = "traceparent";
    /// On a dead letter: the consumer that gave up.
    pub const DEAD_CONSUMER: &str = "Groupbuy-Dead-Consumer";
    /// On a dead letter: why.
    pub const DEAD_REASON: &str = "Groupbuy-Dead-Reason";
    /// On a dead letter: the subject the event was delivered on.
    pub const DEAD_SUBJECT: &str = "Groupbuy-Dead-Subject";
}

/// A durable consumer: where it starts, what it sees, how much it holds unacknowledged.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// The durable name; the bus remembers the consumer's progress under it. Letters, digits,
    /// `-` and `_`.
    pub name: String,
    /// Only events of streams in this category (`order`, `campaign`, ...); all when `None`.
    pub category: Option<String>,
    /// Most deliveries handed out and not yet acknowledged.
    pub max_in_flight: usize,
    /// How long a delivery may stay unacknowledged before the bus delivers it again.
    pub ack_wait: Duration,
    /// Remove the consumer after it has had no subscriber this long; `None` keeps it. For
    /// consumers of one process only (an in-memory read model), which nobody resumes.
    pub inactive_threshold: Option<Duration>,
}

impl ConsumerOptions {
    /// A consumer of every event, with default limits.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerOptions {
            name: name.into(),
            category: None,
            max_in_flight: 256,
            ack_wait: Duration::from_secs(10),
            inactive_threshold: None,
        }
    }
}

/// How far the bus holds the log, as far as it can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Nothing was ever published to it.
    Nothing,
    /// Its last message is the event at this cursor.
    UpTo(LogCursor),
    /// It has published messages but no longer holds the last one (retention removed it).
    Unknown,
}

/// The bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker could not be reached or refused.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// An event could not be turned into a message.
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
}

impl BusError {
    pub(crate) fn unavailable(error: impl std::fmt::Display) -> Self {
        BusError::Unavailable(error.to_string())
    }
}

/// One delivery of a message to a consumer. It must be acknowledged, negatively
/// acknowledged or terminated; one left alone is delivered again after the ack wait.
pub struct Delivery {
    /// The event, or why the body is not one (a poison message).
    pub event: Result<Envelope, String>,
    /// The subject it was published on.
    pub subject: String,
    /// The raw body, kept for dead letters.
    pub payload: Bytes,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
    acker: Acker,
}

enum Acker {
    JetStream(async_nats::jetstream::message::Acker),
    Memory(memory::MemoryAcker),
}

impl Delivery {
    /// Done with it: never deliver it again.
    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::JetStream(acker) => acker.ack().await.map_err(BusError::unavailable),
            Acker::Memory(_) => Ok(()),
        }
    }

    /// Not now: deliver it again after `delay`.
    pub async fn retry_after(&self, delay: Duration) -> Result<(), BusError> {
        match &self.acker {
            Acker::JetStream(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(BusError::unavailable),
            Acker::Memory(acker) => {
                acker.redeliver_after(delay);
                Ok(())
            }
        }
    }

    /// Still working on it: restart the ack wait.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::JetStream(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(BusError::unavailable),
            Acker::Memory(_) => Ok(()),
        }
    }

    /// Given up on it: never deliver it again (after dead-lettering it).
    pub async fn terminate(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::JetStream(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Term)
                .await
                .map_err(BusError::unavailable),
            Acker::Memory(_) => Ok(()),
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("delivered", &self.delivered)
            .field("event", &self.event.as_ref().map(|e| e.event_id))
            .finish()
    }
}

/// A consumer's stream of deliveries.
#[async_trait]
pub trait Deliveries: Send {
    /// The next delivery, waiting for one. `None` or an error: the subscription is broken
    /// (the connection was lost); subscribe again to go on from the durable position.
    async fn next(&mut self) -> Option<Result<Delivery, BusError>>;
}

/// The message bus the log is mirrored into.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `events` in order and returns once the bus has stored every one. Events it
    /// already holds (by event id) are not stored twice.
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BusError>;

    /// How far the bus holds the log, so a relay can republish what the bus lost.
    async fn published(&self) -> Result<Published, BusError>;

    /// Opens (creating it on first use) the durable consumer `options.name`.
    async fn subscribe(&self, options: &ConsumerOptions) -> Result<Box<dyn Deliveries>, BusError>;

    /// Stores a delivery a consumer gave up on, with the reason, where operators look for
    /// dead letters.
    async fn dead_letter(
        &self,
        consumer: &str,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError>;

    /// Checks the bus answers, for readiness probes.
    async fn ping(&self) -> Result<(), BusError>;
}

/// The body of an event's message: its envelope as JSON.
pub(crate) fn encode(event: &RecordedEvent) -> Result<Bytes, BusError> {
    Ok(Bytes::from(serde_json::to_vec(&event.envelope)?))
}

/// Reads a message body back; an error names what is wrong with a poison message.
pub(crate) fn decode(payload: &[u8]) -> Result<Envelope, String> {
    serde_json::from_slice(payload).map_err(|error| format!("not an event envelope: {error}"))
}

/// `<transaction id>:<global position>`, as in the [`header::LOG_CURSOR`] header.
pub(crate) fn format_cursor(cursor: LogCursor) -> String {
    format!("{}:{}", cursor.transaction_id, cursor.global_position)
}

pub(crate) fn parse_cursor(text: &str) -> Option<LogCursor> {
    let (transaction_id, global_position) = text.split_once(':')?;
    Some(LogCursor {
        transaction_id: transaction_id.parse().ok()?,
        global_position: global_position.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_their_header_form() {
        let cursor = LogCursor {
            transaction_id: 981,
            global_position: 12,
        };
        assert_eq!(format_cursor(cursor), "981:12");
        assert_eq!(parse_cursor("981:12"), Some(cursor));
        assert_eq!(parse_cursor("981"), None);
        assert_eq!(parse_cursor("a:1"), None);
    }

    #[test]
    fn a_body_that_is_not_an_envelope_is_reported_not_panicked_on() {
        let error = decode(b"{\"hello\":1}").unwrap_err();
        assert!(error.starts_with("not an event envelope"), "{error}");
    }
}
