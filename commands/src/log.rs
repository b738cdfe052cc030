//! The event log: append with expected versions, read streams, read the global log in an
//! order that never skips a late commit, snapshots and idempotency records.

mod committed;
pub mod memory;
pub mod postgres;

use async_trait::async_trait;
use schemas::{EncodedEvent, Envelope, Metadata, SchemaError};
use ulid::Ulid;

use crate::idempotency::{key_event_id, IdempotencyKey, IdempotencyRecord, Keeping, Recorded};

/// Most events one append may carry, across all its streams.
pub const APPEND_EVENTS_MAX: usize = 10_000;
/// Most events one read may return.
pub const READ_EVENTS_MAX: usize = 10_000;

/// An event about to be appended.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// Its id; appending an id that is already stored is a no-op, not a duplicate.
    pub event_id: Ulid,
    /// Type, schema version and validated payload.
    pub event: EncodedEvent,
    /// Tracing and causation.
    pub metadata: Metadata,
}

/// Events for one stream, valid only if the stream is at `expected_version`.
#[derive(Clone, Debug)]
pub struct StreamAppend {
    /// The stream.
    pub stream_id: String,
    /// The version the decision was based on: 0 for a stream with no events.
    pub expected_version: u64,
    /// The events, in order; they get versions `expected_version + 1 ..`.
    pub events: Vec<NewEvent>,
}

/// One atomic append: every stream's events commit together or none do.
#[derive(Clone, Debug, Default)]
pub struct AppendRequest {
    /// The streams and their events. Empty only for a request that records an
    /// Idempotency-Key alone.
    pub streams: Vec<StreamAppend>,
    /// An Idempotency-Key to record in the same transaction. When the key is recorded already
    /// (and not expired), nothing is appended and the append fails with
    /// [`LogError::KeyTaken`].
    pub idempotency: Option<IdempotencyRecord>,
}

impl AppendRequest {
    /// Whether this request and `other` must not share a transaction of a group commit:
    /// they write a stream in common (the later one's expected version may follow the
    /// earlier's events, which one statement cannot see), or record the same key.
    pub fn overlaps(&self, other: &AppendRequest) -> bool {
        let same_key = match (&self.idempotency, &other.idempotency) {
            (Some(a), Some(b)) => a.key == b.key,
            _ => false,
        };
        same_key
            || self
                .streams
                .iter()
                .any(|a| other.streams.iter().any(|b| a.stream_id == b.stream_id))
    }

    /// Events in the request, over all its streams.
    pub fn event_count(&self) -> usize {
        self.streams.iter().map(|s| s.events.len()).sum()
    }
}

/// A position in the global read order. Readers order events by transaction first, then by
/// position, and compare cursors the same way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogCursor {
    /// The appending transaction (Postgres `xid8`; a sequence number in memory).
    pub transaction_id: u64,
    /// The event's global position.
    pub global_position: u64,
}

/// What an append stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The cursor of the last event stored, for read-your-writes waits.
    pub last: LogCursor,
    /// Whether every event was already stored (a re-sent append): nothing new was written.
    pub replayed: bool,
}

/// An event read back, with its place in the global order.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    /// Its place in the global read order.
    pub cursor: LogCursor,
    /// The event.
    pub envelope: Envelope,
}

/// The log refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another writer appended to one of the streams since the decision was made.
    #[error("stream {stream_id} is not at the expected version {expected_version}")]
    Conflict {
        /// The first stream of the append (in its order) that was not at its expected version,
        /// as far as the log can tell; else the append's first stream.
        stream_id: String,
        /// What the append expected.
        expected_version: u64,
    },
    /// The request's Idempotency-Key was recorded already, by this request's first try or
    /// by another request: nothing was appended. Here is what was recorded.
    #[error("idempotency key already used")]
    KeyTaken(Box<Recorded>),
    /// The append is larger than the log accepts, or empty.
    #[error("append rejected: {0}")]
    InvalidAppend(&'static str),
    /// An event does not fit its schema.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database could not be reached at all: where, and why.
    #[error("cannot reach PostgreSQL at {at}: {why}")]
    Unreachable {
        /// `host:port` (or the socket), never the credentials.
        at: String,
        /// What the connection attempt met ("Connection refused", a name that does not
        /// resolve, a refused login).
        why: String,
    },
    /// The transaction of a group commit this append was part of failed: nothing of it was
    /// stored, and trying again is safe.
    #[error("the group commit failed, nothing was stored: {0}")]
    BatchFailed(String),
    /// A stored row could not be read back (a bug or a hand-edited log).
    #[error("corrupt log: {0}")]
    Corrupt(String),
}

/// A folded state saved at a stream version.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The stream.
    pub stream_id: String,
    /// The version the state includes.
    pub stream_version: u64,
    /// The shape of the state; one of another shape is ignored.
    pub state_version: u32,
    /// The state.
    pub state: serde_json::Value,
}

