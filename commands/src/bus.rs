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
//! Events travel in partitions and in batches. Each stream belongs to one of the bus's
//! [`Bus::partitions`] ([`partition::partition_of`]), and a consumer runs one durable consumer
//! per partition, so that instances can share the work a partition at a time
//! (docs/adr/0012-partitions-by-campaign-and-customer.md). One message carries up to
//! [`BATCH_EVENTS_MAX`] events of one partition, in log order (a JSON array of envelopes), so
//! the broker's cost per message is paid once per batch, not once per event: a flash sale
//! writes several events per order, and every consumer reads them all. A message's id names its first and last event, so a relay that publishes
//! the same events again within JetStream's duplicate window is not stored twice. A consumer
//! reads each event's data and metadata only when it wants the event ([`Delivery::events_where`]):
//! most consumers want a small share of what a sale writes.
//!
//! Delivery is at least once on both: a consumer sees an event again after a crash, a lost
//! ack or a relay that republished past JetStream's duplicate window. Consumers deduplicate
//! (see [`crate::subscription::Dedupe`]).

pub mod jetstream;
pub mod memory;
pub mod partition;
pub mod topic;

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use schemas::{Envelope, EventHead};
use serde::Deserialize;
use serde_json::value::RawValue;
use ulid::Ulid;

pub use self::topic::Topic;
use crate::log::{LogCursor, RecordedEvent};
use crate::trace::TraceParent;

/// Most events one message carries.
pub const BATCH_EVENTS_MAX: usize = 500;
/// Most bytes of envelopes one message carries (NATS refuses payloads over 1 MiB by default);
/// a single larger event still goes, alone.
pub const BATCH_BYTES_MAX: usize = 768 * 1024;

/// The headers every published message carries, beside its JSON array of envelopes as the
/// body. A message's events carry their trace context in their own metadata (`trace_id`,
/// `span_id`), which consumers continue event by event.
pub mod header {
    /// JetStream's dedupe key: `<first event id>-<last event id>`
    /// (`async_nats::header::NATS_MESSAGE_ID`).
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// How many events the message carries.
    pub const EVENTS: &str = "Groupbuy-Events";
    /// The log cursor of the message's first event, `<transaction id>:<global position>`.
    pub const FIRST_CURSOR: &str = "Groupbuy-First-Cursor";
    /// The log cursor up to which every event is in this message or in one stored before it
    /// (its last event's, unless events of other partitions came in between); a relay that
    /// finds this message last on the bus resumes after it.
    pub const LOG_CURSOR: &str = "Groupbuy-Log-Cursor";
    /// The trace ids of the message's events (`trace_id` in their metadata), each once, in
    /// log order, separated by spaces: where to find a request's events on the bus.
    pub const TRACE_IDS: &str = "Groupbuy-Trace-Ids";
    /// The W3C trace context of the message's first traced event; on a dead letter, of its
    /// event.
    pub const TRACEPARENT: &str = "traceparent";
    /// On a dead letter: the event's type.
    pub const EVENT_TYPE: &str = "Groupbuy-Event-Type";
    /// On a dead letter: the event's stream.
    pub const STREAM: &str = "Groupbuy-Stream";
    /// On a dead letter: the event's version in its stream.
    pub const STREAM_VERSION: &str = "Groupbuy-Stream-Version";
    /// On a dead letter: the consumer that gave up.
    pub const DEAD_CONSUMER: &str = "Groupbuy-Dead-Consumer";
    /// On a dead letter: why.
    pub const DEAD_REASON: &str = "Groupbuy-Dead-Reason";
    /// On a dead letter: the subject the event was delivered on.
    pub const DEAD_SUBJECT: &str = "Groupbuy-Dead-Subject";
    /// The identity of the log the message's events come from
    /// ([`crate::EventLog::identity`]).
    pub const LOG_ID: &str = "Groupbuy-Log-Id";
    /// How the body is compressed, when it is: `lz4` ([`super::compress`]). A message
    /// without it carries its JSON as it is.
    pub const ENCODING: &str = "Groupbuy-Encoding";
}

/// The [`header::ENCODING`] of a body compressed by [`compress`].
pub const LZ4: &str = "lz4";

/// How a bus compresses the bodies it publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// LZ4 ([`compress`]), marked by [`header::ENCODING`].
    #[default]
    Lz4,
    /// The JSON as it is: while consumers of a build older than compression still read the
    /// bus (they cannot read LZ4).
    None,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "lz4" => Ok(Compression::Lz4),
            "none" => Ok(Compression::None),
            other => Err(format!("no compression {other:?}: lz4 or none")),
        }
    }
}

/// Most bytes a compressed body may claim to hold: far above any message (a batch is at
/// most [`BATCH_BYTES_MAX`], an event larger than that goes alone), and low enough that a
/// broken length cannot make a consumer set aside gigabytes.
const BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A body compressed for the wire: LZ4 blocks after the body's length (4 bytes, little
/// endian). A batch of envelopes shrinks about five-fold: their keys, ids and metadata repeat.
pub fn compress(body: &[u8]) -> Bytes {
    Bytes::from(lz4_flex::compress_prepend_size(body))
}

/// A message's body as it was written, from its payload and its [`header::ENCODING`];
/// an error says why it cannot be read (an unknown encoding, a broken or oversized body).
pub fn body_of(encoding: Option<&str>, payload: Bytes) -> Result<Bytes, String> {
    match encoding {
        None => Ok(payload),
        Some(LZ4) => {
            // The length comes first: checked before any room is made for it.
            let length = payload
                .get(..4)
                .map(|n| u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize);
            match length {
                Some(length) if length <= BODY_BYTES_MAX => {
                    lz4_flex::decompress_size_prepended(&payload)
                        .map(Bytes::from)
                        .map_err(|error| format!("a broken lz4 body: {error}"))
                }
                Some(length) => Err(format!("an lz4 body that claims {length} bytes")),
                None => Err("an lz4 body without its length".into()),
            }
        }
        Some(other) => Err(format!(
            "a body in an encoding this build cannot read: {other}"
        )),
    }
}

/// The events of the log in messages: the events of each partition and topic in log order, at
/// most [`BATCH_EVENTS_MAX`] and [`BATCH_BYTES_MAX`] bytes a message, the messages in the order
/// of their first events. Each message carries the cursor a relay may resume after once it is
/// stored ([`Batch::resume`]).
pub(crate) fn batches(
    events: &[RecordedEvent],
    partitions: u16,
) -> Result<Vec<Batch<'_>>, BusError> {
    let mut filling: Vec<Filling<'_>> = Vec::new();
    // The message each partition and topic is filling, as an index into `filling`.
    let mut open: HashMap<(u16, Topic), usize> = HashMap::new();
    let mut message_of = Vec::with_capacity(events.len());
    for event in events {
        let body = serde_json::to_vec(&event.envelope)?;
        let partition = partition::partition_of(&event.envelope.stream_id, partitions);
        let topic = Topic::of_stream(&event.envelope.stream_id);
        let index = match open.get(&(partition, topic)) {
            Some(&i) if !filling[i].full_for(body.len()) => i,
            _ => {
                filling.push(Filling::new(partition, topic));
                open.insert((partition, topic), filling.len() - 1);
                filling.len() - 1
            }
        };
        filling[index].push(event, body);
        message_of.push(index);
    }
    // Once message i is stored, so are those before it (JetStream stores a publisher's
    // messages in the order they were sent, and loses only a tail): every event up to the
    // last one before an event of a later message is then stored.
    let mut resume: Vec<Option<LogCursor>> = vec![None; filling.len()];
    let mut reached = 0;
    for (event, &index) in events.iter().zip(&message_of) {
        reached = reached.max(index);
        resume[reached] = Some(event.cursor);
    }
    let mut batches = Vec::with_capacity(filling.len());
    let mut last_resume = None;
    for (message, resume) in filling.into_iter().zip(resume) {
        // The first message holds the first event, so every message has a resume point.
        let resume = resume
            .or(last_resume)
            .expect("the first message holds the first event");
        last_resume = Some(resume);
        batches.push(message.finish(resume));
    }
    Ok(batches)
}