/// The event log.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends to every stream of the request in one transaction. A stream not at its
    /// expected version fails the whole append with [`LogError::Conflict`]; an append whose
    /// events are all stored already succeeds with `replayed`.
    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        self.append_batch(vec![request])
            .await
            .pop()
            .expect("one outcome per request")
    }

    /// Appends many requests in one transaction (a group commit), each with an outcome of its
    /// own, in the order given: each request is atomic and independent of the others, exactly
    /// as if it were appended alone, except that two requests of one batch must not overlap
    /// ([`AppendRequest::overlaps`]; the later one then fails with a conflict). When the
    /// transaction itself fails, every request fails with a retryable error and nothing of
    /// the batch is stored.
    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, LogError>>;

    /// Every event of the given streams, ordered by stream id and version, at most `limit`.
    async fn read_streams(
        &self,
        stream_ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError>;

    /// Events of one stream with version greater than `after_version`, in version order, at
    /// most `limit` of them.
    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError>;

    /// Events of the global log after `after`, in (transaction, position) order, at most
    /// `limit`. Only events of transactions older than every running one are returned, so a
    /// reader that resumes from the last cursor it saw never skips a late commit.
    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError>;

    /// The stored snapshot of a stream, if any.
    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, LogError>;

    /// Stores a snapshot unless a newer one is stored already.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), LogError>;

    /// What is recorded under `key`, unless it expired.
    async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError>;

    /// Replaces the response recorded under a key by the same request (same
    /// `request_sha256`): for a request whose answer changed after its append recorded it
    /// (`Prefer: wait` answers with the order as the saga left it, not as it was placed), so
    /// that a replay is the first response the client got. Nothing happens when the key is
    /// not recorded, expired, or recorded by another request.
    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError>;

    /// A counter that moves whenever this process appends. Readers of the global log wait on
    /// it between polls so that local appends reach them at once; appends by other instances
    /// are found by polling.
    fn appends(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The highest global position stored; 0 for an empty log.
    async fn head(&self) -> Result<u64, LogError>;

    /// How many events of streams in `categories` lie after global position `after`: how far
    /// behind a reader of those categories is that got to `after`.
    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError>;

    /// Removes at most `limit` Idempotency-Key records made more than `older_than` ago, oldest
    /// first, and returns how many went. Keys are answered only for
    /// [`crate::idempotency::IDEMPOTENCY_KEY_TTL_S`]; past that they are dead weight.
    async fn expire_idempotency_keys(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> Result<u64, LogError>;

    /// The log's identity, made once when it was created: what the mirror stamps on its
    /// messages, so a deployment can tell its own log's events from another's.
    async fn identity(&self) -> Result<String, LogError>;

    /// Checks the log's storage answers, for readiness probes.
    async fn ping(&self) -> Result<(), LogError> {
        Ok(())
    }
}

/// Checks what every implementation refuses before touching storage.
pub(crate) fn check_request(request: &AppendRequest) -> Result<usize, LogError> {
    if request.streams.iter().any(|s| s.events.is_empty()) {
        return Err(LogError::InvalidAppend(
            "every stream of an append needs at least one event",
        ));
    }
    let count = request.event_count();
    if count == 0 && request.idempotency.is_none() {
        return Err(LogError::InvalidAppend(
            "an append needs at least one event",
        ));
    }
    if count > APPEND_EVENTS_MAX {
        return Err(LogError::InvalidAppend(
            "an append may carry at most 10000 events",
        ));
    }
    if let Some(record) = request
        .idempotency
        .as_ref()
        .filter(|r| matches!(r.keeping, Keeping::InFirstEvent { .. }))
    {
        let first = request.streams.first();
        let starts = first.is_some_and(|s| s.expected_version == 0);
        let event = first.and_then(|s| s.events.first());
        if !starts
            || event.is_none_or(|e| {
                e.event_id != key_event_id(&record.key)
                    || e.metadata.request_sha256.as_deref() != Some(&record.request_sha256)
            })
        {
            return Err(LogError::InvalidAppend(
                "a key kept in the first event needs that event to start its stream, with the key's id and the request's hash",
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if !request
        .streams
        .iter()
        .all(|s| seen.insert(s.stream_id.as_str()))
    {
        return Err(LogError::InvalidAppend(
            "a stream may appear once per append",
        ));
    }
    Ok(count)
}

/// Where a request would keep its key in its first event but an earlier, expired use of the
/// key holds the derived id (`taken`), keeps the key apart instead, under a fresh id.
pub(crate) fn keep_apart_if_reused(request: &mut AppendRequest, taken: impl FnOnce(&Ulid) -> bool) {
    let Some(record) = request.idempotency.as_mut() else {
        return;
    };
    let Keeping::InFirstEvent { fallback } = &record.keeping else {
        return;
    };
    let first = &mut request.streams[0].events[0];
    if taken(&first.event_id) {
        record.keeping = Keeping::Apart(fallback.clone());
        first.event_id = Ulid::new();
        first.metadata.request_sha256 = None;
    }
}