/// A message of one partition and topic being filled.
struct Filling<'a> {
    partition: u16,
    topic: Topic,
    events: Vec<&'a RecordedEvent>,
    encoded: Vec<Vec<u8>>,
    bytes: usize,
}

impl<'a> Filling<'a> {
    fn new(partition: u16, topic: Topic) -> Self {
        Filling {
            partition,
            topic,
            events: Vec::new(),
            encoded: Vec::new(),
            bytes: 0,
        }
    }

    /// Whether an event of `len` bytes no longer fits; a single larger event still goes.
    fn full_for(&self, len: usize) -> bool {
        !self.events.is_empty()
            && (self.events.len() >= BATCH_EVENTS_MAX || self.bytes + len + 1 > BATCH_BYTES_MAX)
    }

    fn push(&mut self, event: &'a RecordedEvent, body: Vec<u8>) {
        self.bytes += body.len() + 1;
        self.events.push(event);
        self.encoded.push(body);
    }

    fn finish(self, resume: LogCursor) -> Batch<'a> {
        let mut payload = Vec::with_capacity(self.bytes + 1);
        payload.push(b'[');
        for (i, body) in self.encoded.iter().enumerate() {
            if i > 0 {
                payload.push(b',');
            }
            payload.extend_from_slice(body);
        }
        payload.push(b']');
        Batch {
            partition: self.partition,
            topic: self.topic,
            events: self.events,
            payload: Bytes::from(payload),
            resume,
        }
    }
}

/// One message's worth of events.
pub(crate) struct Batch<'a> {
    /// The partition its events travel in.
    pub partition: u16,
    /// The topic of its events.
    pub topic: Topic,
    /// The events, in log order.
    pub events: Vec<&'a RecordedEvent>,
    /// The body: a JSON array of their envelopes.
    pub payload: Bytes,
    /// Once this message is stored, every event of the log up to this cursor is: where a
    /// relay resumes when this is the last message the bus holds.
    pub resume: LogCursor,
}

impl<'a> Batch<'a> {
    /// The message id: the first and the last event's ids.
    pub fn id(&self) -> String {
        let first = self.events.first().expect("a batch has events");
        let last = self.events.last().expect("a batch has events");
        format!("{}-{}", first.envelope.event_id, last.envelope.event_id)
    }

    /// The first event's cursor.
    pub fn first(&self) -> LogCursor {
        self.events.first().expect("a batch has events").cursor
    }

    /// The distinct trace ids of its events, in order, and the trace context of the first
    /// traced one.
    pub fn traces(&self) -> (Vec<&'a str>, Option<TraceParent>) {
        let mut ids: Vec<&'a str> = Vec::new();
        for event in &self.events {
            if let Some(id) = event.envelope.metadata.trace_id.as_deref() {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let first = self
            .events
            .iter()
            .find_map(|event| TraceParent::of(&event.envelope.metadata));
        (ids, first)
    }
}

/// A durable consumer: where it starts, what it sees, how much it holds unacknowledged.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// The durable name; the bus remembers the consumer's progress under it. Letters, digits,
    /// `-` and `_`.
    pub name: String,
    /// Most deliveries handed out and not yet acknowledged.
    pub max_in_flight: usize,
    /// How long a delivery may stay unacknowledged before the bus delivers it again.
    pub ack_wait: Duration,
    /// The partition it reads (`<prefix>.events.<partition>.<topic>`), or `None` for every
    /// partition.
    pub partition: Option<u16>,
    /// The topic it reads, or `None` for every topic.
    pub topic: Option<Topic>,
    /// Remove the consumer after it has had no subscriber this long; `None` keeps it. For
    /// consumers of one process only (an in-memory read model), which nobody resumes.
    pub inactive_threshold: Option<Duration>,
}

impl ConsumerOptions {
    /// A consumer of every event, with default limits.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerOptions {
            name: name.into(),
            // Messages, each a batch of up to `BATCH_EVENTS_MAX` events.
            max_in_flight: 16,
            ack_wait: Duration::from_secs(10),
            partition: None,
            topic: None,
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
    /// The bus already mirrors another log: two deployments share it by mistake.
    #[error(
        "{stream} holds the events of event log {theirs}, not of this deployment's log {ours}: \
         two deployments share one NATS server and stream prefix; give each its own \
         GROUPBUY_NATS_PREFIX (or NATS server), or, if the deployment of log {theirs} is gone \
         for good, delete its streams (nats stream rm {stream}) and this one recreates them"
    )]
    ForeignLog {
        /// The stream.
        stream: String,
        /// The log it mirrors.
        theirs: String,
        /// This deployment's log.
        ours: String,
    },
}

impl BusError {
    pub(crate) fn unavailable(error: impl std::fmt::Display) -> Self {
        BusError::Unavailable(error.to_string())
    }
}

/// One delivery of a message to a consumer. It must be acknowledged, negatively
/// acknowledged or terminated; one left alone is delivered again after the ack wait.
pub struct Delivery {
    /// Why no consumer may read it, when the bus knows before reading it (a message of
    /// another deployment's log).
    refused: Option<String>,
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
    /// Its events, in log order, or why the body is not a batch of them (a poison message).
    pub fn events(&self) -> Result<Vec<Envelope>, String> {
        self.events_where(|_| true)
    }

    /// Its events that `wants` picks, in log order, or why the body is not a batch of events.
    /// The others are skipped over without reading their data and metadata.
    pub fn events_where(
        &self,
        wants: impl Fn(&EventHead<'_>) -> bool,
    ) -> Result<Vec<Envelope>, String> {
        match &self.refused {
            Some(reason) => Err(reason.clone()),
            None => decode_where(&self.payload, wants),
        }
    }

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
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Something a consumer gave up on: one event of a delivery, or a whole message whose body
/// is not a batch of events.
#[derive(Clone, Debug)]
pub struct Letter<'a> {
    /// The subject it was delivered on.
    pub subject: &'a str,
    /// The event, when it is one.
    pub event: Option<&'a Envelope>,
    /// Its body: the event's envelope, or the message's raw body.
    pub payload: Bytes,
}

impl<'a> Letter<'a> {
    /// A letter of one event of `delivery`.
    pub fn of_event(delivery: &'a Delivery, event: &'a Envelope) -> Result<Letter<'a>, BusError> {
        Ok(Letter {
            subject: &delivery.subject,
            event: Some(event),
            payload: Bytes::from(serde_json::to_vec(event)?),
        })
    }

    /// A letter of a whole delivery whose body could not be read.
    pub fn of_message(delivery: &'a Delivery) -> Letter<'a> {
        Letter {
            subject: &delivery.subject,
            event: None,
            payload: delivery.payload.clone(),
        }
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
    /// Publishes `events` in order, in batches, and returns once the bus has stored every one.
    /// A batch it already holds (by message id) is not stored twice.
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BusError>;

    /// How many partitions it publishes the log in (see [`partition`]).
    fn partitions(&self) -> u16;

    /// How far the bus holds the log, so a relay can republish what the bus lost.
    async fn published(&self) -> Result<Published, BusError>;

    /// Binds the bus to the log `log_id`: messages published from now on carry it, and a
    /// message of any other log is delivered as one no consumer can read. Refused with
    /// [`BusError::ForeignLog`] when the bus already mirrors another log.
    async fn bind_log(&self, log_id: &str) -> Result<(), BusError>;

    /// Opens (creating it on first use) the durable consumer `options.name`.
    async fn subscribe(&self, options: &ConsumerOptions) -> Result<Box<dyn Deliveries>, BusError>;

    /// Stores what a consumer gave up on, with the reason, where operators look for dead
    /// letters.
    async fn dead_letter(
        &self,
        consumer: &str,
        letter: Letter<'_>,
        reason: &str,
    ) -> Result<(), BusError>;

    /// The dead letters stored after the one numbered `after` (0: from the first), oldest
    /// first, at most `limit`.
    async fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, BusError>;

    /// The dead letter numbered `id`, while the bus holds it.
    async fn dead_letter_at(&self, id: u64) -> Result<Option<StoredLetter>, BusError>;

    /// Removes the dead letter numbered `id`; false when the bus held none.
    async fn discard_dead_letter(&self, id: u64) -> Result<bool, BusError>;

    /// Checks the bus answers, for readiness probes.
    async fn ping(&self) -> Result<(), BusError>;
}

/// A dead letter as the bus keeps it, for operators to read, replay or discard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLetter {
    /// Its number: increasing in the order letters were stored, never reused.
    pub id: u64,
    /// The consumer that gave up.
    pub consumer: String,
    /// The subject the message was delivered on.
    pub subject: String,
    /// Why the consumer gave up.
    pub reason: String,
    /// When the bus stored it.
    pub stored_at: DateTime<Utc>,
    /// The body: one event's envelope, or the message's raw body.
    pub payload: Bytes,
}

impl StoredLetter {
    /// The events its body carries, or why it cannot be read.
    pub fn events(&self) -> Result<Vec<Envelope>, String> {
        decode(&self.payload)
    }
}

/// Reads a message body back: a batch of envelopes, or the single envelope of a message
/// published before batches; an error names what is wrong with a poison message.
pub(crate) fn decode(payload: &[u8]) -> Result<Vec<Envelope>, String> {
    decode_where(payload, |_| true)
}

/// An envelope as a message carries it, read in one pass that leaves its metadata and data as
/// the text they are: building them is most of the cost of reading an event, and only the
/// events a consumer wants are built.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unread<'a> {
    // The id and the time are parsed only for the events a consumer wants.
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    stream_id: Cow<'a, str>,
    stream_version: u64,
    global_position: u64,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    schema_version: u32,
    #[serde(borrow)]
    recorded_at: Cow<'a, str>,
    #[serde(borrow)]
    metadata: &'a RawValue,
    #[serde(borrow)]
    data: &'a RawValue,
}

impl Unread<'_> {
    fn head(&self) -> EventHead<'_> {
        EventHead {
            stream_id: &self.stream_id,
            event_type: &self.event_type,
        }
    }

    fn read(self) -> Result<Envelope, serde_json::Error> {
        use serde::de::Error as _;
        Ok(Envelope {
            event_id: Ulid::from_string(&self.event_id).map_err(serde_json::Error::custom)?,
            stream_id: self.stream_id.into_owned(),
            stream_version: self.stream_version,
            global_position: self.global_position,
            event_type: self.event_type.into_owned(),
            schema_version: self.schema_version,
            recorded_at: self
                .recorded_at
                .parse::<DateTime<Utc>>()
                .map_err(serde_json::Error::custom)?,
            metadata: serde_json::from_str(self.metadata.get())?,
            data: serde_json::from_str(self.data.get())?,
        })
    }
}

/// [`decode`], building only the events `wants` picks.
fn decode_where(
    payload: &[u8],
    wants: impl Fn(&EventHead<'_>) -> bool,
) -> Result<Vec<Envelope>, String> {
    let batch = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    let (unread, what) = if batch {
        (serde_json::from_slice(payload), "a batch of events")
    } else {
        (
            serde_json::from_slice(payload).map(|one: Unread<'_>| vec![one]),
            "an event envelope",
        )
    };
    let unread: Vec<Unread<'_>> = unread.map_err(|error| format!("not {what}: {error}"))?;
    unread
        .into_iter()
        .filter(|event| wants(&event.head()))
        .map(Unread::read)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("not {what}: {error}"))
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
    fn a_compressed_body_reads_back_as_written_and_a_broken_one_is_refused() {
        let json =
            br#"[{"event_id":"x","stream_id":"order-1"},{"event_id":"y","stream_id":"order-1"}]"#
                .repeat(50);
        let compressed = compress(&json);
        assert!(
            compressed.len() < json.len() / 4,
            "{} bytes",
            compressed.len()
        );
        assert_eq!(body_of(Some(LZ4), compressed.clone()).unwrap(), json);
        assert_eq!(body_of(None, Bytes::from(json.clone())).unwrap(), json);

        let cut = compressed.slice(..compressed.len() / 2);
        assert!(body_of(Some(LZ4), cut)
            .unwrap_err()
            .starts_with("a broken lz4 body"));
        let mut huge = compressed.to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = body_of(Some(LZ4), Bytes::from(huge)).unwrap_err();
        assert!(error.contains("claims"), "{error}");
        assert!(body_of(Some(LZ4), Bytes::from_static(b"ab")).is_err());
        let error = body_of(Some("zstd"), compressed).unwrap_err();
        assert!(error.contains("cannot read: zstd"), "{error}");
        assert_eq!("none".parse(), Ok(Compression::None));
        assert!("gzip".parse::<Compression>().is_err());
    }

    #[test]
    fn a_body_that_is_not_an_envelope_is_reported_not_panicked_on() {
        let error = decode(b"{\"hello\":1}").unwrap_err();
        assert!(error.starts_with("not an event envelope"), "{error}");
        let error = decode(b"[{\"hello\":1}]").unwrap_err();
        assert!(error.starts_with("not a batch of events"), "{error}");
    }

    fn recorded(n: u64, data_bytes: usize) -> RecordedEvent {
        RecordedEvent {
            cursor: LogCursor {
                transaction_id: 7,
                global_position: n,
            },
            envelope: Envelope {
                event_id: ulid::Ulid::from_parts(n, 1),
                stream_id: format!("campaign-{n}"),
                stream_version: 1,
                global_position: n,
                event_type: "CampaignClosed".into(),
                schema_version: 1,
                recorded_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                metadata: Default::default(),
                data: serde_json::json!({ "pad": "x".repeat(data_bytes) }),
            },
        }
    }

    #[test]
    fn events_go_in_batches_bounded_in_events_and_bytes_and_read_back_whole() {
        let many: Vec<RecordedEvent> = (1..=1_201).map(|n| recorded(n, 10)).collect();
        let sizes: Vec<usize> = batches(&many, 1)
            .unwrap()
            .iter()
            .map(|b| b.events.len())
            .collect();
        assert_eq!(sizes, [500, 500, 201]);
        let large: Vec<RecordedEvent> = (1..=4).map(|n| recorded(n, 300_000)).collect();
        let sizes: Vec<usize> = batches(&large, 1)
            .unwrap()
            .iter()
            .map(|b| b.events.len())
            .collect();
        assert_eq!(
            sizes,
            [2, 2],
            "two 300 kB events fit in 768 kB, three do not"
        );
        let huge = [recorded(1, 2_000_000)];
        assert_eq!(
            batches(&huge, 1).unwrap().len(),
            1,
            "an event larger than the cap goes alone"
        );

        let batch = &batches(&many, 1).unwrap()[2];
        let back = decode(&batch.payload).unwrap();
        assert_eq!(back.len(), 201);
        assert_eq!(back[0], many[1_000].envelope);
        assert_eq!(batch.first(), many[1_000].cursor);
        assert_eq!(batch.resume, many[1_200].cursor);
        assert_eq!(
            batch.id(),
            format!(
                "{}-{}",
                many[1_000].envelope.event_id, many[1_200].envelope.event_id
            )
        );
        assert_eq!(
            batches(&many, 1)
                .unwrap()
                .iter()
                .map(|b| b.resume)
                .collect::<Vec<_>>(),
            [many[499].cursor, many[999].cursor, many[1_200].cursor],
            "with one partition a message resumes after its own last event"
        );
        // A message from before batches still reads as one event.
        let single = serde_json::to_vec(&many[0].envelope).unwrap();
        assert_eq!(decode(&single).unwrap(), vec![many[0].envelope.clone()]);
    }

    #[test]
    fn each_partition_gets_its_events_in_order_and_every_message_a_safe_resume_point() {
        let streams = ["campaign-a", "campaign-b", "campaign-c", "campaign-d"];
        let parts: Vec<u16> = streams
            .iter()
            .map(|s| partition::partition_of(s, 4))
            .collect();
        let mut events: Vec<RecordedEvent> = (1..=1_200).map(|n| recorded(n, 10)).collect();
        for (i, event) in events.iter_mut().enumerate() {
            // Mostly a and b; c only at the end, so its message comes last.
            let stream = if i >= 1_190 { 2 } else { i % 2 };
            event.envelope.stream_id = streams[stream].into();
        }
        let sent = batches(&events, 4).unwrap();
        // The partitions of a and b may coincide; either way every message holds one
        // partition's events, in log order, and all of them are sent exactly once.
        let mut seen: Vec<u64> = Vec::new();
        for batch in &sent {
            assert!(batch.events.len() <= BATCH_EVENTS_MAX);
            for event in &batch.events {
                let stream = streams
                    .iter()
                    .position(|s| *s == event.envelope.stream_id)
                    .unwrap();
                assert_eq!(parts[stream], batch.partition);
            }
            assert!(batch.events.windows(2).all(|w| w[0].cursor < w[1].cursor));
            assert_eq!(decode(&batch.payload).unwrap().len(), batch.events.len());
            seen.extend(batch.events.iter().map(|e| e.cursor.global_position));
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=1_200).collect::<Vec<_>>());
        // A message's resume point: every event up to it is in it or in one sent before.
        for (i, batch) in sent.iter().enumerate() {
            let before: Vec<u64> = sent[..=i]
                .iter()
                .flat_map(|b| b.events.iter().map(|e| e.cursor.global_position))
                .collect();
            let resume = batch.resume.global_position;
            assert!((1..=resume).all(|n| before.contains(&n)), "message {i}");
            if i > 0 {
                assert!(batch.resume >= sent[i - 1].resume);
            }
        }
        assert_eq!(
            sent.last().unwrap().resume,
            events.last().unwrap().cursor,
            "the last message sent completes the batch"
        );
    }

    #[test]
    fn a_consumer_reads_whole_only_the_events_it_wants() {
        let mut events: Vec<RecordedEvent> = (1..=4).map(|n| recorded(n, 10)).collect();
        events[1].envelope.stream_id = "order-2".into();
        events[1].envelope.data = serde_json::json!({ "escaped \"quote\"": [1, 2.5, null] });
        let payload =
            serde_json::to_vec(&events.iter().map(|e| &e.envelope).collect::<Vec<_>>()).unwrap();
        let orders = decode_where(&payload, |head| head.category() == "order").unwrap();
        assert_eq!(orders, vec![events[1].envelope.clone()]);
        assert!(decode_where(&payload, |_| false).unwrap().is_empty());
        assert_eq!(
            decode(&payload).unwrap(),
            events
                .iter()
                .map(|e| e.envelope.clone())
                .collect::<Vec<_>>()
        );

        // Metadata that is not an event's fails only a consumer that reads the event.
        let broken = String::from_utf8(payload.clone()).unwrap().replacen(
            "\"trace_id\":null",
            "\"trace_id\":7",
            1,
        );
        let error = decode(broken.as_bytes()).unwrap_err();
        assert!(error.starts_with("not a batch of events"), "{error}");
        let rest = decode_where(broken.as_bytes(), |head| head.stream_id != "campaign-1");
        assert_eq!(rest.unwrap().len(), 3);
        // So do an id and a time that are not an event's: they are read with the event.
        let first = events[0].envelope.event_id.to_string();
        let broken = String::from_utf8(payload.clone())
            .unwrap()
            .replacen(&first, "not-an-id", 1);
        let error = decode(broken.as_bytes()).unwrap_err();
        assert!(error.starts_with("not a batch of events"), "{error}");
        let rest = decode_where(broken.as_bytes(), |head| head.stream_id != "campaign-1");
        assert_eq!(rest.unwrap().len(), 3);
        let time = serde_json::to_string(&events[0].envelope.recorded_at).unwrap();
        let broken =
            String::from_utf8(payload.clone())
                .unwrap()
                .replacen(&time, "\"yesterday\"", 1);
        assert!(decode(broken.as_bytes()).is_err());
        assert_eq!(
            decode_where(broken.as_bytes(), |head| head.stream_id != "campaign-1")
                .unwrap()
                .len(),
            3
        );
        // A body that is not a batch of envelopes fails every consumer.
        let error = decode_where(b"[{\"event_id\":1}]", |_| false).unwrap_err();
        assert!(error.starts_with("not a batch of events"), "{error}");
    }
}
